"""Conversation tasks for mid-training and SFT, one small file per source, each returning a `datasets.Dataset` with
one `messages` column in the canonical format (`common.to_messages`): string content, tool use as assistant
`tool_calls` (the `python` tool) + `tool` messages, which our chat template renders as nanochat's inline
python/output blocks.

- `smoltalk`: general chat (HuggingFaceTB/smol-smoltalk, 460K train rows).
- `mmlu`: MMLU auxiliary-train as multiple choice (cais/mmlu, 100K rows).
- `arc`: ARC-Easy / ARC-Challenge as multiple choice (allenai/ai2_arc).
- `gsm8k`: grade-school math with `<<expr=result>>` turned into calculator calls (openai/gsm8k main, 7.5K rows).
- `identity`: who the model is, generated from templates with a configurable name, or a local JSONL.
- `spelling_bee`, `simple_spelling`: nanochat's synthetic spelling/counting tasks from an embedded word list.
- `jsonl_conversations`: the user's own JSONL (strict: the first bad line raises).
Every Hub task also takes `source=` (a local file or folder) and `stop=` (first N rows after the seed-42 shuffle).
"""

from .arc import arc, arc_conversation
from .common import FEATURES, conversations, drop_long, load_split, mixture, render_mc, to_messages
from .custom import jsonl_conversations
from .gsm8k import extract_answer, gsm8k, gsm8k_conversation, gsm8k_prompts, gsm8k_reward
from .identity import identity
from .mmlu import mmlu, mmlu_conversation
from .smoltalk import smoltalk
from .spelling import simple_spelling, spelling_bee

__all__ = [
    "FEATURES",
    "arc",
    "arc_conversation",
    "conversations",
    "drop_long",
    "extract_answer",
    "gsm8k",
    "gsm8k_conversation",
    "gsm8k_prompts",
    "gsm8k_reward",
    "identity",
    "jsonl_conversations",
    "load_split",
    "mixture",
    "mmlu",
    "mmlu_conversation",
    "render_mc",
    "simple_spelling",
    "smoltalk",
    "spelling_bee",
    "to_messages",
]
