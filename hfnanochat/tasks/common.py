"""What every task shares: the one message format, loading a split from the Hub or a local copy, checking rows.

Notable:
- One canonical format for every conversation that reaches training: transformers' `messages` with string content
  everywhere and tool use as an assistant `tool_calls` entry (the `python` tool, `{"code": ...}`) followed by a `tool`
  message. Our chat template renders that as nanochat's inline `<|python_start|>code<|python_end|><|output_start|>
  result<|output_end|>` block inside one assistant turn. Strings everywhere is what Arrow needs: a column cannot mix
  string content with nanochat's list-of-parts content, so `to_messages` turns parts into tool calls.
- `to_messages` is stricter than the renderer: a conversation must end with a finished assistant turn, no message may
  be empty, every python call needs its output right after it (and no output comes without a call), and no text may
  spell a special token ("<|user_end|>"), which `apply_chat_template` would read as the token itself while nanochat's
  renderer keeps it as text. Every conversation that passes renders to exactly `render_conversation`'s ids and mask.
- Bad rows of a big public source are skipped and counted in the log (`conversations`); a user's own file raises a
  ValueError naming the first bad row (`from_conversations`, `drop_long(strict=True)`). Missing columns always
  raise.
- Sources: a Hub dataset id (default) or a local file/folder (a Hub snapshot, or `train.jsonl`/`test.jsonl`), always
  through `datasets`. Tasks shuffle with seed 42 before `stop`, as nanochat's task containers do, so "the first 10K
  SmolTalk rows" are the same rows nanochat takes.
"""

import logging
import os
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import datasets
from datasets import Features, List, Value

from ..tokenizer import SPECIAL_TOKENS, normalize_conversation, render_conversation
from ..training.data import check_hub_dataset

logger = logging.getLogger(__name__)

_TOOL_CALL = {"type": Value("string"), "function": {"name": Value("string"), "arguments": {"code": Value("string")}}}
# Messages without a tool call store tool_calls=None; transformers drops None-valued keys before the template runs.
FEATURES = Features(
    {"messages": List({"role": Value("string"), "content": Value("string"), "tool_calls": List(_TOOL_CALL)})}
)
_CHECKED = Features({**FEATURES, "problem": Value("string")})

# suffix -> `datasets` builder for local copies
LOCAL_KINDS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".arrow": "arrow"}


def python_call(code: str) -> dict:
    """The one tool call our template knows: nanochat's python calculator."""
    return {"type": "function", "function": {"name": "python", "arguments": {"code": code}}}


def to_messages(conversation) -> list[dict]:
    """Any conversation our tokenizer accepts -> the canonical training messages; ValueError when it is malformed.

    Accepted input: {"messages": [...]} or a list of messages, with an optional leading system message (merged into the
    first user message, as nanochat renders it), assistant content as a string or as nanochat's parts
    (text / python / python_output), or transformers' tool calls. The result renders to the same tokens.
    """
    turns, open_turn = normalize_conversation(conversation)  # roles, alternation, part types
    if open_turn:
        raise ValueError("the conversation ends on a tool output: the assistant never finishes its turn")
    if turns[-1][0] != "assistant":
        raise ValueError("the conversation ends with a user message: there is no assistant reply to learn")
    messages = []
    for k, (role, parts) in enumerate(turns):
        where = f"turn {k} ({role}): "
        for _, text in parts:
            for token in SPECIAL_TOKENS:
                if token in text:
                    raise ValueError(
                        where + f"the text spells the special token {token}, which the chat template "
                        "would turn into the token itself (nanochat keeps it as text)"
                    )
        if role == "user":
            if not parts[0][1].strip():
                raise ValueError(where + "empty message")
            messages.append({"role": "user", "content": parts[0][1]})
            continue
        if not any(text.strip() for kind, text in parts if kind != "python_output"):
            raise ValueError(where + "empty assistant turn (no text and no tool call)")
        content, waiting_for_output = "", False
        for kind, text in parts:
            if kind == "python_output" and not waiting_for_output:
                raise ValueError(where + "a tool output with no python call right before it")
            if kind != "python_output" and waiting_for_output:
                raise ValueError(where + "a python call with no tool output right after it")
            if kind == "text":
                content += text
            elif kind == "python":
                if not text.strip():
                    raise ValueError(where + "an empty python call")
                messages.append({"role": "assistant", "content": content, "tool_calls": [python_call(text)]})
                content, waiting_for_output = "", True
            else:
                messages.append({"role": "tool", "content": text})
                waiting_for_output = False
        if waiting_for_output:
            raise ValueError(where + "a python call with no tool output right after it")
        messages.append({"role": "assistant", "content": content})
    return messages


def render_mc(question: str, letters, choices) -> str:
    """nanochat's multiple-choice prompt. The letter comes *after* its choice ("- Paris=A"): a small model binds a
    letter to the text just before it more easily than to text that follows. The answer is the bare letter, no space
    ("A" and " A" are different tokens, and evaluation reads the logit of "A")."""
    lines = "".join(f"- {choice}={letter}\n" for letter, choice in zip(letters, choices, strict=True))
    return f"Multiple Choice question: {question}\n{lines}\nRespond only with the letter of the correct answer."


def _split_files(root: Path, name: str | None, split: str) -> list[str]:
    """Files of `split` in a local folder: a Hub snapshot (`{name}/{split}-*.parquet`, `{split}/...`) or a plain
    `{split}.jsonl`."""
    base = root / name if name and (root / name).is_dir() else root
    found = []
    for p in sorted(base.rglob("*")):
        if not p.is_file() or p.suffix not in LOCAL_KINDS or any(s.startswith(".") for s in p.relative_to(base).parts):
            continue
        stem = p.name.split(".")[0]
        if stem == split or stem.startswith((f"{split}-", f"{split}_")) or p.parent.name == split:
            found.append(str(p))
    return found


