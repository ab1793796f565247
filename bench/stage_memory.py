"""Peak GPU memory of each stage of a run, by running each stage's own entry point for a few steps.

    python bench/stage_memory.py --tokenizer tok --depth 20 --vocab-size 65536          # the d20 preset's later stages
    python -m hfnanochat.training.offline_data data/corpus.txt --word-problems 60000 --evals data/evals
    python bench/stage_memory.py --tokenizer tok --depth 8 --stages pretrain,mid,sft,rl,chat_eval,core \\
        --data-dir data/evals --pretrain-args "--max-seq-len 512 --device-batch-size 32 --total-batch-size 65536" \\
        --mid-args "--max-seq-len 512 --device-batch-size 8 --total-batch-size 4096 --no-compile" \\
        --sft-args "--max-seq-len 512 --device-batch-size 4 --examples-per-step 8" \\
        --rl-args "--max-new-tokens 128" --chat-eval-args "--max-new-tokens 256"          # the offline `gpu` preset

What a GPU must hold to run a preset is the largest of its stages' peaks, and a stage's peak does not grow after its
first steps, so each stage runs as a user runs it (`train/*.py`, `eval/*.py`, the preset's flags given with
--STAGE-args; none means the stage's defaults, which are the d20 preset's) for a few steps or problems, and its own
record of `torch.cuda.max_memory_allocated` (metrics.jsonl, or its report section) is read back. Worst cases on
purpose: SFT trains on conversations as long as the model's context (every row full), RL's rollouts and the chat
evaluation's answers run to their token limits (a model that has not learned to stop).

Without `pretrain` in --stages, the later stages start from nanochat's initialisation at --depth, its head
--vocab-size rows wide (the tokenizer may be smaller). The data is generated here (`offline_data`: the corpus, chats,
word problems, the evaluation stand-ins) unless --data-dir gives a folder made by it; the generated corpus is small
(2,000 word problems), too small for pretraining's validation batch at the `gpu` preset's 32 rows of 512, so that
preset's command brings the preset's own data (60,000 word problems, as speedrun.sh makes). One JSON line per stage.
"""

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch
from sft_throughput import build_base, run
from transformers import AutoTokenizer

from hfnanochat.tokenizer import render_conversation
from hfnanochat.training.metrics import append_jsonl

STAGES = ("pretrain", "mid", "sft", "rl", "chat_eval", "core")


def full_context_chats(path: Path, corpus: Path, tokenizer_dir: str, context: int, count: int) -> None:
    """`count` conversations of corpus text that each fill most of a `context`-token row (SFT pads to the longest row
    of a batch, so these give its largest batches)."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    text = corpus.read_text()
    chars = int(context * 4)  # ~4.3 characters a token in English; cut back below until the conversation fits
    with open(path, "w") as f:
        for i in range(count):
            start = (i * 7919 * chars) % max(1, len(text) - 2 * chars)
            size = chars
            while True:
                user, reply = text[start : start + size // 2], text[start + size // 2 : start + size]
                messages = [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
                if len(render_conversation(tokenizer, messages, sys.maxsize)[0]) <= context:
                    break
                size = int(size * 0.9)
            f.write(json.dumps({"messages": messages}) + "\n")


def flag_value(argv: list[str], flag: str) -> int | None:
    """The integer value of `flag` in `argv` (`--flag N` or `--flag=N`), or None."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument(flag, type=int, dest="value")
    return parser.parse_known_args(argv)[0].value


def metrics_peak(run_dir: Path) -> float | None:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return max((r["peak_mem_gib"] for r in rows if r.get("peak_mem_gib") is not None), default=None)


