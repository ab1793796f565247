"""nanochat's tokenizer and chat format, as a transformers tokenizer.

Notable:
- GPT-4-style byte-level BPE trained with the `tokenizers` library, with nanochat's split regex (GPT-4's, but digits
  in groups of 1-2, which gave the best val bpb in nanochat's 2026-01-13 sweep) and its 9 special tokens appended
  after the BPE tokens, so `<|bos|>` = vocab_size - 9 like nanochat. The merges will not equal rustbpe's ids (HF's
  trainer breaks ties differently); the format and the tokens' meaning are the same.
- The result is a plain `PreTrainedTokenizerFast` (v5: `TokenizersBackend`): bos `<|bos|>`, eos = pad =
  `<|assistant_end|>`, no BOS added by `tok("...")`, and `save_pretrained`/`AutoTokenizer` round-trip it.
- The chat format lives twice, on purpose: `CHAT_TEMPLATE` (Jinja, for `apply_chat_template`, TRL and serving) and
  `render_conversation` (Python, token by token, nanochat's reference). Both read messages through the same rules
  (`normalize_conversation` in Python, mirrored in Jinja) and give the same ids and the same loss mask: the
  template's `{% generation %}` blocks cover exactly what nanochat supervises.
- Two message conventions: nanochat's assistant content as a list of parts (`text`, `python`, `python_output`),
  and transformers' tool calling (assistant `tool_calls` with the `python` tool -> `tool` message -> assistant
  continuation), which becomes ONE nanochat assistant turn with an inline `<|python_start|>...<|output_end|>` block.
- `token_bytes` (UTF-8 bytes per token, 0 for specials) is what bits-per-byte needs; it is saved next to the
  tokenizer as `token_bytes.pt`.

Where the two renderings can differ: `render_conversation` encodes text like nanochat's `encode_ordinary`, so a
special-token string typed inside a message ("<|assistant_end|>") stays plain text (a user cannot inject a turn
boundary), while `apply_chat_template` renders a string and lets the tokenizer parse it, which turns such a string
into the special token. Tool-call arguments given as a JSON string (OpenAI style) are parsed by
`render_conversation` only; Jinja cannot parse JSON, so the template asks for a dict.
"""

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

# GPT-4's cl100k pattern with \p{N}{1,2} instead of {1,3} (nanochat d12 sweep: {1,1} 0.969, {1,2} 0.965, {1,3} 0.972
# val bpb)
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)

SPECIAL_TOKENS = [
    "<|bos|>",  # starts every document (pretraining has no separate eos)
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",  # also eos and pad: generation stops here
    "<|python_start|>",  # the assistant calls the python calculator...
    "<|python_end|>",
    "<|output_start|>",  # ...and the engine (not the model) writes its output
    "<|output_end|>",
]

# below this, fewer than 247 merges (512 - 256 bytes - 9 specials): not a useful tokenizer; nanochat's smallest is 32768
MIN_VOCAB_SIZE = 512

# nanochat's sequence length for SFT and RL (render_conversation truncates here)
MAX_TOKENS = 2048

