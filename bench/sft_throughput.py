"""SFTTrainer's tokens/s and MFU on GSM8K, next to the pretraining step's at the same depth, in one command.

    python bench/sft_throughput.py --gsm8k gsm8k                  # one GPU: d12, SFT + pretraining step
    python bench/sft_throughput.py --gsm8k gsm8k --stage midtrain # packed rows, all tokens trained
    python bench/sft_throughput.py --gsm8k gsm8k --depth 2 --max-rows 16 --no-pretrain  # CPU smoke run

No pretraining run is needed first: the base model is nanochat's initialisation at --depth, saved with a chat
tokenizer trained on the GSM8K conversations themselves (throughput does not depend on what the weights know). The
stage runs as a user runs it (`python train/sft.py --model BASE --data gsm8k.jsonl ...`, extra flags passed through
after `--`), and its `metrics.jsonl` gives tokens/s (TRL's count of real, non-padding tokens) and MFU. Unless
--no-pretrain, `bench/pretrain_throughput.py` then measures the compiled pretraining step for the same depth, context
and vocabulary. One JSON line per measurement, also appended to --jsonl.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from hfnanochat import HFNanoChatForCausalLM, config_for_depth, tasks
from hfnanochat.tokenizer import render_conversation, train_tokenizer
from hfnanochat.training.export import save_final
from hfnanochat.training.metrics import append_jsonl

ROOT = Path(__file__).resolve().parents[1]


def build_base(conversations, out: Path, depth: int, max_seq_len: int, vocab_size: int) -> int:
    """A freshly initialised base model + chat tokenizer in `out`, as pretraining leaves them. Returns the vocab."""
    texts = [m["content"] for conv in conversations for m in conv["messages"] if isinstance(m["content"], str)]
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    config = config_for_depth(depth, vocab_size=len(tokenizer), max_seq_len=max_seq_len)
    model = HFNanoChatForCausalLM.from_config_on_device(config, "cpu")
    save_final(model, tokenizer, out)
    longest = max(
        len(render_conversation(tokenizer, conv["messages"], max_tokens=max_seq_len + 1)[0]) for conv in conversations
    )
    if longest > max_seq_len:
        raise ValueError(f"a conversation has {longest} tokens, more than --max-seq-len {max_seq_len}")
    return len(tokenizer)


def run(cmd: list[str]) -> str:
    print("$", " ".join(cmd), flush=True)
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        sys.stderr.write(result.stdout[-4000:] + result.stderr[-4000:])
        raise SystemExit(f"{cmd[1]} failed with exit code {result.returncode}")
    return result.stdout


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gsm8k", default="openai/gsm8k", help="GSM8K: Hub id or a local folder with train.jsonl")
    p.add_argument("--stage", choices=["sft", "midtrain"], default="sft")
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--vocab-size", type=int, default=8192, help="of the tokenizer trained on the conversations")
    p.add_argument("--max-rows", type=int, default=2000, help="conversations to train on")
    p.add_argument("--skip-steps", type=int, default=3, help="first logged steps left out of the medians (warm-up)")
    p.add_argument("--no-pretrain", action="store_true", help="skip the pretraining-step measurement")
    p.add_argument("--pretrain-device-batch-size", type=int, default=32)
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
        vocab = build_base(conversations, out / "base", args.depth, args.max_seq_len, args.vocab_size)

        run_dir = out / args.stage
        run(
            [
                sys.executable,
                f"train/{args.stage}.py",
                "--model",
                str(out / "base"),
                "--out",
                str(run_dir),
                "--no-recipe",
                "--data",
                str(data),
                "--max-rows",
                str(args.max_rows),
                "--save-every",
                "0",
                *args.stage_args,
            ]
        )
        steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        timed = [s for s in steps[args.skip_steps :] if s.get("tok_per_sec")]
        if not timed:
            raise SystemExit(f"{len(steps)} logged steps: too few to time after --skip-steps {args.skip_steps}")
        report(dict(
            loop=f"SFTTrainer ({args.stage})", depth=args.depth, max_seq_len=args.max_seq_len, vocab=vocab,
            steps=len(steps), timed_steps=len(timed), stage_args=args.stage_args,
            tok_per_sec=statistics.median(s["tok_per_sec"] for s in timed),
            mfu_pct=statistics.median(s["mfu"] for s in timed) if "mfu" in timed[0] else None,
            first_loss=steps[0]["loss"], last_loss=steps[-1]["loss"],
        ), args.jsonl)  # fmt: skip

        if not args.no_pretrain:
            rows = args.pretrain_device_batch_size
            stdout = run([sys.executable, "bench/pretrain_throughput.py", "--depth", str(args.depth),
                          "--max-seq-len", str(args.max_seq_len), "--vocab-size", str(vocab),
                          "--device-batch-size", str(rows), "--total-batch-size", str(rows * args.max_seq_len * 8),
                          "--steps", "4", "--warmup", "2", "--loss-chunk-size", "8192"])  # fmt: skip
            step = json.loads(stdout.strip().splitlines()[-1])
            report(
                dict(
                    loop="pretraining step",
                    depth=args.depth,
                    max_seq_len=args.max_seq_len,
                    vocab=vocab,
                    device_batch=rows,
                    tok_per_sec=step["tok_per_sec"],
                    mfu_pct=step["mfu_pct"],
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