def load_split(source: str, split: str, name: str | None = None) -> datasets.Dataset:
    """Rows of one split: `source` is a Hub dataset id (loaded with `load_dataset(source, name, split=split)`), a local
    data file (taken as that split), or a local folder holding the split's files."""
    path = Path(os.path.expanduser(source))
    if path.is_file():
        files = [str(path)]
    elif path.is_dir():
        files = _split_files(path, name, split)
        if not files:
            raise ValueError(
                f"{source}: no {split!r} files (expected {split}.jsonl, {split}-*.parquet or a {split}/ "
                f"folder{f', under {name}/' if name else ''})"
            )
    elif path.suffix in LOCAL_KINDS or source.startswith(("/", ".", "~")):
        raise ValueError(f"data path {source!r} does not exist")
    else:
        check_hub_dataset(source)
        return datasets.load_dataset(source, name, split=split)
    kinds = {LOCAL_KINDS.get(Path(f).suffix) for f in files}
    if None in kinds or len(kinds) > 1:
        raise ValueError(f"{source}: expected files of one kind among {', '.join(LOCAL_KINDS)}, got {files}")
    return datasets.load_dataset(kinds.pop(), data_files=files, split="train")


def require_columns(rows: datasets.Dataset, columns, name: str) -> None:
    missing = [c for c in columns if c not in rows.column_names]
    if missing:
        raise ValueError(
            f"{name}: the dataset has columns {rows.column_names}, but this task needs {list(columns)} "
            f"(missing {missing})"
        )


def first(rows: datasets.Dataset, stop: int | None) -> datasets.Dataset:
    """nanochat's task order: shuffled with seed 42, then the first `stop` rows."""
    rows = rows.shuffle(seed=42)
    return rows if stop is None else rows.select(range(min(stop, len(rows))))


def _report(problems: list, name: str, total: int, strict: bool) -> None:
    bad = [(i, p) for i, p in enumerate(problems) if p is not None]
    if not bad:
        return
    if strict:
        i, problem = bad[0]
        more = f" ({len(bad) - 1} more bad conversations after it)" if len(bad) > 1 else ""
        raise ValueError(f"{name}: conversation {i} (0-based, in file order): {problem}{more}")
    reasons = Counter(p for _, p in bad).most_common(3)
    logger.warning(
        f"{name}: skipped {len(bad):,} of {total:,} conversations; most common: "
        + "; ".join(f"{n:,}x {p}" for p, n in reasons)
    )


def conversations(
    rows: datasets.Dataset, convert: Callable[[dict], object], name: str, *, num_proc: int | None = None
) -> datasets.Dataset:
    """Map source rows through `convert` (row -> a conversation in any accepted form) and `to_messages`; a row whose
    conversion raises ValueError is skipped and counted in the log. Returns a Dataset with one `messages` column in
    the canonical format."""

    def check(batch):
        out = {"messages": [], "problem": []}
        for row in (dict(zip(batch, values)) for values in zip(*batch.values())):
            try:
                out["messages"].append(to_messages(convert(row)))
                out["problem"].append(None)
            except ValueError as e:
                out["messages"].append([])
                out["problem"].append(str(e))
        return out

    checked = rows.map(
        check,
        batched=True,
        remove_columns=rows.column_names,
        features=_CHECKED,
        num_proc=num_proc,
        desc=f"{name}: checking conversations",
    )
    _report(checked["problem"], name, len(checked), strict=False)
    return checked.filter(lambda p: p is None, input_columns="problem", num_proc=num_proc).remove_columns("problem")


def from_conversations(items, name: str) -> datasets.Dataset:
    """A Dataset from conversations built in Python (generated tasks, a user's JSONL); a bad one raises."""
    messages, problems = [], []
    for conversation in items:
        try:
            messages.append(to_messages(conversation))
            problems.append(None)
        except ValueError as e:
            problems.append(str(e))
    _report(problems, name, len(problems), strict=True)
    if not messages:
        raise ValueError(f"{name}: no conversations")
    return datasets.Dataset.from_dict({"messages": messages}, features=FEATURES)


def drop_long(
    rows: datasets.Dataset, tokenizer, max_tokens: int, name: str, *, strict: bool = False, num_proc: int | None = None
) -> datasets.Dataset:
    """Conversations longer than `max_tokens` (rendered with `render_conversation`, whose ids equal the template's).
    nanochat crops them, which can cut the answer off; a padded-row stage drops them instead (strict: raises)."""

    def lengths(batch):
        return {"num_tokens": [len(render_conversation(tokenizer, m, sys.maxsize)[0]) for m in batch["messages"]]}

    measured = rows.map(lengths, batched=True, num_proc=num_proc, desc=f"{name}: measuring")
    too_long = [
        f"{n:,} tokens, more than the context of {max_tokens:,}" if n > max_tokens else None
        for n in measured["num_tokens"]
    ]
    _report(too_long, name, len(rows), strict)
    return measured.filter(lambda n: n <= max_tokens, input_columns="num_tokens", num_proc=num_proc).remove_columns(
        "num_tokens"
    )


def mixture(parts: list[datasets.Dataset], limit: int | None = None, seed: int = 42) -> datasets.Dataset:
    """nanochat's TaskMixture: every conversation of every part, shuffled together (pass a part twice to see it twice
    per epoch), cut to `limit` rows for quick runs."""
    mixed = datasets.concatenate_datasets(parts).shuffle(seed=seed)
    return mixed if limit is None else mixed.select(range(min(limit, len(mixed))))