# One assistant message may carry one tool call: nanochat's engine runs each <|python_end|> as it is generated and
# forces the output right after it, so calls and outputs always alternate. Sequential calls are written as
# assistant(call) -> tool -> assistant(call) -> tool -> assistant(answer).
# Every tag trims whitespace ({%- -%}, {{- -}}): nanochat puts nothing between special tokens and content.
CHAT_TEMPLATE = """\
{%- if messages | length == 0 -%}
    {{- raise_exception('The conversation is empty: it needs at least one user message.') -}}
{%- endif -%}
{%- set ns = namespace(prefix='', expect='user', index=0) -%}
{%- set has_system = messages[0]['role'] == 'system' -%}
{%- if has_system -%}
    {%- if messages[0]['content'] is not string -%}
        {{- raise_exception('Message 0: system content must be a string.') -}}
    {%- endif -%}
    {%- if messages | length < 2 or messages[1]['role'] != 'user' -%}
        {{- raise_exception('Message 0: a system message must be followed by a user message.') -}}
    {%- endif -%}
    {%- set ns.prefix = messages[0]['content'] + '\n\n' -%}
    {%- set ns.index = 1 -%}
{%- endif -%}
{{- '<|bos|>' -}}
{%- for m in (messages[1:] if has_system else messages) -%}
    {%- set where = 'Message ' ~ ns.index ~ ': ' -%}
    {%- set ns.index = ns.index + 1 -%}
    {%- set role = m.get('role') -%}
    {%- if role == 'user' -%}
        {%- if ns.expect == 'assistant' -%}
            {{- raise_exception(where ~ 'roles must alternate user/assistant, but two user messages follow each '
                ~ 'other.') -}}
        {%- elif ns.expect == 'tool' -%}
            {{- raise_exception(where ~ 'the previous assistant message made a tool call, so a tool message with '
                ~ 'its output must come next.') -}}
        {%- elif ns.expect == 'continuation' -%}
            {{- raise_exception(where ~ 'after a tool message the assistant must continue its turn.') -}}
        {%- endif -%}
        {%- if m.get('content') is not string -%}
            {{- raise_exception(where ~ 'user content must be a string.') -}}
        {%- endif -%}
        {{- '<|user_start|>' + ns.prefix + m['content'] + '<|user_end|>' -}}
        {%- set ns.prefix = '' -%}
        {%- set ns.expect = 'assistant' -%}
    {%- elif role == 'assistant' -%}
        {%- if ns.expect == 'user' -%}
            {{- raise_exception(where ~ 'roles must alternate user/assistant, but two assistant turns follow each '
                ~ 'other (or the conversation starts with one).') -}}
        {%- elif ns.expect == 'tool' -%}
            {{- raise_exception(where ~ 'the previous assistant message made a tool call, so a tool message with '
                ~ 'its output must come next.') -}}
        {%- elif ns.expect == 'assistant' -%}
            {{- '<|assistant_start|>' -}}
        {%- endif -%}
        {%- set content = m.get('content', '') -%}
        {%- if content is string -%}
            {%- generation -%}{{- content -}}{%- endgeneration -%}
        {%- elif content is sequence and content is not mapping -%}
            {%- for p in content -%}
                {%- if p is not mapping or p.get('text') is not string -%}
                    {{- raise_exception(where ~ 'each assistant content part must be a dict with a string "text".') -}}
                {%- elif p.get('type') == 'text' -%}
                    {%- generation -%}{{- p['text'] -}}{%- endgeneration -%}
                {%- elif p.get('type') == 'python' -%}
                    {%- generation -%}{{- '<|python_start|>' + p['text'] + '<|python_end|>' -}}{%- endgeneration -%}
                {%- elif p.get('type') == 'python_output' -%}
                    {{- '<|output_start|>' + p['text'] + '<|output_end|>' -}}
                {%- else -%}
                    {{- raise_exception(where ~ 'unknown assistant part type ' ~ p.get('type') | tojson
                        ~ ' (expected "text", "python" or "python_output").') -}}
                {%- endif -%}
            {%- endfor -%}
        {%- else -%}
            {{- raise_exception(where ~ 'assistant content must be a string or a list of parts.') -}}
        {%- endif -%}
        {%- set calls = m.get('tool_calls') -%}
        {#- datasets fills a missing field with None: same as no tool call -#}
        {%- set calls = [] if calls is none else calls -%}
        {%- if calls is string or calls is mapping or calls is not sequence -%}
            {{- raise_exception(where ~ 'tool_calls must be a list.') -}}
        {%- elif calls | length > 1 -%}
            {{- raise_exception(where ~ 'one tool call per assistant message (nanochat runs each python call '
                ~ 'before the next token); put sequential calls in separate assistant messages.') -}}
        {%- elif calls | length == 1 -%}
            {%- set call = calls[0] -%}
            {%- set fn = call['function'] if call is mapping and 'function' in call else call -%}
            {%- if fn is not mapping or fn.get('name') != 'python' -%}
                {{- raise_exception(where ~ 'unknown tool ' ~ (fn.get('name') if fn is mapping else fn) | tojson
                    ~ ': nanochat has only the "python" tool.') -}}
            {%- endif -%}
            {%- set args = fn.get('arguments') -%}
            {%- if args is string -%}
                {{- raise_exception(where ~ 'tool call arguments are a JSON string; the chat template needs a dict '
                    ~ 'like {"code": "12*7"} (render_conversation accepts both).') -}}
            {%- elif args is not mapping or args.get('code') is not string -%}
                {{- raise_exception(where ~ 'python tool call arguments must be a dict with a string "code".') -}}
            {%- endif -%}
            {%- generation -%}{{- '<|python_start|>' + args['code'] + '<|python_end|>' -}}{%- endgeneration -%}
            {%- set ns.expect = 'tool' -%}
        {%- else -%}
            {%- generation -%}{{- '<|assistant_end|>' -}}{%- endgeneration -%}
            {%- set ns.expect = 'user' -%}
        {%- endif -%}
    {%- elif role == 'tool' -%}
        {%- if ns.expect != 'tool' -%}
            {{- raise_exception(where ~ 'a tool message must follow an assistant message with a tool call.') -}}
        {%- endif -%}
        {%- if m.get('content') is not string -%}
            {{- raise_exception(where ~ 'tool content must be a string.') -}}
        {%- endif -%}
        {{- '<|output_start|>' + m['content'] + '<|output_end|>' -}}
        {%- set ns.expect = 'continuation' -%}
    {%- elif role == 'system' -%}
        {{- raise_exception(where ~ 'only the first message may be a system message.') -}}
    {%- else -%}
        {{- raise_exception(where ~ 'unknown role ' ~ role | tojson
            ~ ' (expected "system", "user", "assistant" or "tool").') -}}
    {%- endif -%}
{%- endfor -%}
{%- if ns.expect == 'tool' -%}
    {{- raise_exception('The conversation ends with a tool call but no tool message with its output.') -}}
{%- endif -%}
{%- if add_generation_prompt -%}
    {%- if ns.expect == 'assistant' -%}
        {{- '<|assistant_start|>' -}}
    {%- elif ns.expect == 'user' -%}
        {{- raise_exception('add_generation_prompt needs a conversation that ends with a user message.') -}}
    {%- endif -%}
{%- endif -%}"""