def section_peak(report_dir: Path, name: str) -> float | None:
    return json.loads((report_dir / f"{name}.json").read_text()).get("peak_memory_gib")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", required=True, help="chat tokenizer folder (train/tokenizer.py)")
    p.add_argument("--depth", type=int, default=20)
    p.add_argument(
        "--vocab-size", type=int, default=None, help="head rows of the fresh base (default: the tokenizer's)"
    )
    p.add_argument("--context", type=int, default=2048, help="the fresh base's context")
    p.add_argument("--stages", default="sft,rl,chat_eval,core", help="comma-separated, among: " + ", ".join(STAGES))
    p.add_argument("--data-dir", default=None, help="a folder from `python -m hfnanochat.training.offline_data`")
    for stage in STAGES:
        p.add_argument(f"--{stage.replace('_', '-')}-args", default="", help=f"extra flags for the {stage} stage")
    p.add_argument("--out", default=None, help="keep the stages' folders here (default: a temp folder)")
    p.add_argument("--jsonl", default=None)
    args = p.parse_args()
    stages = args.stages.split(",")
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        p.error(f"--stages {','.join(unknown)}: choose among {', '.join(STAGES)}")
    py = sys.executable
    extra = {stage: shlex.split(getattr(args, f"{stage}_args")) for stage in STAGES}

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.out or tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.data_dir:
            data, corpus = Path(args.data_dir), Path(args.data_dir).parent / "corpus.txt"
        else:
            corpus, data = work / "data" / "corpus.txt", work / "data" / "evals"
            run([py, "-m", "hfnanochat.training.offline_data", str(corpus), "--word-problems", "2000", "--evals",
                 str(data)])  # fmt: skip
        report_dir = work / "report"
        base = work / "base"

        def measure(stage: str, cmd: list[str], peak) -> None:
            t0 = time.monotonic()
            run([py, *cmd, *extra[stage]])
            result = dict(stage=stage, depth=args.depth, command=shlex.join(["python", *cmd, *extra[stage]]),
                          seconds=round(time.monotonic() - t0, 1), peak_mem_gib=peak(),
                          device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")  # fmt: skip
            print(json.dumps(result), flush=True)
            if args.jsonl:
                append_jsonl(args.jsonl, result)

        if "pretrain" in stages:
            run_dir = work / "pretrain"
            measure("pretrain", ["train/pretrain.py", "--depth", str(args.depth), "--tokenizer", args.tokenizer,
                                 "--data", str(corpus), "--num-iterations", "4", "--eval-every", "0",
                                 "--sample-every", "0", "--save-every", "0", "--no-core", "--report-dir", "",
                                 "--out", str(run_dir)], lambda: metrics_peak(run_dir))  # fmt: skip
            base = run_dir / "final"
        else:
            build_base([], base, args.depth, args.context, args.vocab_size, args.tokenizer, one_per_row=False)
        context = json.loads((base / "config.json").read_text())["max_position_embeddings"]
        if "mid" in stages:
            run_dir = work / "mid"
            measure("mid", ["train/sft.py", "--mixture", "mid", "--model", str(base), "--no-recipe", "--data",
                            str(data / "chat.jsonl"), "--max-rows", "1000", "--save-every", "0", "--out",
                            str(run_dir)], lambda: metrics_peak(run_dir))  # fmt: skip
        if "sft" in stages:
            run_dir, chats = work / "sft", work / "full_context_chats.jsonl"
            full_context_chats(chats, corpus, args.tokenizer, flag_value(extra["sft"], "--max-seq-len") or context, 96)
            measure("sft", ["train/sft.py", "--model", str(base), "--no-recipe", "--data", str(chats),
                            "--save-every", "0", "--out", str(run_dir)], lambda: metrics_peak(run_dir))  # fmt: skip
        if "rl" in stages:
            run_dir = work / "rl"
            measure("rl", ["train/rl.py", "--model", str(base), "--data", str(data / "gsm8k" / "main" / "train.jsonl"),
                           "--steps", "2", "--eval-every", "0", "--save-every", "0", "--out", str(run_dir)],
                    lambda: metrics_peak(run_dir))  # fmt: skip
        if "chat_eval" in stages:
            measure("chat_eval", ["eval/chat_eval.py", "--model", str(base), "--data-dir", str(data),
                                  "--max-problems", "16", "--report-dir", str(report_dir)],
                    lambda: section_peak(report_dir, "chat-eval-sft"))  # fmt: skip
        if "core" in stages:
            measure("core", ["eval/core.py", "--model", str(base), "--bundle", str(data / "core"),
                             "--max-per-task", "64", "--report-dir", str(report_dir)],
                    lambda: section_peak(report_dir, "core"))  # fmt: skip


if __name__ == "__main__":
    main()
