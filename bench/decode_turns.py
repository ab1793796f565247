"""Calls of different prompt lengths through one Engine, as a chat's turns or RL rollouts make them: ms per call.

    python bench/decode_turns.py                  # d20, bf16, prompts of 400..490 tokens, 64 new tokens each
    python bench/decode_turns.py --fresh-cache    # a new StaticCache per call (the engine before it kept one)

The compiled decode step runs as a CUDA graph recorded over the StaticCache's addresses. The engine keeps its cache
for the next call of the same shape (prompt + new tokens in the same 256-slot bucket); with --fresh-cache it drops
it after every call (`Engine.clear_cache`), so each call allocates a new one, and torch.compile records the graph
again whenever the caching allocator puts it at other addresses (not every time: a freed block of the same size is
often handed back). Prints each call's time after a warm-up cycle (compilation), and the number of CUDA graph
recordings in the timed cycle. Random weights and prompts, greedy. Needs CUDA.
"""

import argparse
import time

import torch
from torch._inductor import cudagraph_trees

from hfnanochat import HFNanoChatForCausalLM, config_for_depth
from hfnanochat.inference.engine import Engine


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--lengths", default="400,410,420,430,440", help="prompt lengths, one call each, per cycle")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--fresh-cache", action="store_true", help="a new StaticCache per call")
    args = p.parse_args()
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU (the compiled static-cache step, replayed as a CUDA graph, is the thing measured)")
    lengths = [int(n) for n in args.lengths.split(",")]
    if min(lengths) < 1 or args.new_tokens < 1:
        p.error("--lengths and --new-tokens must be positive")

    config = config_for_depth(args.depth, vocab_size=65536, max_seq_len=max(lengths) + args.new_tokens)
    model = HFNanoChatForCausalLM.from_config_on_device(config, "cuda").to(torch.bfloat16).eval()
    engine = Engine(model)
    recordings = []
    record = cudagraph_trees.CUDAGraphTreeManager.record_function

    def counted(self, *a, **k):
        recordings.append(1)
        return record(self, *a, **k)

    cudagraph_trees.CUDAGraphTreeManager.record_function = counted
    generator = torch.Generator().manual_seed(0)

    def cycle():
        times = []
        for length in lengths:
            prompt = torch.randint(0, 65536, (length,), generator=generator).tolist()
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in engine.generate(prompt, max_new_tokens=args.new_tokens, temperature=0.0):
                pass
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
            if args.fresh_cache:
                engine.clear_cache()
        return times

    cycle()  # compilation, first recordings
    before = len(recordings)
    times = cycle()
    print(
        f"{'fresh cache per call' if args.fresh_cache else 'cache kept'}: ms per call "
        f"{' '.join(f'{t * 1000:.0f}' for t in times)}, mean {sum(times) / len(times) * 1000:.1f}; "
        f"CUDA graph recordings in these calls: {len(recordings) - before} ({torch.cuda.get_device_name()})"
    )


if __name__ == "__main__":
    main()