PART_TYPES = ("text", "python", "python_output")
_PART_TYPES_TEXT = '"text", "python" or "python_output"'

# Why a message cannot come now, by (its role, what the conversation expects next); CHAT_TEMPLATE uses the same words
_TOOL_NEXT = "the previous assistant message made a tool call, so a tool message with its output must come next."
_OUT_OF_ORDER = {
    ("user", "assistant"): "roles must alternate user/assistant, but two user messages follow each other.",
    ("user", "tool"): _TOOL_NEXT,
    ("user", "continuation"): "after a tool message the assistant must continue its turn.",
    ("assistant", "user"): "roles must alternate user/assistant, but two assistant turns follow each other "
    "(or the conversation starts with one).",
    ("assistant", "tool"): _TOOL_NEXT,
}
_ONE_CALL = (
    "one tool call per assistant message (nanochat runs each python call before the next token); "
    "put sequential calls in separate assistant messages."
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 65536, doc_cap: int = 10_000) -> PreTrainedTokenizerFast:
    """Train nanochat's byte-level BPE on `texts` and wrap it as a transformers tokenizer.

    Each document is cropped to `doc_cap` characters (nanochat: 10,000, so a few huge documents cannot dominate the
    pair counts). BPE learns `vocab_size - 9` tokens (the 256 bytes plus merges), then the 9 specials take the last
    ids. A corpus too small to reach that many merges raises ValueError rather than padding the vocabulary with
    tokens that never occur (their embeddings would never train).
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size must be an int >= {MIN_VOCAB_SIZE} (256 bytes + 9 specials + merges), got {vocab_size!r}"
        )
    if isinstance(doc_cap, bool) or not isinstance(doc_cap, int) or doc_cap < 1:
        raise ValueError(f"doc_cap must be a positive int, got {doc_cap!r}")
    tokenizer = Tokenizer(BPE(byte_fallback=True, unk_token=None, fuse_unk=False))
    tokenizer.normalizer = None  # bytes in, bytes out: no unicode normalisation, no lowercasing
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(pattern=Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
            # use_regex=False: the split above already did GPT-2's job; this only maps bytes to printable characters
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        min_frequency=0,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen or not: no unknown tokens ever
        special_tokens=[],  # added after training so they get the last ids (HF's trainer would put them first)
    )
    n_docs = 0

    def cropped():
        nonlocal n_docs
        for text in texts:
            if not isinstance(text, str):
                raise ValueError(f"document {n_docs}: expected a str, got {type(text).__name__}")
            n_docs += 1
            yield text[:doc_cap]

    tokenizer.train_from_iterator(cropped(), trainer)
    if n_docs == 0:
        raise ValueError("train_tokenizer got no documents")
    n_bpe = tokenizer.get_vocab_size()
    if n_bpe != vocab_size - len(SPECIAL_TOKENS):
        raise ValueError(
            f"the corpus is too small for vocab_size={vocab_size}: BPE ran out of pairs to merge at {n_bpe} tokens "
            f"and needs {vocab_size - len(SPECIAL_TOKENS)} before the {len(SPECIAL_TOKENS)} specials. "
            f"Train on more text ({n_docs} documents given) or ask for a smaller vocab_size."
        )
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    return wrap_tokenizer(tokenizer)


def wrap_tokenizer(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    """A `tokenizers.Tokenizer` holding nanochat's 9 specials -> a transformers tokenizer with bos/eos/pad and our
    chat template (used for trained tokenizers and for tokenizers converted from nanochat's tiktoken pickle)."""
    missing = [t for t in SPECIAL_TOKENS if tokenizer.token_to_id(t) is None]
    if missing:
        raise ValueError(f"the tokenizer lacks nanochat's special tokens {missing}")
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|bos|>",
        eos_token="<|assistant_end|>",
        pad_token="<|assistant_end|>",  # pad = eos like transformers' nanochat port; padding is masked from the loss
        extra_special_tokens=[t for t in SPECIAL_TOKENS if t not in ("<|bos|>", "<|assistant_end|>")],
        chat_template=CHAT_TEMPLATE,
        model_max_length=MAX_TOKENS,
        clean_up_tokenization_spaces=False,  # decode must give back the exact text
    )


