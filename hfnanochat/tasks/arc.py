"""ARC (`allenai/ai2_arc`, configs ARC-Easy and ARC-Challenge) as nanochat's multiple choice. Train: 2.3K Easy,
1.1K Challenge. The labels are the dataset's own (mostly A-D, a few rows use 1-4 or have 3 or 5 choices)."""

from .common import conversations, first, load_split, render_mc, require_columns

SOURCE = "allenai/ai2_arc"


def arc_conversation(question: str, labels: list[str], texts: list[str], answer: str) -> dict:
    if answer not in labels:
        raise ValueError(f"ARC answer {answer!r} is not one of the labels {labels}")
    return {
        "messages": [
            {"role": "user", "content": render_mc(question, labels, texts)},
            {"role": "assistant", "content": answer},
        ]
    }


def arc(
    subset: str = "ARC-Easy",
    split: str = "train",
    *,
    source: str = SOURCE,
    stop: int | None = None,
    num_proc: int | None = None,
):
    if subset not in ("ARC-Easy", "ARC-Challenge"):
        raise ValueError(f"ARC subset must be ARC-Easy or ARC-Challenge, got {subset!r}")
    rows = load_split(source, split, subset)
    require_columns(rows, ["question", "choices", "answerKey"], f"{subset}/{split} ({source})")

    def convert(row):
        return arc_conversation(row["question"], row["choices"]["label"], row["choices"]["text"], row["answerKey"])

    return conversations(first(rows, stop), convert, subset, num_proc=num_proc)
