"""SFTTrainer's tokens/s and MFU on GSM8K, next to the pretraining step's at the same depth, in one command.

    python bench/sft_throughput.py --gsm8k gsm8k                  # one GPU: d12, SFT + pretraining step
    python bench/sft_throughput.py --gsm8k gsm8k --stage midtrain # packed rows, all tokens trained
    python bench/sft_throughput.py --gsm8k gsm8k --depth 2 --max-rows 16 --no-pretrain  # CPU smoke run
    python bench/sft_throughput.py --gsm8k gsm8k --stage midtrain --profile   # + where a trainer step's time goes

No pretraining run is needed first: the base model is nanochat's initialisation at --depth, saved with a chat
tokenizer trained on the GSM8K conversations themselves, or --tokenizer's (throughput does not depend on what the
weights know). The stage runs as a user runs it (`python train/sft.py --model BASE --data gsm8k.jsonl ...`, extra
flags passed through after `--`), and its `metrics.jsonl` gives tokens/s (TRL's count of real, non-padding tokens) and
MFU. Unless --no-pretrain, `bench/pretrain_throughput.py` then measures the compiled pretraining step for the same
depth, context, vocabulary and tokens per optimizer step (--total-batch-size), so that both loops pay the optimizer
equally often. One JSON line per measurement, also appended to --jsonl.

--profile runs the stage in this process instead (the same `build` as train/sft.py) and profiles --profile-steps
optimizer steps after the warm-up: their wall time against the GPU's kernel time (the gap is time the GPU waits for
the host), the kernels by kind, and the host's calls that wait for the GPU.
"""

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from pretrain_throughput import print_kernel_time
from transformers import AutoTokenizer, TrainerCallback

from hfnanochat import HFNanoChatForCausalLM, config_for_depth, tasks
from hfnanochat.tokenizer import render_conversation, train_tokenizer
from hfnanochat.training.export import save_final
from hfnanochat.training.metrics import append_jsonl

ROOT = Path(__file__).resolve().parents[1]


def build_base(conversations, out: Path, depth, max_seq_len, vocab_size, tokenizer_dir, one_per_row: bool) -> int:
    """A freshly initialised base model + chat tokenizer in `out`, as pretraining leaves them. Returns the vocab."""
    if tokenizer_dir:  # the head may be wider than the tokenizer: memory and speed at nanochat's 65,536
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        if vocab_size is not None and vocab_size < len(tokenizer):
            raise SystemExit(f"--vocab-size {vocab_size}: smaller than --tokenizer's {len(tokenizer)} tokens")
        vocab_size = vocab_size or len(tokenizer)
    else:
        texts = [m["content"] for conv in conversations for m in conv["messages"] if isinstance(m["content"], str)]
        tokenizer = train_tokenizer(texts, vocab_size=vocab_size or 8192)
        vocab_size = len(tokenizer)
    config = config_for_depth(depth, vocab_size=vocab_size, max_seq_len=max_seq_len)
    model = HFNanoChatForCausalLM.from_config_on_device(config, "cpu")
    save_final(model, tokenizer, out)
    if one_per_row:  # mid-training's packed rows cut conversations anywhere
        longest = max(
            len(render_conversation(tokenizer, conv["messages"], max_tokens=max_seq_len + 1)[0])
            for conv in conversations
        )
        if longest > max_seq_len:
            raise ValueError(f"a conversation has {longest} tokens, more than --max-seq-len {max_seq_len}")
    return vocab_size


def run(cmd: list[str]) -> str:
    print("$", " ".join(cmd), flush=True)
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        sys.stderr.write(result.stdout[-4000:] + result.stderr[-4000:])
        raise SystemExit(f"{cmd[1]} failed with exit code {result.returncode}")
    return result.stdout


class ProfileSteps(TrainerCallback):
    """Profile optimizer steps first+1 ... first+count (host and GPU) and print where their time went."""

    def __init__(self, first: int, count: int):
        self.first, self.count, self.prof = first, count, None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.first:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU]
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                activities.append(ProfilerActivity.CUDA)
            self.prof = profile(activities=activities)
            self.prof.__enter__()
            self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.prof is not None and state.global_step == self.first + self.count:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            wall = (time.perf_counter() - self.t0) / self.count
            self.prof.__exit__(None, None, None)
            gpu = print_kernel_time(self.prof, self.count, top=20)
            print(f"wall time of one step: {wall:.3f} s; the GPU ran kernels {100 * gpu / wall:.1f}% of it")
            host = [e for e in self.prof.key_averages() if e.device_type.name == "CPU"]
            waits = [e for e in host if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "aten::item")]
            for e in sorted(waits, key=lambda e: -e.cpu_time_total):
                print(f"host: {e.key} {e.count / self.count:.0f} per step, {e.cpu_time_total / 1e6 / self.count:.3f} s")
            for e in sorted(host, key=lambda e: -e.self_cpu_time_total)[:12]:
                print(f"host self time: {e.self_cpu_time_total / 1e6 / self.count:.3f} s per step  {e.key[:80]}")
            self.prof = None