def get_special_token_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """{"bos": id, "user_start": id, ..., "output_end": id}; ValueError if the tokenizer lacks one."""
    ids = {}
    for token in SPECIAL_TOKENS:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or (token_id == tokenizer.unk_token_id and token != tokenizer.unk_token):
            raise ValueError(f"the tokenizer has no special token {token}: it is not a nanochat tokenizer")
        ids[token[2:-2]] = token_id
    return ids


def _messages(conversation) -> list:
    if isinstance(conversation, Mapping):
        if "messages" not in conversation:
            raise ValueError(f"a conversation dict needs a 'messages' key, got keys {sorted(conversation)}")
        conversation = conversation["messages"]
    if not isinstance(conversation, (list, tuple)):
        raise ValueError(
            f"a conversation is {{'messages': [...]}} or a list of messages, got {type(conversation).__name__}"
        )
    return list(conversation)


def _add_part(parts: list, kind: str, text: str) -> None:
    # Adjacent text parts become one text, exactly what the Jinja template's string concatenation does (nanochat
    # would encode them separately; merging keeps the template and render_conversation token-identical)
    if kind == "text":
        if not text:
            return
        if parts and parts[-1][0] == "text":
            parts[-1] = ("text", parts[-1][1] + text)
            return
    parts.append((kind, text))


