"""Throughput of the real pretraining step (model + Muon/AdamW + loss, compiled, bf16) on random tokens.

    python bench/pretrain_throughput.py --depth 20                                   # one GPU
    python bench/pretrain_throughput.py --depth 20 --window-pattern SSSL --attn flex_attention
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml bench/pretrain_throughput.py --depth 20

Prints tok/s, MFU (vs. the GPU's bf16 dense peak), the optimizer step's share of the step time and peak memory, and
appends one JSON line per run to --jsonl if given. Same step as train/pretrain.py: the total batch (524,288 tokens)
is split into gradient-accumulation micro-steps of --device-batch-size rows per GPU.
"""

import argparse
import json
import time

import torch
from accelerate import Accelerator

from hfnanochat import HFNanoChatForCausalLM, config_for_depth
from hfnanochat.training.metrics import append_jsonl, peak_flops, peak_memory_gib
from hfnanochat.training.optim import apply_schedule, build_optimizer


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--device-batch-size", type=int, default=32)
    p.add_argument("--total-batch-size", type=int, default=524288)
    p.add_argument("--vocab-size", type=int, default=65536)
    p.add_argument("--window-pattern", default="L")
    p.add_argument("--attn", default="sdpa", help="sdpa | flex_attention | eager | flash_attention_3 ...")
    p.add_argument(
        "--activation-memory-budget",
        type=float,
        default=1.0,
        help="below 1: let the compiler recompute activations to fit this fraction of the saved memory",
    )
    p.add_argument("--steps", type=int, default=8, help="measured optimizer steps")
    p.add_argument("--warmup", type=int, default=3, help="unmeasured steps (compilation)")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--loss-chunk-size", type=int, default=0, help="chunked head + loss (0: full logits)")
    p.add_argument("--jsonl", default=None)
    p.add_argument("--profile", action="store_true", help="profile one more step; print where its GPU time goes")
    args = p.parse_args()
    torch._functorch.config.activation_memory_budget = args.activation_memory_budget
    run(args)


