"""Prefill and decode throughput: our Engine against transformers' `generate`, on random weights.

    python bench/decode.py                                                    # d20, bf16, prompt 512, 256 new tokens
    python bench/decode.py --depth 2 --prompt-len 16 --new-tokens 8 --device cpu   # smoke run (the test runs this)
    python bench/decode.py --tokenizer out/tokenizer      # the engine with stop tokens and the tool machine live

Four configurations per batch size (default 1 and 32), one JSON line each:
- engine / dynamic: `Engine(cache_implementation="dynamic")`, eager;
- engine / static: `StaticCache` + the model's compiled forward (compiled on CUDA only, like `generate`);
- generate / dynamic: `model.generate(do_sample=False)`;
- generate / static: `model.generate(cache_implementation="static")`, which transformers compiles on CUDA.

Timing: greedy, no stop tokens, so every row makes exactly --new-tokens tokens. A run of 1 new token is the prefill
(forward over the prompt, first sample), a run of N new tokens is prefill + N-1 decode steps; so prefill tok/s =
batch * prompt / t(1) and decode tok/s = batch * (N-1) / (t(N) - t(1)), the same definition for both implementations
and no per-step host sync added to `generate` (a streamer would add one). Each figure is the median of --repeats runs
after one warm-up run of each length (compilation happens there; dynamo is reset between configurations so each
compiles its own graphs). Weights are nanochat's init, cast to --dtype; the prompts are random token ids.

With --tokenizer (a folder from train/tokenizer.py) the engine runs as in chat and RL: stop tokens and the python-tool
state machine are checked on every token of every row. Rates then count the tokens the rows really made (a row that
samples a stop token ends early).
"""

import argparse
import json
import time

import torch

from hfnanochat import HFNanoChatForCausalLM, config_for_depth
from hfnanochat.inference.engine import Engine
from hfnanochat.training.metrics import append_jsonl, peak_memory_gib

CONFIGS = [("engine", "dynamic"), ("engine", "static"), ("generate", "dynamic"), ("generate", "static")]


def make_runner(model, impl: str, cache: str, prompts: torch.Tensor, compile: bool, tokenizer=None):
    """A function n -> tokens made, that generates up to n greedy tokens for every prompt row."""
    if impl == "engine":
        engine = Engine(model, tokenizer, cache_implementation=cache, compile=compile)
        rows = prompts.tolist()

        def run(n):
            return sum(
                sum(t is not None for t in tokens)
                for tokens, _ in engine.generate(rows, max_new_tokens=n, temperature=0.0)
            )

        return run
    ids = prompts.to(model.device)
    extra = {"cache_implementation": "static"} if cache == "static" else {}

    def run(n):
        model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, eos_token_id=None,
            pad_token_id=0, **extra,
        )  # fmt: skip
        return ids.shape[0] * n  # no stop token: every row makes n

    return run


def timed(run, n: int, repeats: int, sync) -> tuple[float, int]:
    """Median wall time of `repeats` runs of n new tokens (robust to a stray slow run), and the tokens one run made."""
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        made = run(n)
        sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2], made


def timeline(intervals: list[tuple[float, float]], short_gap: float = 5.0) -> tuple[float, float, float, float]:
    """(span, busy, short gaps, long gaps) of GPU events given as (start, end) in time order. Kernels launched with
    programmatic dependent launch start before the one ahead of them ends, so busy time is the union of the intervals,
    not the sum of their lengths; a gap under `short_gap` is launch to launch, a longer one waits for the host."""
    busy = short = long = 0.0
    end = intervals[0][0]
    for start, stop in intervals:
        gap = start - end
        if gap >= short_gap:
            long += gap
        elif gap > 0:
            short += gap
        busy += max(stop - max(start, end), 0.0)
        end = max(end, stop)
    return end - intervals[0][0], busy, short, long


