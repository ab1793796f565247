"""SmolTalk (`HuggingFaceTB/smol-smoltalk`): general conversations, the "smol" mix meant for small models.
train is 460K rows, test 24K. Rows are already `messages`; the few malformed ones are skipped and counted."""

from .common import conversations, first, load_split, require_columns

SOURCE = "HuggingFaceTB/smol-smoltalk"


def smoltalk(split: str = "train", *, source: str = SOURCE, stop: int | None = None, num_proc: int | None = None):
    rows = load_split(source, split)
    require_columns(rows, ["messages"], f"SmolTalk ({source})")
    return conversations(first(rows, stop), lambda row: row["messages"], "SmolTalk", num_proc=num_proc)