def train_profiled(stage: str, argv: list[str], first: int, count: int) -> None:
    """train/sft.py's own build and train, in this process, with the profiler on some of its steps."""
    spec = importlib.util.spec_from_file_location("sft_stage", ROOT / "train" / "sft.py")
    sft = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT / "train"))
    spec.loader.exec_module(sft)
    args = sft.parse_args((["--mixture", "mid"] if stage == "midtrain" else []) + argv)
    trainer, _, _ = sft.build(args)
    trainer.add_callback(ProfileSteps(first, count))
    trainer.train()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gsm8k", default="openai/gsm8k", help="GSM8K: Hub id or a local folder with train.jsonl")
    p.add_argument("--stage", choices=["sft", "midtrain"], default="sft")
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--max-seq-len", type=int, default=2048)
    vocab_help = "of the tokenizer trained on the conversations (default 8192); with --tokenizer, the head's rows"
    p.add_argument("--vocab-size", type=int, default=None, help=vocab_help)
    p.add_argument("--tokenizer", default=None, help="a chat tokenizer folder to use instead of training one")
    p.add_argument("--total-batch-size", type=int, default=65536, help="tokens per optimizer step, both loops")
    p.add_argument("--max-rows", type=int, default=2000, help="conversations to train on")
    p.add_argument("--skip-steps", type=int, default=3, help="first logged steps left out of the medians (warm-up)")
    p.add_argument("--no-pretrain", action="store_true", help="skip the pretraining-step measurement")
    p.add_argument("--pretrain-device-batch-size", type=int, default=32)
    p.add_argument("--profile", action="store_true", help="profile the stage's steps (in this process; GPU)")
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--out", default=None, help="keep the base model and run folders here (default: a temp folder)")
    p.add_argument("--jsonl", default=None)
    p.add_argument("stage_args", nargs="*", help="after --: extra flags for the stage, e.g. -- --device-batch-size 32")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        out.mkdir(parents=True, exist_ok=True)
        conversations = list(tasks.gsm8k("main", "train", source=args.gsm8k, stop=args.max_rows))
        data = out / "gsm8k_train.jsonl"
        with open(data, "w") as f:
            for conv in conversations:
                messages = [{k: v for k, v in m.items() if v is not None} for m in conv["messages"]]
                f.write(json.dumps({"messages": messages}) + "\n")
        vocab = build_base(
            conversations,
            out / "base",
            args.depth,
            args.max_seq_len,
            args.vocab_size,
            args.tokenizer,
            one_per_row=args.stage == "sft",
        )

        run_dir = out / args.stage
        batch = ["--total-batch-size", str(args.total_batch_size)] if args.stage == "midtrain" else []
        stage_argv = ["--model", str(out / "base"), "--out", str(run_dir), "--no-recipe", "--data", str(data),
                      "--max-rows", str(args.max_rows), "--save-every", "0", *batch, *args.stage_args]  # fmt: skip
        if args.profile:
            train_profiled(args.stage, stage_argv, args.skip_steps, args.profile_steps)
        else:
            run([sys.executable, f"train/{args.stage}.py", *stage_argv])
        steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        timed = [s for s in steps[args.skip_steps :] if s.get("tok_per_sec")]
        if not timed:
            raise SystemExit(f"{len(steps)} logged steps: too few to time after --skip-steps {args.skip_steps}")
        report(dict(
            loop=f"SFTTrainer ({args.stage})", depth=args.depth, max_seq_len=args.max_seq_len, vocab=vocab,
            steps=len(steps), timed_steps=len(timed), total_batch=args.total_batch_size, stage_args=args.stage_args,
            tok_per_sec=statistics.median(s["tok_per_sec"] for s in timed),
            mfu_pct=statistics.median(s["mfu"] for s in timed) if "mfu" in timed[0] else None,
            first_loss=steps[0]["loss"], last_loss=steps[-1]["loss"],
            peak_mem_gib=max((s["peak_mem_gib"] for s in steps if s.get("peak_mem_gib") is not None), default=None),
        ), args.jsonl)  # fmt: skip

        if not args.no_pretrain:
            rows = args.pretrain_device_batch_size
            stdout = run([sys.executable, "bench/pretrain_throughput.py", "--depth", str(args.depth),
                          "--max-seq-len", str(args.max_seq_len), "--vocab-size", str(vocab),
                          "--device-batch-size", str(rows), "--total-batch-size", str(args.total_batch_size),
                          "--steps", "4", "--warmup", "2", "--loss-chunk-size", "8192",
                          *(["--profile"] if args.profile else [])])  # fmt: skip
            if args.profile:
                print("\n".join(line for line in stdout.splitlines() if not line.startswith("{")))
            step = json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])
            report(
                dict(
                    loop="pretraining step",
                    depth=args.depth,
                    max_seq_len=args.max_seq_len,
                    vocab=vocab,
                    device_batch=rows,
                    total_batch=args.total_batch_size,
                    tok_per_sec=step["tok_per_sec"],
                    mfu_pct=step["mfu_pct"],
                    peak_mem_gib=step["peak_mem_gib"],
                ),
                args.jsonl,
            )


def report(result: dict, jsonl: str | None):
    """Printed (and appended) as soon as measured: a later measurement that fails or runs out of time loses nothing."""
    result["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(json.dumps(result), flush=True)
    if jsonl:
        append_jsonl(jsonl, result)


if __name__ == "__main__":
    main()