def profile_decode_step(run, steps: int = 32, top: int = 28) -> None:
    """Print where a decode step's time goes: `run(n)` generates n tokens; a step is the GPU events of a generation
    of 1 + `steps` tokens after those of one of 1 (prefill, first sample), averaged. The GPU timeline splits into
    kernel time, short gaps (launch to launch inside a CUDA graph) and long gaps (the GPU waiting for the host)."""
    from torch.profiler import ProfilerActivity, profile

    def events(n):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            run(n)
        return sorted((e for e in prof.events() if e.device_type.name == "CUDA"), key=lambda e: e.time_range.start)

    prefill = events(1)
    decode = events(1 + steps)[len(prefill) :]
    per_kernel = {}
    for e in decode:
        us, count = per_kernel.get(e.key, (0.0, 0))
        per_kernel[e.key] = (us + e.time_range.elapsed_us() / steps, count + 1 / steps)
    wall, busy, short, long = timeline([(e.time_range.start, e.time_range.end) for e in decode])
    print(
        f"per decode step: {wall / steps:.0f} us of GPU timeline = {busy / steps:.0f} us with kernels or copies "
        f"running ({len(decode) / steps:.0f} of them) + {short / steps:.0f} us of gaps under 5 us (launch to "
        f"launch inside a graph) + {long / steps:.0f} us of longer gaps (the GPU waiting for the host); prefill "
        f"{sum(e.time_range.elapsed_us() for e in prefill) / 1000:.2f} ms of kernels",
        flush=True,
    )
    for key, (us, count) in sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"{us:8.1f} us/step {count:6.1f}/step {us / count:7.2f} us each  {key[:90]}", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--vocab-size", type=int, default=65536)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--batch-sizes", default="1,32")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--configs", default=",".join(f"{i}/{c}" for i, c in CONFIGS), help="subset, e.g. engine/static")
    p.add_argument("--jsonl", default=None, help="also append the JSON lines to this file")
    p.add_argument("--tokenizer", default=None, help="chat tokenizer folder: the engine runs with stops and the tool")
    p.add_argument("--profile", action="store_true", help="CUDA: also profile a decode step of engine/static")
    p.add_argument("--top", type=int, default=28, help="kernels listed by --profile")
    args = p.parse_args()
    if args.new_tokens < 2 or args.prompt_len < 1 or args.repeats < 1:
        p.error("--new-tokens must be >= 2 (a decode step to time), --prompt-len and --repeats >= 1")
    configs = [tuple(c.split("/")) for c in args.configs.split(",")]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        p.error(f"unknown --configs {unknown}; choose among {[f'{i}/{c}' for i, c in CONFIGS]}")

    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    config = config_for_depth(args.depth, vocab_size=args.vocab_size, max_seq_len=args.prompt_len + args.new_tokens)
    model = HFNanoChatForCausalLM.from_config_on_device(config, device)
    model = model.to(dtype=getattr(torch, args.dtype)).eval()
    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        if len(tokenizer) > args.vocab_size:
            p.error(f"--tokenizer has {len(tokenizer)} tokens, more than --vocab-size {args.vocab_size}")
    on_cuda = device.type == "cuda"

    def sync():
        if on_cuda:
            torch.cuda.synchronize(device)

    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        g = torch.Generator().manual_seed(batch_size)
        prompts = torch.randint(0, args.vocab_size, (batch_size, args.prompt_len), generator=g)
        for impl, cache in configs:
            torch._dynamo.reset()
            if on_cuda:  # each configuration's own peak, its warm-up included (what a GPU must hold to run it)
                torch.cuda.reset_peak_memory_stats(device)
            run = make_runner(model, impl, cache, prompts, compile=on_cuda and cache == "static", tokenizer=tokenizer)
            run(1), run(args.new_tokens)  # warm-up, compilation
            (t_prefill, made_prefill), (t_total, made) = (
                timed(run, 1, args.repeats, sync),
                timed(run, args.new_tokens, args.repeats, sync),
            )
            result = dict(
                impl=impl, cache=cache, compiled=on_cuda and cache == "static", batch=batch_size,
                depth=args.depth, dtype=args.dtype, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                tool_machine=impl == "engine" and tokenizer is not None, tokens_made=made,
                prefill_tok_s=batch_size * args.prompt_len / t_prefill,
                decode_tok_s=(made - made_prefill) / max(t_total - t_prefill, 1e-9),
                total_s=t_total,
                peak_mem_gib=peak_memory_gib(device),
                device=torch.cuda.get_device_name(device) if on_cuda else "cpu",
                torch=torch.__version__,
            )  # fmt: skip
            print(json.dumps(result), flush=True)
            if args.jsonl:
                append_jsonl(args.jsonl, result)
            if args.profile and on_cuda and (impl, cache) == ("engine", "static"):
                print(f"engine/static, batch {batch_size}:", flush=True)
                profile_decode_step(run, top=args.top)


if __name__ == "__main__":
    main()
