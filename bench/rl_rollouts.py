"""RL rollouts: our engine (train/rl.py's `rollout_func`) against TRL's default generation path, same prompts.

    python bench/rl_rollouts.py --model out/sft/final --data ../data/gsm8k/train.jsonl     # a real SFT model
    python bench/rl_rollouts.py --depth 12 --tokenizer out/tokenizer                         # random weights
    python bench/rl_rollouts.py --depth 2 --vocab-size 512 --tokenizer TOK --prompts 2 --samples 2 --new-tokens 8 \
        --device cpu                                                                           # CPU smoke run

Random weights rarely stop, so their rows run to --new-tokens: the figure is then decode speed at RL's batch shape.

One RL step's rollouts: --prompts GSM8K questions x --samples completions, temperature 1, top-k 50, up to
--new-tokens tokens, as `GRPOTrainer` asks for them on one process:
- engine: `hfnanochat.training.rl.EngineRollout` (the calculator live, one prefill per prompt fanned out to its samples,
  --prompts-per-call prompts per call; static cache and compiled decode on CUDA);
- trl: `GRPOTrainer._generate_single_turn`, TRL's own code for a trainer without `rollout_func` (`model.generate` on
  the whole left-padded generation batch, each prompt repeated --samples times, `disable_compile=True`).

Each figure is the median of --repeats timed runs after one warm-up run (compilation happens there). Tokens count
what the rows really made (a row that stops early makes fewer). --precision: `autocast` (fp32 weights under bf16
autocast, how train/rl.py runs the engine), `bf16` (weights cast), `fp32`. One JSON line per implementation.
"""

import argparse
import contextlib
import json
import os
import time

import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="HF model folder with its tokenizer (default: random weights)")
    p.add_argument("--depth", type=int, default=12, help="random weights: nanochat depth")
    p.add_argument("--tokenizer", default=None, help="random weights: chat tokenizer folder")
    p.add_argument("--vocab-size", type=int, default=65536, help="random weights: the head's rows (>= the tokenizer's)")
    p.add_argument("--data", default=None, help="GSM8K train.jsonl for the questions (default: generated questions)")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--prompts-per-call", type=int, default=16)
    p.add_argument("--precision", choices=["autocast", "bf16", "fp32"], default="autocast")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--impls", default="engine,trl")
    p.add_argument("--jsonl", default=None, help="also append the JSON lines to this file")
    args = p.parse_args()
    if (args.model is None) == (args.tokenizer is None):
        p.error("give --model (a folder with its tokenizer), or --depth with --tokenizer (random weights)")
    if min(args.prompts, args.samples, args.new_tokens, args.repeats, args.prompts_per_call) < 1:
        p.error("--prompts, --samples, --new-tokens, --repeats and --prompts-per-call must be >= 1")
    if args.samples < 2:
        p.error("--samples must be >= 2 (GRPO needs a group)")

    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from hfnanochat import HFNanoChatForCausalLM, config_for_depth
    from hfnanochat.tasks.gsm8k import gsm8k_prompts
    from hfnanochat.training.export import set_generation_defaults
    from hfnanochat.training.metrics import append_jsonl, peak_memory_gib
    from hfnanochat.training.rl import EngineRollout, prompt_ids

    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    if args.model:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=True, dtype=torch.float32)
    else:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        if len(tokenizer) > args.vocab_size:
            p.error(f"--tokenizer has {len(tokenizer)} tokens, more than --vocab-size {args.vocab_size}")
        config = config_for_depth(args.depth, vocab_size=args.vocab_size, max_seq_len=1024)
        model = HFNanoChatForCausalLM.from_config_on_device(config, "cpu")
        set_generation_defaults(model, tokenizer)
    model = model.to(device, dtype=torch.bfloat16 if args.precision == "bf16" else torch.float32).eval()
    autocast = (
        (lambda: torch.autocast(device.type, dtype=torch.bfloat16))
        if args.precision == "autocast"
        else contextlib.nullcontext
    )

    if args.data:
        questions, _ = gsm8k_prompts("main", "train", source=args.data, stop=args.prompts)
        questions = list(questions["prompt"])
    else:
        questions = [
            [{"role": "user", "content": f"A box holds {3 + i} rows of {7 + 2 * i} apples. How many apples?"}]
            for i in range(args.prompts)
        ]
    groups = [(prompt_ids(tokenizer, q), args.samples) for q in questions]
    on_cuda = device.type == "cuda"

    def sync():
        if on_cuda:
            torch.cuda.synchronize(device)

    rollout = EngineRollout(tokenizer, max_new_tokens=args.new_tokens, prompts_per_call=args.prompts_per_call)

    def run_engine(step):
        completions = rollout.sample(model, groups, step, autocast)
        return sum(len(c.tokens) for samples in completions for c in samples)

    trainer = None

    def run_trl(step):
        nonlocal trainer
        if trainer is None:  # TRL's own generation config and code path, for a trainer without rollout_func
            config = GRPOConfig(
                output_dir="/tmp/rl_rollouts_bench",
                num_generations=args.samples,
                per_device_train_batch_size=args.samples,
                max_completion_length=args.new_tokens,
                temperature=1.0,
                top_k=50,
                bf16=False,
                gradient_checkpointing=False,
                report_to="none",
                use_cpu=not on_cuda,
            )
            data = datasets.Dataset.from_dict({"prompt": questions})
            trainer = GRPOTrainer(
                model=model, reward_funcs=[lambda completions, **kw: [0.0] * len(completions)], args=config,
                train_dataset=data, processing_class=tokenizer,
            )  # fmt: skip
        rows = [ids for ids, n in groups for _ in range(n)]
        with autocast():
            completion_ids, _ = trainer._generate_single_turn(rows, None, {}, args.samples)
        return sum(len(c) for c in completion_ids)

    runners = {"engine": run_engine, "trl": run_trl}
    for impl in args.impls.split(","):
        if impl not in runners:
            p.error(f"unknown --impls {impl}; choose among {sorted(runners)}")
        run = runners[impl]
        if on_cuda:  # each path's own peak, its warm-up included (what a GPU must hold to run it)
            torch.cuda.reset_peak_memory_stats(device)
        run(0)  # warm-up: compilation, the static cache
        times, made = [], 0
        for r in range(args.repeats):
            sync()
            t0 = time.perf_counter()
            made = run(r + 1)
            sync()
            times.append(time.perf_counter() - t0)
        seconds = sorted(times)[len(times) // 2]
        rollouts = args.prompts * args.samples
        result = dict(
            impl=impl, prompts=args.prompts, samples=args.samples, new_tokens=args.new_tokens,
            prompts_per_call=args.prompts_per_call if impl == "engine" else None, precision=args.precision,
            model=args.model or f"random d{args.depth}", params=sum(p.numel() for p in model.parameters()),
            seconds=seconds, rollouts_per_sec=rollouts / seconds, tokens=made, tok_per_sec=made / seconds,
            peak_mem_gib=peak_memory_gib(device), device=torch.cuda.get_device_name(device) if on_cuda else "cpu",
            torch=torch.__version__,
        )  # fmt: skip
        print(json.dumps(result), flush=True)
        if args.jsonl:
            append_jsonl(args.jsonl, result)


if __name__ == "__main__":
    main()