def normalize_conversation(conversation) -> tuple[list[tuple[str, list[tuple[str, str]]]], bool]:
    """Validate a conversation and reduce it to nanochat turns: ([(role, [(part_type, text), ...]), ...], open_turn).

    role is "user" (one "text" part) or "assistant" (parts of type text/python/python_output). A leading system
    message is merged into the first user message as system + "\\n\\n" + user. transformers' tool calling
    (assistant `tool_calls` -> `tool` -> assistant continuation) folds into one assistant turn as python and
    python_output parts. `open_turn` is True when the conversation ends on a tool output: the last assistant turn
    has no <|assistant_end|> and generation continues inside it. The Jinja CHAT_TEMPLATE mirrors these rules with
    the same messages; both raise on the same inputs (here ValueError, there jinja2's TemplateError).
    """
    messages = _messages(conversation)
    if not messages:
        raise ValueError("The conversation is empty: it needs at least one user message.")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ValueError(f"Message {i}: a message must be a dict with 'role' and 'content', got {type(m).__name__}")
    prefix, start = "", 0
    if messages[0].get("role") == "system":
        if not isinstance(messages[0].get("content"), str):
            raise ValueError("Message 0: system content must be a string.")
        if len(messages) < 2 or messages[1].get("role") != "user":
            raise ValueError("Message 0: a system message must be followed by a user message.")
        prefix, start = messages[0]["content"] + "\n\n", 1
    turns, expect = [], "user"  # expect: user | assistant | tool | continuation (assistant after a tool output)
    for i in range(start, len(messages)):
        m, where = messages[i], f"Message {i}: "
        role = m.get("role")
        # transformers drops None-valued keys before a template sees them (OpenAI's content=None on tool calls)
        content = m.get("content")
        if (role, expect) in _OUT_OF_ORDER:
            raise ValueError(where + _OUT_OF_ORDER[role, expect])
        if role == "user":
            if not isinstance(content, str):
                raise ValueError(where + "user content must be a string.")
            turns.append(("user", [("text", prefix + content)]))
            prefix, expect = "", "assistant"
        elif role == "assistant":
            if expect == "assistant":
                turns.append(("assistant", []))
            parts = turns[-1][1]
            content = "" if content is None else content
            if isinstance(content, str):
                _add_part(parts, "text", content)
            elif isinstance(content, (list, tuple)):
                for p in content:
                    if not isinstance(p, Mapping) or not isinstance(p.get("text"), str):
                        raise ValueError(where + 'each assistant content part must be a dict with a string "text".')
                    if p.get("type") not in PART_TYPES:
                        kind = json.dumps(p.get("type"))
                        raise ValueError(where + f"unknown assistant part type {kind} (expected {_PART_TYPES_TEXT}).")
                    _add_part(parts, p["type"], p["text"])
            else:
                raise ValueError(where + "assistant content must be a string or a list of parts.")
            calls = m.get("tool_calls")
            calls = [] if calls is None else calls
            if not isinstance(calls, (list, tuple)):
                raise ValueError(where + "tool_calls must be a list.")
            if len(calls) > 1:
                raise ValueError(where + _ONE_CALL)
            if calls:
                _add_part(parts, "python", _python_code(calls[0], where))
                expect = "tool"
            else:
                expect = "user"
        elif role == "tool":
            if expect != "tool":
                raise ValueError(where + "a tool message must follow an assistant message with a tool call.")
            if not isinstance(content, str):
                raise ValueError(where + "tool content must be a string.")
            _add_part(turns[-1][1], "python_output", content)
            expect = "continuation"
        elif role == "system":
            raise ValueError(where + "only the first message may be a system message.")
        else:
            raise ValueError(
                where + f'unknown role {json.dumps(role)} (expected "system", "user", "assistant" or "tool").'
            )
    if expect == "tool":
        raise ValueError("The conversation ends with a tool call but no tool message with its output.")
    return turns, expect == "continuation"


def _python_code(call, where: str) -> str:
    fn = call["function"] if isinstance(call, Mapping) and "function" in call else call
    if not isinstance(fn, Mapping) or fn.get("name") != "python":
        name = fn.get("name") if isinstance(fn, Mapping) else fn
        raise ValueError(where + f'unknown tool {json.dumps(name, default=repr)}: nanochat has only the "python" tool.')
    args = fn.get("arguments")
    if isinstance(args, str):  # OpenAI style; the Jinja template cannot parse JSON and asks for a dict instead
        try:
            args = json.loads(args)
        except json.JSONDecodeError as e:
            raise ValueError(where + f"tool call arguments are not valid JSON: {e}") from None
    if not isinstance(args, Mapping) or not isinstance(args.get("code"), str):
        raise ValueError(where + 'python tool call arguments must be a dict with a string "code".')
    return args["code"]


def _render(tokenizer, turns, open_turn: bool) -> tuple[list[int], list[int]]:
    special = get_special_token_ids(tokenizer)
    ids, mask = [], []

    def add(token_ids: list[int], supervised: int) -> None:
        ids.extend(token_ids)
        mask.extend([supervised] * len(token_ids))

    def encode(text: str) -> list[int]:
        # nanochat's encode_ordinary: a special-token string inside a message stays plain text
        return tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)

    add([special["bos"]], 0)
    for k, (role, parts) in enumerate(turns):
        if role == "user":
            add([special["user_start"]], 0)
            add(encode(parts[0][1]), 0)
            add([special["user_end"]], 0)
            continue
        add([special["assistant_start"]], 0)  # the model never has to predict it: the engine writes it
        for kind, text in parts:
            if kind == "text":
                add(encode(text), 1)
            elif kind == "python":  # the model writes the call, so it learns to
                add([special["python_start"]], 1)
                add(encode(text), 1)
                add([special["python_end"]], 1)
            else:  # python_output comes from the calculator at inference: no loss on it
                add([special["output_start"]], 0)
                add(encode(text), 0)
                add([special["output_end"]], 0)
        if not (open_turn and k == len(turns) - 1):
            add([special["assistant_end"]], 1)  # supervised: the model must learn to stop
    return ids, mask


