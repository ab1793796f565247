"""The decode kernels (`hfnanochat.inference.decode_kernels`) against cuBLAS and SDPA, shape by shape, over configs.

    python bench/decode_kernels.py              # d20 shapes: the GEMVs of a block and the head, one-query attention
    python bench/decode_kernels.py --quick      # only the configs the library picks
    python bench/decode_kernels.py --only qkv,fc1 --pdl   # two shapes, launched as the model launches them (PDL)

Each GEMV runs with the fusion the model uses at that place (RMSNorm folded into q/k/v and fc1, a residual add
after o_proj and fc2; cuBLAS does neither). Each measurement is a CUDA graph of one launch per layer over `--layers`
distinct weights (or caches), replayed: what a compiled decode step sees (no launch overhead, no L2 reuse between
layers). Reported per launch, with the HBM bandwidth that implies (bytes of weight or cache read / time). The
library's choice is marked with `*`. By default kernels launch without programmatic dependent launch, so each figure
is a kernel's own cost. With `--pdl` the GEMVs launch as in the model on Hopper: each one starts during the previous
launch and, where one block covers K, reads its weights before waiting for it. Needs CUDA.
"""

import argparse
import itertools

import torch
import torch.nn.functional as F
import triton

from hfnanochat.inference import decode_kernels as dk


