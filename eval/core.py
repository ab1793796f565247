"""CORE of a base model: nanochat's `base_eval.py` (the DCLM CORE metric, 22 in-context-learning tasks).

    python eval/core.py --model out/pretrain/final                               # downloads the bundle once
    python eval/core.py --model out/pretrain/final --bundle PATH --max-per-task 500 --out core.json
    accelerate launch eval/core.py --model out/pretrain/final                    # examples split over the GPUs

Notable:
- The rules (few-shot draw, prompts, scored spans, centring) are nanochat's, in `hfnanochat.evaluation.core`;
  `--max-per-task N` keeps the first N rows after nanochat's Random(1337) shuffle, so capped runs compare with its
  (pretraining evaluates with 500).
- Batched: `--batch-size` sequences per forward, bf16 autocast on GPU, losses in fp32.
- A task that cannot run (missing file, malformed row, unknown name or type) is skipped with a message, the others
  still run; `--out` JSON: {"core", "tasks": {label: {"accuracy", "centered", ...}}, "skipped": {label: reason}}.
- `--report-dir DIR` adds a "core" section (column BASE of the summary) to the run's report.md.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from transformers import AutoModelForCausalLM, AutoTokenizer

import hfnanochat  # noqa: F401  (registers our model with the Auto classes)
from hfnanochat.evaluation.core import BundleError, download_bundle, evaluate_core
from hfnanochat.report import report_section, write_report
from hfnanochat.training.metrics import peak_memory_gib

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--model", required=True, help="model folder (or Hub id) with its tokenizer")
    p.add_argument("--bundle", default=None, help="eval bundle folder (default: download to ~/.cache/hfnanochat)")
    p.add_argument("--max-per-task", type=int, default=-1, help="examples per task after the shuffle (-1: all)")
    p.add_argument("--tasks", default=None, help="comma-separated task labels (default: every task of the bundle)")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per forward pass")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--report-dir", default=None, help="add a 'core' section to this report folder")
    return p.parse_args(argv)


def fail(message: str):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    if args.batch_size < 1:
        fail(f"--batch-size {args.batch_size}: needs at least one sequence")
    model_dir = Path(args.model)
    if model_dir.is_dir():
        if not (model_dir / "config.json").is_file():
            fail(f"--model {model_dir} holds no config.json: not a model folder")
        if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
            fail(f"--model {model_dir} holds no tokenizer ({', '.join(TOKENIZER_FILES)}): save one beside the model")
    accelerator = Accelerator()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.bos_token_id is None:
        fail(f"--model {args.model}: the tokenizer has no BOS token, which CORE prepends to every prompt")
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(accelerator.device)

    try:
        bundle = Path(args.bundle) if args.bundle else download_bundle()
        tasks = [t.strip() for t in args.tasks.split(",")] if args.tasks else None
        results = evaluate_core(
            model, tokenizer, bundle, max_per_task=args.max_per_task, tasks=tasks, batch_size=args.batch_size
        )
    except (BundleError, OSError) as e:
        fail(str(e))
    results.update(model=str(args.model), bundle=str(bundle))

    if accelerator.is_main_process:
        ran = len(results["tasks"])
        print(
            f"CORE {results['core']:.4f} over {ran} task(s)"
            + (f", {len(results['skipped'])} skipped" if results["skipped"] else "")
        )
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
        if args.report_dir:
            metrics = {"CORE": results["core"]} | {k: v["centered"] for k, v in results["tasks"].items()}
            config = dict(model=str(args.model), max_per_task=args.max_per_task, skipped=results["skipped"] or "none")
            config["processes"] = accelerator.num_processes
            report_section(
                args.report_dir, "core", config=config, metrics=metrics, column="BASE", wall_time_s=time.time() - t0,
                peak_memory_gib=peak_memory_gib(accelerator.device),
            )  # fmt: skip
            write_report(args.report_dir)
    accelerator.end_training()
    return results


if __name__ == "__main__":
    main()
