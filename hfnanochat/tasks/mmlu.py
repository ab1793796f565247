"""MMLU (`cais/mmlu`) as nanochat's multiple choice. Mid-training uses the `auxiliary_train` config: 100K rows drawn
from ARC, MC_TEST, OBQA and RACE (not MMLU's own subjects). Each row: question, 4 choices, answer index."""

from .common import conversations, first, load_split, render_mc, require_columns

SOURCE = "cais/mmlu"
LETTERS = ("A", "B", "C", "D")


def mmlu_conversation(question: str, choices: list[str], answer: int) -> dict:
    if len(choices) != len(LETTERS):
        raise ValueError(f"MMLU rows have 4 choices, this one has {len(choices)}")
    if not isinstance(answer, int) or not 0 <= answer < len(LETTERS):
        raise ValueError(f"MMLU answer must be an index 0-3, got {answer!r}")
    return {
        "messages": [
            {"role": "user", "content": render_mc(question, LETTERS, choices)},
            {"role": "assistant", "content": LETTERS[answer]},
        ]
    }


def _convert(row: dict) -> dict:
    # auxiliary_train rows arrive wrapped in a "train" struct on the Hub (nanochat unwraps it the same way)
    row = row["train"] if isinstance(row.get("train"), dict) else row
    return mmlu_conversation(row["question"], row["choices"], row["answer"])


def mmlu(
    subset: str = "auxiliary_train",
    split: str = "train",
    *,
    source: str = SOURCE,
    stop: int | None = None,
    num_proc: int | None = None,
):
    rows = load_split(source, split, subset)
    name = f"MMLU {subset}/{split} ({source})"
    if "train" not in rows.column_names:
        require_columns(rows, ["question", "choices", "answer"], name)
    return conversations(first(rows, stop), _convert, f"MMLU {subset}", num_proc=num_proc)
