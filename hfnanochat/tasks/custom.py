"""A user's own conversations: a JSONL file, one conversation per line, either `{"messages": [...]}` or a bare list
of messages (nanochat's CustomJSON format, also used by its identity file). Any message convention our tokenizer
accepts works (string content, nanochat parts, tool calls, a leading system message). It is the user's data, so the
first bad line raises a ValueError that names it, before any training starts."""

import json
from pathlib import Path

import datasets

from .common import FEATURES, to_messages


def jsonl_conversations(path: str, name: str | None = None):
    path = Path(path).expanduser()
    name = name or str(path)
    if not path.is_file():
        raise ValueError(f"{name}: no such file")
    messages = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                messages.append(to_messages(json.loads(line)))  # converted here, so that an error names the line
            except json.JSONDecodeError as e:
                raise ValueError(f"{name} line {n}: not valid JSON ({e})") from None
            except ValueError as e:
                raise ValueError(f"{name} line {n}: {e}") from None
    if not messages:
        raise ValueError(f"{name}: the file holds no conversations")
    return datasets.Dataset.from_dict({"messages": messages}, features=FEATURES)