def render_conversation(
    tokenizer: PreTrainedTokenizerBase, conversation, max_tokens: int = MAX_TOKENS
) -> tuple[list[int], list[int]]:
    """nanochat's render_conversation: (ids, mask) with mask 1 on what the assistant is trained to produce.

    Each piece is encoded on its own, like nanochat, and the result is cut at max_tokens (plain slicing, which can
    cut mid-message, as nanochat does). `conversation` is {"messages": [...]} or a list of messages.
    """
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
    ids, mask = _render(tokenizer, *normalize_conversation(conversation))
    return ids[:max_tokens], mask[:max_tokens]


def render_for_completion(tokenizer: PreTrainedTokenizerBase, conversation) -> list[int]:
    """The prompt for generating the final assistant message (evaluation and RL): nanochat drops that message,
    renders the rest and appends <|assistant_start|>. When the rest ends on a tool output, the assistant turn is
    still open and generation continues inside it, so nothing is appended. Not truncated: a cut prompt is useless.
    """
    messages = _messages(conversation)
    normalize_conversation(messages)  # validate the whole conversation, not just the prompt
    if messages[-1].get("role") != "assistant":
        raise ValueError(
            "render_for_completion drops the final assistant message (the answer to generate), "
            "so the conversation must end with one"
        )
    turns, open_turn = normalize_conversation(messages[:-1])
    ids, _ = _render(tokenizer, turns, open_turn)
    if not open_turn:
        ids.append(get_special_token_ids(tokenizer)["assistant_start"])
    return ids


def _byte_decoder() -> dict[str, int]:
    # GPT-2's table that ByteLevel uses: the 188 printable latin-1 bytes stand for themselves, the other 68 bytes
    # (controls, space, ...) map to U+0100 onwards in byte order, so every byte is one visible character
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable} | {chr(256 + n): b for n, b in enumerate(others)}
    if set(table) != set(pre_tokenizers.ByteLevel.alphabet()):
        raise RuntimeError("tokenizers' ByteLevel alphabet is not GPT-2's byte table")
    return table


def token_bytes(tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """int32 tensor of shape (len(tokenizer),): how many UTF-8 bytes each token stands for, 0 for special tokens.

    Bits per byte divides the loss by these, so it is computed from the byte-level strings, not from decode(), which
    replaces a token holding half a UTF-8 character with U+FFFD (3 bytes instead of 1 or 2).
    """
    table = _byte_decoder()
    added = tokenizer.added_tokens_decoder
    counts = [0] * len(tokenizer)
    for token, token_id in tokenizer.get_vocab().items():
        if token_id in added:
            # specials are not text (bpb excludes them); any other added token is stored as plain text
            counts[token_id] = 0 if added[token_id].special else len(token.encode("utf-8"))
            continue
        try:
            counts[token_id] = len(bytes(table[c] for c in token))
        except KeyError:
            raise ValueError(
                f"token {token_id} ({token!r}) is not a byte-level token: not a byte-level BPE tokenizer"
            ) from None
    return torch.tensor(counts, dtype=torch.int32)


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, out_dir: str | os.PathLike) -> Path:
    """save_pretrained (tokenizer.json, tokenizer_config.json, chat_template.jinja) plus token_bytes.pt."""
    out_dir = Path(out_dir)
    tokenizer.save_pretrained(out_dir)
    torch.save(token_bytes(tokenizer), out_dir / "token_bytes.pt")
    return out_dir


def load_token_bytes(dir_or_tokenizer_path: str | os.PathLike) -> torch.Tensor:
    """token_bytes.pt from a tokenizer folder; recomputed from the tokenizer (a folder or Hub id) if it is missing."""
    path = Path(dir_or_tokenizer_path) / "token_bytes.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    return token_bytes(AutoTokenizer.from_pretrained(os.fspath(dir_or_tokenizer_path)))
