"""GSM8K (`openai/gsm8k`, config `main`): 7.5K grade-school math problems whose solutions mark every calculation as
`<<48/2=24>>`. Each mark becomes a python tool call (`48/2`) and its output (`24`), so the model learns to call the
calculator mid-answer; the final `#### 72` line stays text (the reward and the evaluation read it)."""

import logging
import re

import datasets

from .common import conversations, first, load_split, require_columns

logger = logging.getLogger(__name__)

SOURCE = "openai/gsm8k"


def gsm8k_conversation(question: str, answer: str) -> dict:
    """nanochat's parsing: split on `<<...>>`, the last `=` separates expression and result (an expression may hold
    `=` itself, e.g. a comparison). Returned in nanochat's parts form; `to_messages` makes tool calls of it."""
    parts = []
    for piece in re.split(r"(<<[^>]+>>)", answer):
        if piece.startswith("<<") and piece.endswith(">>"):
            inner = piece[2:-2]
            # no "=": nanochat keeps the whole mark as the call, with an empty output
            expr, result = inner.rsplit("=", 1) if "=" in inner else (inner, "")
            parts += [{"type": "python", "text": expr}, {"type": "python_output", "text": result}]
        else:
            parts.append({"type": "text", "text": piece})
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": parts}]}


def gsm8k(
    subset: str = "main",
    split: str = "train",
    *,
    source: str = SOURCE,
    stop: int | None = None,
    num_proc: int | None = None,
):
    rows = load_split(source, split, subset)
    require_columns(rows, ["question", "answer"], f"GSM8K {subset}/{split} ({source})")
    return conversations(
        first(rows, stop),
        lambda row: gsm8k_conversation(row["question"], row["answer"]),
        f"GSM8K {subset}",
        num_proc=num_proc,
    )


# nanochat's answer rule (tasks/gsm8k.py): the number after "####", commas removed, compared as a string
ANSWER = re.compile(r"#### (\-?[0-9\.\,]+)")


def extract_answer(text: str) -> str | None:
    """The number after the first `#### ` in `text`, commas removed; None when there is none (never raises)."""
    match = ANSWER.search(text) if isinstance(text, str) else None
    return match.group(1).strip().replace(",", "") if match else None


def gsm8k_reward(completion: str, reference: str) -> float:
    """1.0 when the completion's `####` answer equals the reference solution's, else 0.0: the RL reward and the
    evaluation's correctness alike. A completion without an answer scores 0."""
    predicted, expected = extract_answer(completion), extract_answer(reference)
    return float(predicted is not None and predicted == expected)


def gsm8k_prompts(
    subset: str = "main",
    split: str = "train",
    *,
    source: str = SOURCE,
    stop: int | None = None,
) -> tuple[datasets.Dataset, int]:
    """(prompts, skipped): GSM8K as RL / evaluation prompts, `prompt` (the question as a one-message chat) and
    `answer` (the reference solution, whose `####` number the reward compares), in nanochat's order (seed-42
    shuffle, then the first `stop`). A row without a question or without a `#### number` in its answer can score
    nothing: it is skipped, and counted in the log and in `skipped`."""
    rows = load_split(source, split, subset)
    require_columns(rows, ["question", "answer"], f"GSM8K {subset}/{split} ({source})")
    rows = first(rows, None)
    total = len(rows)

    def usable(question, answer):
        return isinstance(question, str) and bool(question.strip()) and extract_answer(answer) is not None

    rows = rows.filter(usable, input_columns=["question", "answer"], desc=f"GSM8K {subset}/{split}: checking answers")
    skipped = total - len(rows)
    if skipped:
        logger.warning(f"GSM8K {subset}/{split}: skipped {skipped:,} of {total:,} rows with no question or no '#### '")
    if stop is not None:
        rows = rows.select(range(min(stop, len(rows))))
    prompts = rows.map(
        lambda q: {"prompt": [{"role": "user", "content": q}]},
        input_columns="question",
        remove_columns=[c for c in rows.column_names if c != "answer"],
    )
    return prompts, skipped
