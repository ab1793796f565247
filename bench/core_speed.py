"""CORE speed: batched evaluation (hfnanochat.evaluation.core) against nanochat's one example per forward.

    python bench/core_speed.py --data DIR                              # GPU: depth 20, every row of the six tasks
    python bench/core_speed.py --data DIR --depth 2 --max-rows 12      # CPU smoke run

DIR holds the six CORE task files of the test data (arc_easy, copa, jeopardy_small, lambada_openai_small,
winograd_wsc, bigbench_operators .jsonl), with core.md's shots, delimiters and task types. The model has random
weights (timing only) and a 65,536-token head like the d20 run; the tokenizer is `--tokenizer DIR` or else a BPE
trained on the tasks' own text. Both ways run in bf16 autocast on GPU. "nanochat" is `core_eval.evaluate_example`'s
way: per example, its options stacked and padded, one forward, full logits, the verdict read back. Both ways give the
same verdicts (checked). Prints examples/s per way; `--jsonl` appends the result. The slow way takes ~7 minutes on
an H200 over every row (arc_easy's 2,376 10-shot rows are 80% of them); `--one-at-a-time-max-rows N` times it on the
first N rows of each task (their shots still drawn from every row) and scales each task's time to all its rows.
"""

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from hfnanochat import HFNanoChatForCausalLM, config_for_depth
from hfnanochat.evaluation import core
from hfnanochat.tokenizer import train_tokenizer
from hfnanochat.training.metrics import append_jsonl

TASKS = [  # label, file, type, shots, random baseline %, delimiter
    ("jeopardy", "jeopardy_small.jsonl", "language_modeling", 10, 0, "\nAnswer: "),
    ("copa", "copa.jsonl", "multiple_choice", 0, 50, " "),
    ("lambada_openai", "lambada_openai_small.jsonl", "language_modeling", 0, 0, " "),
    ("winograd", "winograd_wsc.jsonl", "schema", 0, 50, " "),
    ("bigbench_operators", "bigbench_operators.jsonl", "language_modeling", 10, 0, " "),
    ("arc_easy", "arc_easy.jsonl", "multiple_choice", 10, 25, "\nAnswer: "),  # last: 80% of the rows
]


