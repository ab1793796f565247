"""GSM8K (`openai/gsm8k`, config `main`): 7.5K grade-school math problems whose solutions mark every calculation as
`<<48/2=24>>`. Each mark becomes a python tool call (`48/2`) and its output (`24`), so the model learns to call the
calculator mid-answer; the final `#### 72` line stays text (the reward and the evaluation read it)."""

import re

from .common import conversations, first, load_split, require_columns

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
