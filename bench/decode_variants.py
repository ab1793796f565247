"""Decode of the engine under compiler and kernel variants: which change cuts a step's GPU time?

    python bench/decode_variants.py shipped --profile      # the engine as it is, plus a per-kernel profile
    python bench/decode_variants.py onequery               # variants, alone or joined by "+", e.g. gemv+combo
    python bench/decode_variants.py autotune --batch 32    # 32 rows at once: Triton GEMM templates vs cuBLAS
    python bench/decode_variants.py shipped --tokenizer tok  # stop tokens and the python-tool machine live

Variants, each slower than `shipped` when measured at batch 1 (docs/benchmarks-log.md). `cublas` and `update` switch
off a part of the library; the others patch in alternatives that are not in it:
- cublas: without the Triton decode kernels (`inference/decode_kernels.py`): cuBLAS GEMMs, separate norms and
  adds, SDPA, the engine as it was before them;
- update: the decode kernels, but each layer writes its cache through transformers' `StaticLayer.update` (Inductor's
  rotary/norm kernel, the cache write, a length bump per layer) instead of `decode_attention_in_place`;
- gemv: one-row matmuls as multiply + sum, so Inductor writes reduction kernels (and fuses ReLU^2, the softcap) in
  place of cuBLAS calls;
- onequery: attention of the one new token as products + reductions in fp32 for Inductor to fuse, in place of SDPA;
- combo: Inductor's horizontal fusion (`combo_kernels`); autotune: `max_autotune` (Triton GEMM templates);
  cdt: `coordinate_descent_tuning`; noguards: dynamo skips its guard checks on each call after the warm-up
  (`torch.compiler.set_stance(skip_guard_eval_unsafe=True)`), to see what the host's share of a step is.
`HFNANOCHAT_DECODE_PDL=0` in the environment launches the decode kernels without programmatic dependent launch.
Depth 20, bf16, nanochat init, a random 512-token prompt per row (--batch rows, 1 by default: at batch 32 the step runs
cuBLAS GEMMs and Inductor's norms where batch 1 runs the GEMV kernels, so the GEMM variants matter there), 256 greedy
tokens; decode tok/s = batch * 255 / (t(256) - t(1)), medians of 3 after a warm-up (compilation), as in
bench/decode.py. Needs CUDA.
"""

import argparse
import time

import torch
import torch.nn.functional as F
from decode import profile_decode_step
from transformers import CompileConfig
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from hfnanochat import HFNanoChatForCausalLM, config_for_depth
from hfnanochat.inference import decode_kernels, fast_decode
from hfnanochat.inference.engine import Engine

VARIANTS = {"shipped", "cublas", "update", "gemv", "onequery", "combo", "autotune", "cdt", "noguards"}


def one_row_linear_as_reduction():
    linear = F.linear

    def gemv(x, weight, bias=None):
        if bias is None and x.dim() >= 2 and x.shape[:-1].numel() == 1 and not torch.is_grad_enabled():
            return (x.unsqueeze(-2) * weight).sum(-1)
        return linear(x, weight, bias)

    F.linear = gemv


def one_query_attention_as_reductions():
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        if query.shape[2] != 1 or torch.is_grad_enabled():
            return sdpa(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        B, H, _, D = query.shape
        Hkv, S = key.shape[1], key.shape[2]
        scores = (query.view(B, Hkv, H // Hkv, 1, D).float() * key[:, :, None].float()).sum(-1) * scaling
        if attention_mask is not None:
            scores = scores.masked_fill(~attention_mask[..., :S], float("-inf"))  # SDPA's boolean mask
        out = (scores.softmax(-1)[..., None] * value[:, :, None].float()).sum(-2)
        return out.reshape(B, 1, H, D).to(query.dtype), None

    ALL_ATTENTION_FUNCTIONS["sdpa"] = attention


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("variant", help=f"one of {sorted(VARIANTS)}, or several joined by '+'")
    p.add_argument("--tokenizer", default=None, help="chat tokenizer folder: stop tokens and the tool machine live")
    p.add_argument("--batch", type=int, default=1, help="rows decoded at once")
    p.add_argument("--profile", action="store_true", help="print a decode step's GPU time and its top kernels")
    p.add_argument("--top", type=int, default=28, help="kernels listed by --profile")
    args = p.parse_args()
    parts = set(args.variant.split("+"))
    if parts - VARIANTS:
        p.error(f"unknown variant {sorted(parts - VARIANTS)}; choose among {sorted(VARIANTS)}")
    if args.batch < 1:
        p.error(f"--batch {args.batch}: at least 1")
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU (the compiled static-cache step is the thing measured)")
    if "cublas" in parts:
        decode_kernels.available = lambda tensor: False
    if "update" in parts:
        fast_decode.InPlaceCacheBackbone.writes_cache_in_place = lambda self, cache, step: False
    if "gemv" in parts:
        one_row_linear_as_reduction()
    if "onequery" in parts:
        one_query_attention_as_reductions()
    options = {"triton.cudagraphs": True, "combo_kernels": "combo" in parts, "max_autotune": "autotune" in parts,
               "coordinate_descent_tuning": "cdt" in parts}  # fmt: skip

    config = config_for_depth(20, vocab_size=65536, max_seq_len=768)
    model = HFNanoChatForCausalLM.from_config_on_device(config, "cuda").to(torch.bfloat16).eval()
    model.generation_config.compile_config = CompileConfig(mode=None, options=options)
    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    engine = Engine(model, tokenizer)
    prompts = torch.randint(0, 65536, (args.batch, 512), generator=torch.Generator().manual_seed(0)).tolist()

    def run(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in engine.generate(prompts, max_new_tokens=n, temperature=0.0):
            pass
        torch.cuda.synchronize()
        return time.perf_counter() - t

    t0 = time.perf_counter()
    run(1), run(256)
    warmup = time.perf_counter() - t0
    if "noguards" in parts:
        torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)
    t1 = sorted(run(1) for _ in range(3))[1]
    t256 = sorted(run(256) for _ in range(3))[1]
    print(
        f"{args.variant}: decode {args.batch * 255 / (t256 - t1):.0f} tok/s at batch {args.batch} on "
        f"{torch.cuda.get_device_name()} "
        f"(warm-up incl. compilation {warmup:.0f} s)",
        flush=True,
    )
    if args.profile:
        profile_decode_step(run, top=args.top)


if __name__ == "__main__":
    main()