def run(args):
    accelerator = Accelerator(mixed_precision="bf16" if torch.cuda.is_available() else "no")
    device, world = accelerator.device, accelerator.num_processes
    torch.backends.cuda.matmul.allow_tf32 = True
    config = config_for_depth(
        args.depth, vocab_size=args.vocab_size, max_seq_len=args.max_seq_len, window_pattern=args.window_pattern
    )
    config._attn_implementation = args.attn
    model = HFNanoChatForCausalLM.from_config_on_device(config, device)
    model.config.use_cache = False
    flops_per_token = model.estimate_flops(args.max_seq_len)
    optimizer = build_optimizer(model)
    grad_accum = args.total_batch_size // (args.device_batch_size * args.max_seq_len * world)
    if grad_accum < 1 or args.total_batch_size % (args.device_batch_size * args.max_seq_len * world):
        raise ValueError("--total-batch-size must be a multiple of device batch x seq x world size")
    accelerator.gradient_accumulation_steps = grad_accum
    if not args.no_compile:
        model = torch.compile(model, dynamic=False)
    model, optimizer = accelerator.prepare(model, optimizer)

    g = torch.Generator(device=device).manual_seed(accelerator.process_index)
    shape = (args.device_batch_size, args.max_seq_len + 1)
    batches = [torch.randint(0, args.vocab_size, shape, device=device, generator=g) for _ in range(2)]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def train_step(step: int):
        """One optimizer step; returns the last micro-batch loss and when the optimizer started (after a sync)."""
        apply_schedule(optimizer, step, 10**6)
        for micro in range(grad_accum):
            row = batches[micro % 2]
            with accelerator.accumulate(model), accelerator.autocast():
                loss = model(input_ids=row[:, :-1], shift_labels=row[:, 1:], loss_chunk_size=args.loss_chunk_size).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), 1.0)
                    sync()
                    t_opt = time.perf_counter()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        return loss, t_opt

    step_times, optim_times = [], []
    for step in range(args.warmup + args.steps):
        sync()
        t0 = time.perf_counter()
        loss, t_opt = train_step(step)
        sync()
        t1 = time.perf_counter()
        if step >= args.warmup:
            step_times.append(t1 - t0)
            optim_times.append(t1 - t_opt)
        accelerator.print(
            f"step {step}: {t1 - t0:.3f}s (optimizer {1000 * (t1 - t_opt):.1f} ms) loss {loss.item():.3f}"
        )

    dt = sorted(step_times)[len(step_times) // 2]  # median: robust to a stray slow step
    tok_per_sec = args.total_batch_size / dt
    peak = peak_flops(device)
    result = dict(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        world_size=world,
        depth=args.depth,
        seq=args.max_seq_len,
        device_batch=args.device_batch_size,
        grad_accum=grad_accum,
        window_pattern=args.window_pattern,
        attn=args.attn,
        activation_memory_budget=args.activation_memory_budget,
        compile=not args.no_compile,
        loss_chunk_size=args.loss_chunk_size,
        params=sum(p.numel() for p in accelerator.unwrap_model(model).parameters()),
        step_s=dt,
        tok_per_sec=tok_per_sec,
        mfu_pct=100 * flops_per_token * tok_per_sec / (peak * world) if peak else None,
        optimizer_share_pct=100 * sorted(optim_times)[len(optim_times) // 2] / dt,
        peak_mem_gib=peak_memory_gib(device),
        torch=torch.__version__,
    )
    accelerator.print(json.dumps(result))
    if args.jsonl and accelerator.is_main_process:
        append_jsonl(args.jsonl, result)
    if args.profile and device.type == "cuda":
        print_gpu_time(train_step, args.warmup + args.steps, accelerator)


# kernel-name fragments -> what the kernel does (cuBLAS/CUTLASS GEMM names vary between releases)
KERNEL_KINDS = [
    ("matmul", ("gemm", "xmma", "cutlass", "nvjet", "sm90_")),
    ("attention", ("flash", "fmha", "cudnn", "attention")),
    ("compiled (Triton)", ("triton",)),
]


def print_gpu_time(train_step, step: int, accelerator) -> None:
    """Profile one optimizer step and print its GPU time by kind of kernel, then the top kernels."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        train_step(step)
        torch.cuda.synchronize()
    print_kernel_time(prof, 1, accelerator.print)


ANNOTATIONS = ("Optimizer.step#", "Optimizer.zero_grad#", "ProfilerStep#")


def print_kernel_time(prof, steps: int, print_fn=print, top: int = 30) -> float:
    """Print the GPU time per step of a finished torch profile, by kind of kernel, then its top kernels; return the
    GPU seconds per step."""
    # record_function ranges (torch.optim's "Optimizer.step#...", the Trainer's) also appear on the GPU timeline as
    # annotations spanning kernels that are counted already
    events = [
        e
        for e in prof.key_averages()
        if e.device_type.name == "CUDA" and e.self_device_time_total > 0 and not e.key.startswith(ANNOTATIONS)
    ]
    total = sum(e.self_device_time_total for e in events)
    by_kind: dict[str, float] = {}
    for e in events:
        name = e.key.lower()
        kind = next((k for k, frags in KERNEL_KINDS if any(f in name for f in frags)), "other")
        by_kind[kind] = by_kind.get(kind, 0.0) + e.self_device_time_total
    print_fn(
        f"GPU time of one step: {total / 1e6 / steps:.3f} s; "
        + ", ".join(f"{kind} {100 * t / total:.1f}%" for kind, t in sorted(by_kind.items(), key=lambda kv: -kv[1]))
    )
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:top]:
        print_fn(
            f"{100 * e.self_device_time_total / total:6.2f}% {e.count:6d}x "
            f"{e.self_device_time_total / e.count:9.1f} us  {e.key[:100]}"
        )
    return total / 1e6 / steps


if __name__ == "__main__":
    main()