@torch.no_grad()
def one_at_a_time(model, tokenizer, task: core.CoreTask, rows: list[dict], limit: int = -1) -> list[bool]:
    """nanochat's loop: one forward per example (its options stacked), the verdict synced back before the next.
    `limit` >= 0: only the first `limit` examples (their shots still drawn from all the rows, as in the full run)."""
    device = next(model.parameters()).device
    bos, max_len = tokenizer.bos_token_id, model.config.max_position_embeddings
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    verdicts, start = [], time.time()
    for idx, item in enumerate(rows[:limit] if limit >= 0 else rows):
        if idx and idx % 500 == 0:  # a rate even if the run is cut in the middle of the longest task
            print(f"  {task.label}: {idx}/{len(rows)} one at a time, {idx / (time.time() - start):.1f}/s", flush=True)
        shots = [rows[i] for i in core.fewshot_indices(idx, len(rows), task.num_fewshot)]
        prompts = core.render_prompts(task.task_type, item, task.delimiter, shots)
        ids = tokenizer(prompts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        spans = [core.crop_left(*s, max_len)[:3] for s in core.scored_spans(task.task_type, [[bos, *t] for t in ids])]
        width = max(len(t) for t, _, _ in spans)
        x = torch.tensor([t + [bos] * (width - len(t)) for t, _, _ in spans], device=device)
        with autocast:
            logits = model(input_ids=x).logits.float()
        losses = F.cross_entropy(logits.transpose(1, 2), torch.roll(x, -1, 1), reduction="none")
        if task.task_type == "language_modeling":
            _, s, e = spans[0]
            verdicts.append(torch.equal(logits[0, s - 1 : e - 1].argmax(-1), x[0, s:e]))
        else:
            means = [losses[i, s - 1 : e - 1].mean().item() for i, (_, s, e) in enumerate(spans)]
            verdicts.append(means.index(min(means)) == item["gold"])
    return verdicts


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="folder with the six CORE task .jsonl files")
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--vocab-size", type=int, default=65536, help="model vocabulary (the head's width)")
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: a BPE trained on the tasks' text)")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per forward, batched way")
    p.add_argument("--max-rows", type=int, default=-1, help="rows per task (-1: all)")
    p.add_argument(
        "--one-at-a-time-max-rows", type=int, default=-1, help="time the slow way on this many rows per task (-1: all)"
    )
    p.add_argument("--jsonl", default=None)
    args = p.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tasks = [core.CoreTask(lab, Path(args.data) / f, kind, shots, d, base) for lab, f, kind, shots, base, d in TASKS]
    all_rows = {t.label: core.load_rows(t) for t in tasks}
    rows = {label: core.select_rows(r, args.max_rows) for label, r in all_rows.items()}
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        texts = [v for rs in all_rows.values() for r in rs for v in r.values() if isinstance(v, str)]
        texts += [o for rs in all_rows.values() for r in rs for o in r.get("choices", r.get("context_options", []))]
        tokenizer = train_tokenizer(texts, vocab_size=min(4096, args.vocab_size))
    config = config_for_depth(
        args.depth,
        vocab_size=max(args.vocab_size, len(tokenizer)),
        max_seq_len=args.max_seq_len,
        bos_token_id=tokenizer.bos_token_id,
    )
    config.init_scheme = "2026"  # a random, non-zero head: the verdicts are not all ties
    model = HFNanoChatForCausalLM.from_config_on_device(config, device).eval()
    n_examples = sum(len(r) for r in rows.values())
    print(f"depth {args.depth}, {device}, {n_examples} examples in {len(tasks)} tasks")

    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.time()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out, time.time() - t0

    small = tasks[2]  # warm-up (kernels, allocator) on COPA, not timed
    core.evaluate_task(model, tokenizer, small, rows[small.label][:8], batch_size=args.batch_size, progress=False)
    one_at_a_time(model, tokenizer, small, rows[small.label][:8])
    result = {"depth": args.depth, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    result |= {"examples": n_examples, "batch_size": args.batch_size, "tasks": {}}
    # every task batched first, then every task one at a time (the slow way, ~10x longer on a GPU): a run cut short
    # still has the batched figure and the one-at-a-time rate of the tasks it finished
    batched = {}
    for task in tasks:
        n = len(rows[task.label])
        batched[task.label], t_b = timed(
            lambda t=task: core.evaluate_task(
                model, tokenizer, t, rows[t.label], batch_size=args.batch_size, progress=False
            )
        )
        result["tasks"][task.label] = {"examples": n, "batched_s": t_b}
        print(f"{task.label:<20} {n:5d} examples | batched {n / t_b:8.1f}/s ({t_b:.1f} s)", flush=True)
    result["batched_s"] = sum(r["batched_s"] for r in result["tasks"].values())
    result["batched_examples_per_s"] = n_examples / result["batched_s"]
    print(f"all: batched {result['batched_examples_per_s']:.1f} examples/s ({result['batched_s']:.1f} s)", flush=True)
    for task in tasks:
        single, t_s = timed(
            lambda t=task: one_at_a_time(model, tokenizer, t, rows[t.label], args.one_at_a_time_max_rows)
        )
        agree = sum(a == b for a, b in zip(batched[task.label].correct, single)) / len(single)
        n, record = len(single), result["tasks"][task.label]
        # a capped slow run is scaled to the task's rows at its own rate
        record |= {"one_at_a_time_examples": n, "one_at_a_time_s": t_s * record["examples"] / n}
        record["verdicts_agree"] = agree
        print(f"{task.label:<20} {n:5d} examples | one at a time {n / t_s:8.1f}/s ({t_s:.1f} s) | batched "
              f"{n / record['batched_s']:8.1f}/s | same verdicts {agree:.1%}", flush=True)  # fmt: skip
    result["one_at_a_time_s"] = sum(r["one_at_a_time_s"] for r in result["tasks"].values())
    result["one_at_a_time_examples_timed"] = sum(r["one_at_a_time_examples"] for r in result["tasks"].values())
    result["one_at_a_time_examples_per_s"] = n_examples / result["one_at_a_time_s"]
    print(
        f"all: batched {result['batched_examples_per_s']:.1f} examples/s ({result['batched_s']:.1f} s), one at a time "
        f"{result['one_at_a_time_examples_per_s']:.1f} examples/s ({result['one_at_a_time_s']:.1f} s): "
        f"x{result['one_at_a_time_s'] / result['batched_s']:.1f}"
    )
    print(json.dumps(result))
    if args.jsonl:
        append_jsonl(args.jsonl, result)


if __name__ == "__main__":
    main()