def time_graph(launch, n_layers: int, replays: int = 50) -> float:
    """Microseconds per launch of `launch(i)`, i = 0..n_layers-1, captured once in a CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(n_layers):  # warm-up: compilation and autotuning outside the capture
            launch(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(n_layers):
            launch(i)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / (replays * n_layers)


def bench_gemv(n, k, n_layers, quick, norm=False, residual=False, pdl=False, block_ks=(128, 256, 512, 1024, 2048)):
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(n_layers)]
    x = torch.randn(1, 1, k, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(1, 1, n, device="cuda", dtype=torch.bfloat16)
    res = torch.randn(1, 1, n, device="cuda", dtype=torch.bfloat16)
    gbytes = n * k * 2 / 1e3  # per microsecond -> GB/s
    results = [("cuBLAS F.linear", time_graph(lambda i: F.linear(x, weights[i]), n_layers))]
    chosen = dk._gemv_config(n, k, pdl)
    sweep = itertools.product((1, 2, 4, 8, 16), block_ks, (1, 2, 4, 8))  # BLOCK_N, BLOCK_K, warps
    configs = [chosen] if quick else sorted(set(sweep) | {chosen})
    for block_n, block_k, warps in configs:

        def launch(i, block_n=block_n, block_k=block_k, warps=warps):
            dk._gemv_kernel[(triton.cdiv(n, block_n),)](
                x, weights[i], out, res, n, k, 1e-6, NORM=norm, RELU_SQUARE=False, RESIDUAL=residual,
                BLOCK_N=block_n, BLOCK_K=block_k, ONE_BLOCK=k <= block_k, PDL=pdl, num_warps=warps, launch_pdl=pdl,
            )  # fmt: skip

        mark = "*" if (block_n, block_k, warps) == chosen else " "
        try:
            results.append((f"{mark}triton N{block_n} K{block_k} w{warps}", time_graph(launch, n_layers)))
        except Exception as e:  # a config the compiler rejects (e.g. out of registers) is skipped, not fatal
            print(f"  N{block_n} K{block_k} w{warps}: {type(e).__name__}: {str(e)[:100]}")
    return [(name, us, gbytes / us) for name, us in results]


def bench_attention(batch, heads, head_dim, slots, used, n_layers, quick):
    shape = (batch, heads, slots, head_dim)
    caches = [(torch.randn(shape, device="cuda", dtype=torch.bfloat16),
               torch.randn(shape, device="cuda", dtype=torch.bfloat16)) for _ in range(n_layers)]  # fmt: skip
    q = torch.randn(batch, 1, heads, head_dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    mask = torch.zeros(batch, 1, 1, slots, dtype=torch.bool, device="cuda")
    mask[..., :used] = True
    scale = head_dim**-0.5
    gbytes = 2 * batch * heads * slots * head_dim * 2 / 1e3
    sdpa = time_graph(lambda i: F.scaled_dot_product_attention(q, *caches[i], attn_mask=mask, scale=scale), n_layers)
    results = [("SDPA (bool mask, as the model calls it)", sdpa)]
    chosen = dk._attention_config(slots)
    sweep = set(itertools.product((32, 64, 128, 256, 512), (16, 32, 64), (2, 4, 8)))  # CHUNK, BLOCK_S, warps
    configs = [chosen] if quick else sorted(sweep | {chosen})
    keep = mask[:, 0, 0]
    for chunk, block_s, warps in configs:
        if chunk < block_s:
            continue

        def launch(i, config=(chunk, block_s, warps)):
            dk._launch_attention(q, *caches[i], keep, scale, config=config, pdl=False)

        mark = "*" if (chunk, block_s, warps) == chosen else " "
        try:
            results.append((f"{mark}triton chunk{chunk} S{block_s} w{warps}", time_graph(launch, n_layers)))
        except Exception as e:
            print(f"  chunk{chunk} S{block_s} w{warps}: {type(e).__name__}: {str(e)[:100]}")
    # as the model calls it over a static cache: RoPE, QK-norm and the new token's write in the same kernel
    projected = torch.randn(batch, 1, 3 * heads * head_dim, device="cuda", dtype=torch.bfloat16)
    new_q, new_k, new_v = (t.view(batch, 1, heads, head_dim) for t in projected.chunk(3, dim=-1))
    cos = sin = torch.rand(batch, head_dim // 2, device="cuda", dtype=torch.bfloat16)
    new = (new_k, new_v, cos, sin, torch.tensor(used - 1, device="cuda"), 1e-6, 1.0)
    in_place = time_graph(lambda i: dk._launch_attention(new_q, *caches[i], keep, scale, new=new, pdl=False), n_layers)
    results.append(("*in place: + RoPE, QK-norm, cache write", in_place))
    ours = dk.decode_attention(q, *caches[0], mask, scale)
    ref = F.scaled_dot_product_attention(q, *caches[0], attn_mask=mask, scale=scale).transpose(1, 2)
    print(f"  max |ours - SDPA| = {(ours.float() - ref.float()).abs().max().item():.2e}")
    return [(name, us, gbytes / us) for name, us in results]


def report(title, rows, top):
    print(f"\n{title}")
    best = sorted(rows[1:], key=lambda r: r[1])[:top]
    shown = [rows[0]] + best + [r for r in rows[1:] if r[0].startswith("*") and r not in best]
    for name, us, bw in shown:
        print(f"  {name:42s} {us:8.2f} us  {bw:7.0f} GB/s", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=1280)
    p.add_argument("--vocab", type=int, default=65536)
    p.add_argument("--layers", type=int, default=20)
    p.add_argument("--slots", type=int, default=768, help="static cache length (prompt 512 + 256 new tokens)")
    p.add_argument("--quick", action="store_true", help="only the configs the library picks")
    p.add_argument("--top", type=int, default=5, help="best configs shown per shape")
    parts = ["qkv", "o_proj", "fc1", "fc2", "lm_head", "attention"]
    p.add_argument("--only", default=",".join(parts), help=f"comma-separated subset of {','.join(parts)}")
    p.add_argument("--pdl", action="store_true", help="GEMVs launch with programmatic dependent launch (Hopper+)")
    p.add_argument(
        "--block-k",
        default="128,256,512,1024,2048",
        help="BLOCK_K values swept; one that covers K reads the weights before waiting (with --pdl)",
    )
    args = p.parse_args()
    only = set(args.only.split(","))
    if only - set(parts):
        p.error(f"--only: unknown {sorted(only - set(parts))}; choose among {parts}")
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    d = args.hidden
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    # name, N, K, weights, and the fusion the model asks of that GEMV: RMSNorm folded in or a residual add
    shapes = [("qkv", 3 * d, d, args.layers, True, False), ("o_proj", d, d, args.layers, False, True),
              ("fc1", 4 * d, d, args.layers, True, False), ("fc2", d, 4 * d, args.layers, False, True),
              ("lm_head", args.vocab, d, 1, False, False)]  # fmt: skip
    for name, n, k, layers, norm, residual in shapes:
        if name not in only:
            continue
        block_ks = [int(b) for b in args.block_k.split(",")]
        rows = bench_gemv(n, k, layers, args.quick, norm, residual, args.pdl, block_ks)
        report(f"GEMV {name} ({n} x {k}), {layers} weights, norm={norm} residual={residual}, pdl={args.pdl}", rows,
               args.top)  # fmt: skip
    heads = d // 128
    for batch in (1, 32) if "attention" in only else ():
        used = args.slots * 5 // 6
        rows = bench_attention(batch, heads, 128, args.slots, used, args.layers, args.quick)
        report(f"attention, batch {batch}, {heads} heads x 128, {used} of {args.slots} slots", rows, args.top)


if __name__ == "__main__":
    main()
