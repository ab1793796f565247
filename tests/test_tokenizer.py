"""Tokenizer, chat template and conversation rendering (hfnanochat/tokenizer.py, train/tokenizer.py).

One 512-token tokenizer is trained per module on generated English-ish text (a fraction of a second), so nothing
here needs /work/shared or the network.
"""

import importlib.util
import itertools
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import datasets
import jinja2
import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from hfnanochat.tokenizer import (
    CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    SPLIT_PATTERN,
    get_special_token_ids,
    load_token_bytes,
    normalize_conversation,
    render_conversation,
    render_for_completion,
    save_tokenizer,
    token_bytes,
    train_tokenizer,
)

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 512

WORDS = (
    "the of and to in is was for that with as on by at from his her they this which be or an are it not but had "
    "have one all were we when there can more if will about would time so some into only than also other could "
    "model token train data learning language number answer question compute result because people should water "
    "history between through during without however although science system energy planet mountain river"
).split()


def make_corpus(n_paragraphs: int, seed: int = 0) -> list[str]:
    """Paragraphs of English-ish sentences with numbers, contractions, punctuation and a little non-ASCII."""
    rng = random.Random(seed)
    extras = ["don't", "it's", "we'll", "café", "naïve", "東京", "🙂", "(see above)", "e.g.", "3.14", "$42", "100%"]
    paragraphs = []
    for _ in range(n_paragraphs):
        sentences = []
        for _ in range(rng.randint(2, 6)):
            words = [rng.choice(WORDS) for _ in range(rng.randint(4, 14))]
            if rng.random() < 0.5:
                words.insert(rng.randrange(len(words)), str(rng.randint(0, 99999)))
            if rng.random() < 0.3:
                words.insert(rng.randrange(len(words)), rng.choice(extras))
            sentences.append(" ".join(words).capitalize() + rng.choice([".", ".", "!", "?", ";"]))
        paragraphs.append(" ".join(sentences))
    return paragraphs


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return make_corpus(3000)  # ~650 KB of text: plenty of pairs for 503 BPE tokens, trained in ~0.1 s


@pytest.fixture(scope="module")
def tok(corpus):
    return train_tokenizer(corpus, vocab_size=VOCAB)


# ----------------------------------------------------------------------------------------------------------------
# training, vocabulary, save/load


def test_vocab_size_and_special_ids(tok):
    assert len(tok) == VOCAB
    assert tok.convert_tokens_to_ids(SPECIAL_TOKENS) == list(range(VOCAB - 9, VOCAB))  # the last 9, nanochat order
    ids = get_special_token_ids(tok)
    assert list(ids) == [t[2:-2] for t in SPECIAL_TOKENS] and ids["bos"] == VOCAB - 9
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|bos|>", "<|assistant_end|>", "<|assistant_end|>")
    assert tok("hi there")["input_ids"] == tok.encode("hi there", add_special_tokens=False)  # v5: no BOS added
    assert tok.bos_token_id not in tok("hi there")["input_ids"]
    assert tok.model_max_length == 2048


def test_train_tokenizer_rejects_bad_input(corpus):
    with pytest.raises(ValueError, match="vocab_size must be an int >= 512"):
        train_tokenizer(corpus[:10], vocab_size=511)
    with pytest.raises(ValueError, match="corpus is too small for vocab_size=4096"):
        train_tokenizer(corpus[:5], vocab_size=4096)
    with pytest.raises(ValueError, match="document 1: expected a str, got bytes"):
        train_tokenizer(["fine", b"bytes"], vocab_size=VOCAB)
    with pytest.raises(ValueError, match="no documents"):
        train_tokenizer([], vocab_size=VOCAB)


def test_doc_cap_crops_documents(corpus):
    # one long document repeating a 10-char unit dominates the pair counts unless it is cropped (paragraphs here are
    # under 500 chars, so a 200-char cap keeps most of them whole)
    docs = corpus + ["zqxjzqxjkv" * 1_000]
    capped = train_tokenizer(docs, vocab_size=VOCAB, doc_cap=200)
    full = train_tokenizer(docs, vocab_size=VOCAB)
    assert len(full.encode("zqxjzqxjkv" * 4)) <= 2
    assert len(capped.encode("zqxjzqxjkv" * 4)) == 40  # 20 repetitions are too rare to earn a merge


def test_get_special_token_ids_names_the_missing_token():
    bare = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"a": 0, "<|bos|>": 1}, unk_token="a")))
    with pytest.raises(ValueError, match=r"no special token <\|user_start\|>"):
        get_special_token_ids(bare)


def test_save_load_round_trip(tok, tmp_path):
    out = save_tokenizer(tok, tmp_path / "tok")
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "token_bytes.pt"} <= {
        p.name for p in out.iterdir()
    }
    loaded = AutoTokenizer.from_pretrained(out)
    text = "Train the model, then compute 12345 answers; don't stop. 東京 🙂"
    assert loaded.encode(text) == tok.encode(text)
    assert loaded.chat_template == CHAT_TEMPLATE
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == (
        "<|bos|>",
        "<|assistant_end|>",
        "<|assistant_end|>",
    )
    assert get_special_token_ids(loaded) == get_special_token_ids(tok)
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert loaded.apply_chat_template(conv, return_dict=False) == render_conversation(tok, conv)[0]
    assert torch.equal(load_token_bytes(out), token_bytes(tok))
    (out / "token_bytes.pt").unlink()  # recomputed from the tokenizer when missing
    assert torch.equal(load_token_bytes(out), token_bytes(tok))


# ----------------------------------------------------------------------------------------------------------------
# encoding: round trips, byte counts, the split regex

SAMPLES = [
    "",
    "plain ascii, with punctuation!?",
    "emoji 🙂👍🏽 and flags 🇫🇷 and ZWJ 👩‍💻",
    "CJK 東京都 中文 한국어 日本語のテキスト",
    "combining: e\u0301 a\u0308\u0323 Z\u0335\u0336",
    "controls \x00\x01\x07\x1b[0m\x7f tabs\tand\r\nnewlines\n\n",
    "specials inside text <|bos|> <|assistant_end|>",
]


def random_text(rng: random.Random, n: int) -> str:
    # random code points from all planes, skipping surrogates (not encodable as UTF-8)
    cps = []
    while len(cps) < n:
        cp = rng.choice([rng.randint(0, 0x7F), rng.randint(0x80, 0xFFFF), rng.randint(0x10000, 0x10FFFF)])
        if not 0xD800 <= cp <= 0xDFFF:
            cps.append(cp)
    return "".join(map(chr, cps))


def test_encode_decode_round_trip_and_token_bytes(tok):
    rng = random.Random(0)
    tb = token_bytes(tok)
    assert tb.dtype == torch.int32 and tb.shape == (VOCAB,)
    assert tb[VOCAB - 9 :].tolist() == [0] * 9  # specials count no bytes
    assert tb[: VOCAB - 9].min() >= 1
    texts = SAMPLES + [random_text(rng, rng.randint(1, 200)) for _ in range(200)]
    for text in texts:
        # split_special_tokens: the literal "<|bos|>" above is text, as in nanochat's encode_ordinary
        ids = tok.encode(text, add_special_tokens=False, split_special_tokens=True)
        assert tok.decode(ids) == text
        assert int(tb[ids].sum()) == len(text.encode("utf-8")), text


def test_token_bytes_counts_partial_utf8_tokens(tok):
    # tokens holding part of a multi-byte character: decode() shows each as U+FFFD (3 bytes), token_bytes is exact
    ids = tok.encode("\U0001f680", add_special_tokens=False)  # 4 UTF-8 bytes, rare: not one token at 512
    assert len(ids) > 1 and all(tok.decode([i]) == "\ufffd" for i in ids)
    assert int(token_bytes(tok)[ids].sum()) == 4
    assert sum(len(tok.decode([i]).encode("utf-8")) for i in ids) == 3 * len(ids) != 4


def test_split_regex_matches_nanochat(tok):
    regex = pytest.importorskip("regex")  # the same pattern language as nanochat's fancy-regex/tiktoken
    text = "Hello world!! I'm 1234567 héllo 你好  \n\n\tx  y 🌍🌍 don'T ?!\r\n 3.14159 'll VE're x\u00a0y"
    chunks = [text[a:b] for _, (a, b) in tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)]
    assert chunks == regex.findall(SPLIT_PATTERN, text)
    digits = [piece for piece, _ in tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str("1234567")]
    assert digits == ["12", "34", "56", "7"]  # digits in groups of 1-2 (GPT-4 uses 1-3)


# ----------------------------------------------------------------------------------------------------------------
# chat format: template == render_conversation

TOOL_CALL = {"type": "function", "function": {"name": "python", "arguments": {"code": "12*7"}}}
CONVERSATIONS = {
    "plain": [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ],
    "system_merge": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a river."},
        {"role": "assistant", "content": "The Nile."},
    ],
    "parts": [
        {"role": "user", "content": "How much is 12 times 7?"},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me compute. "},
                {"type": "python", "text": "12*7"},
                {"type": "python_output", "text": "84"},
                {"type": "text", "text": " The answer is 84."},
            ],
        },
    ],
    "tool_calls": [
        {"role": "user", "content": "How much is 12 times 7?"},
        {"role": "assistant", "content": "Let me compute. ", "tool_calls": [TOOL_CALL]},
        {"role": "tool", "content": "84"},
        {"role": "assistant", "content": " The answer is 84."},
    ],
    "multi_turn": [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Two plus two?"},
        {"role": "assistant", "content": [{"type": "python", "text": "2+2"}, {"type": "python_output", "text": "4"}]},
        {"role": "user", "content": "Thanks."},
        {"role": "assistant", "content": "You're welcome."},
    ],
    "unicode_and_whitespace": [
        {"role": "user", "content": "  héllo 🙂\n\n"},
        {"role": "assistant", "content": [{"type": "text", "text": "\n東京 🚀 "}, {"type": "text", "text": "ok\t\n"}]},
    ],
    "two_tool_calls": [
        {"role": "user", "content": "12*7 and 3+4?"},
        {"role": "assistant", "content": "First ", "tool_calls": [TOOL_CALL]},
        {"role": "tool", "content": "84"},
        {
            "role": "assistant",
            "content": ", then ",
            "tool_calls": [{"type": "function", "function": {"name": "python", "arguments": {"code": "3+4"}}}],
        },
        {"role": "tool", "content": "7"},
        {"role": "assistant", "content": ". Done: 84 and 7."},
    ],
}
EXPECTED_TOOL_CALL_TEXT = (
    "<|bos|><|user_start|>How much is 12 times 7?<|user_end|><|assistant_start|>Let me compute. "
    "<|python_start|>12*7<|python_end|><|output_start|>84<|output_end|> The answer is 84.<|assistant_end|>"
)


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_template_equals_render(tok, name):
    messages = CONVERSATIONS[name]
    out = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = render_conversation(tok, {"messages": messages})
    assert out["input_ids"] == ids
    assert out["assistant_masks"] == mask
    assert tok.decode(ids) == tok.apply_chat_template(messages, tokenize=False)


def test_template_accepts_conversations_read_through_datasets(tok, monkeypatch):
    """A `datasets` column of messages gives every message every field, None where a message had none (a user turn
    gets `tool_calls: None`): TRL applies the template to such rows, and they must render as the originals do.
    Recent transformers drop None fields before rendering; 5.17 (the GPU image's) hands them to the template."""
    import transformers.tokenization_utils_base as tokenization_utils_base

    if hasattr(tokenization_utils_base, "_normalize_chat_messages"):
        monkeypatch.setattr(tokenization_utils_base, "_normalize_chat_messages", lambda messages: list(messages))
    rows = datasets.Dataset.from_list([{"messages": CONVERSATIONS[n]} for n in ("tool_calls", "two_tool_calls")])
    for row, name in zip(rows, ("tool_calls", "two_tool_calls")):
        assert any(m.get("tool_calls", 0) is None for m in row["messages"])  # the Nones are really there
        out = tok.apply_chat_template(
            row["messages"], tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        assert (out["input_ids"], out["assistant_masks"]) == render_conversation(tok, CONVERSATIONS[name])


def test_tool_calls_fold_into_one_nanochat_turn(tok):
    assert tok.apply_chat_template(CONVERSATIONS["tool_calls"], tokenize=False) == EXPECTED_TOOL_CALL_TEXT
    # the transformers tool-calling convention and nanochat's list of parts are the same tokens and mask
    assert render_conversation(tok, CONVERSATIONS["tool_calls"]) == render_conversation(tok, CONVERSATIONS["parts"])
    turns, open_turn = normalize_conversation(CONVERSATIONS["tool_calls"])
    assert len(turns) == 2 and not open_turn
    assert turns[1] == (
        "assistant",
        [("text", "Let me compute. "), ("python", "12*7"), ("python_output", "84"), ("text", " The answer is 84.")],
    )
    # OpenAI-style JSON-string arguments: render_conversation parses them (Jinja cannot, see below)
    as_json = [dict(m) for m in CONVERSATIONS["tool_calls"]]
    as_json[1] = {
        **as_json[1],
        "tool_calls": [{"type": "function", "function": {"name": "python", "arguments": '{"code": "12*7"}'}}],
    }
    assert render_conversation(tok, as_json) == render_conversation(tok, CONVERSATIONS["tool_calls"])
    with pytest.raises(jinja2.exceptions.TemplateError, match="arguments are a JSON string"):
        tok.apply_chat_template(as_json, tokenize=False)


def test_mask_follows_nanochat(tok):
    # nanochat's table: bos, user turns, <|assistant_start|> and the tool output block are 0; assistant text, the
    # python block with its markers and <|assistant_end|> are 1
    ids, mask = render_conversation(tok, CONVERSATIONS["multi_turn"])
    special = {v: k for k, v in get_special_token_ids(tok).items()}
    expected_special = {
        "bos": 0,
        "user_start": 0,
        "user_end": 0,
        "assistant_start": 0,
        "assistant_end": 1,
        "python_start": 1,
        "python_end": 1,
        "output_start": 0,
        "output_end": 0,
    }
    for i, m in zip(ids, mask, strict=True):
        if i in special:
            assert m == expected_special[special[i]], special[i]
    supervised = tok.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert supervised == (
        "Hello! How can I help?<|assistant_end|><|python_start|>2+2<|python_end|><|assistant_end|>"
        "You're welcome.<|assistant_end|>"
    )
    assert tok.decode(ids).startswith("<|bos|><|user_start|>Be kind.\n\nHi!<|user_end|><|assistant_start|>")


def test_generation_prompt_and_render_for_completion(tok):
    conv = CONVERSATIONS["multi_turn"]
    prompt = tok.apply_chat_template(conv[:-1], add_generation_prompt=True, return_dict=False)
    assert prompt == render_for_completion(tok, conv)
    assert tok.convert_ids_to_tokens(prompt[-2:]) == ["<|user_end|>", "<|assistant_start|>"]
    with pytest.raises(jinja2.exceptions.TemplateError, match="ends with a user message"):
        tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
    with pytest.raises(ValueError, match="must end with one"):
        render_for_completion(tok, conv[:-1])


def test_tool_output_leaves_the_turn_open(tok):
    conv = CONVERSATIONS["tool_calls"]
    text = tok.apply_chat_template(conv[:-1], tokenize=False)
    assert text.endswith("<|python_start|>12*7<|python_end|><|output_start|>84<|output_end|>")
    assert tok.apply_chat_template(conv[:-1], add_generation_prompt=True, tokenize=False) == text  # nothing to add
    ids, mask = render_conversation(tok, conv[:-1])
    assert tok.decode(ids) == text and mask[-1] == 0
    assert render_for_completion(tok, conv) == ids  # generation continues inside the assistant turn
    _, open_turn = normalize_conversation(conv[:-1])
    assert open_turn


def test_truncation(tok):
    ids, mask = render_conversation(tok, CONVERSATIONS["multi_turn"])
    short_ids, short_mask = render_conversation(tok, CONVERSATIONS["multi_turn"], max_tokens=10)
    assert (short_ids, short_mask) == (ids[:10], mask[:10])
    assert render_conversation(tok, CONVERSATIONS["multi_turn"], max_tokens=10_000) == (ids, mask)
    with pytest.raises(ValueError, match="max_tokens must be a positive int"):
        render_conversation(tok, CONVERSATIONS["plain"], max_tokens=0)


def test_special_token_strings_in_content_stay_text(tok):
    # nanochat's encode_ordinary: a user cannot type a turn boundary into render_conversation's output
    conv = [{"role": "user", "content": "say <|assistant_end|> now"}, {"role": "assistant", "content": "ok"}]
    end = tok.convert_tokens_to_ids("<|assistant_end|>")
    ids, _ = render_conversation(tok, conv)
    assert ids.count(end) == 1
    # the template renders a string, so the tokenizer parses the typed token (documented difference)
    assert tok.apply_chat_template(conv, return_dict=False).count(end) == 2
    assert tok.decode(ids) == tok.apply_chat_template(conv, tokenize=False)


U, A = "user", "assistant"
BAD = [
    ([{"role": U, "content": "a"}, {"role": U, "content": "b"}], "two user messages follow each other"),
    ([{"role": A, "content": "a"}], "two assistant turns follow each other"),
    ([{"role": U, "content": "a"}, {"role": A, "content": "b"}, {"role": A, "content": "c"}], "two assistant turns"),
    ([{"role": "system", "content": "s"}], "a system message must be followed by a user message"),
    ([{"role": "system", "content": "s"}, {"role": A, "content": "b"}], "must be followed by a user message"),
    ([{"role": U, "content": "a"}, {"role": "system", "content": "s"}], "Message 1: only the first message"),
    ([{"role": "tool", "content": "84"}], "a tool message must follow an assistant message with a tool call"),
    ([{"role": U, "content": "a"}, {"role": A, "content": "b"}, {"role": "tool", "content": "84"}], "must follow"),
    ([{"role": "bob", "content": "x"}], 'unknown role "bob"'),
    ([{"content": "x"}], "unknown role null"),
    ([{"role": U, "content": ["a"]}], "user content must be a string"),
    ([{"role": U, "content": "a"}, {"role": A, "content": 5}], "assistant content must be a string or a list"),
    ([{"role": U, "content": "a"}, {"role": A, "content": [{"type": "image", "text": "x"}]}], 'part type "image"'),
    ([{"role": U, "content": "a"}, {"role": A, "content": [{"type": "text"}]}], 'a string "text"'),
    ([{"role": U, "content": "a"}, {"role": A, "content": "b", "tool_calls": [TOOL_CALL]}], "ends with a tool call"),
    (
        [
            {"role": U, "content": "a"},
            {"role": A, "content": "", "tool_calls": [TOOL_CALL]},
            {"role": U, "content": "c"},
        ],
        "Message 2: the previous assistant message made a tool call",
    ),
    (
        [
            {"role": U, "content": "a"},
            {"role": A, "content": "", "tool_calls": [TOOL_CALL]},
            {"role": "tool", "content": "84"},
            {"role": U, "content": "c"},
        ],
        "after a tool message the assistant must continue its turn",
    ),
    ([{"role": U, "content": "a"}, {"role": A, "content": "", "tool_calls": [TOOL_CALL, TOOL_CALL]}], "one tool call"),
    (
        [
            {"role": U, "content": "a"},
            {
                "role": A,
                "content": "",
                "tool_calls": [{"type": "function", "function": {"name": "search", "arguments": {}}}],
            },
        ],
        'unknown tool "search"',
    ),
    (
        [
            {"role": U, "content": "a"},
            {
                "role": A,
                "content": "",
                "tool_calls": [{"type": "function", "function": {"name": "python", "arguments": {"expr": "1"}}}],
            },
        ],
        'a dict with a string "code"',
    ),
    ([{"role": U, "content": "a"}, {"role": A, "content": "", "tool_calls": "x"}], "tool_calls must be a list"),
    (
        [
            {"role": U, "content": "a"},
            {"role": A, "content": "", "tool_calls": [TOOL_CALL]},
            {"role": "tool", "content": 84},
        ],
        "tool content must be a string",
    ),
]


@pytest.mark.parametrize(("messages", "error"), BAD, ids=[e for _, e in BAD])
def test_bad_conversations_raise_the_same_error_in_both(tok, messages, error):
    with pytest.raises(ValueError, match=error) as from_python:
        render_conversation(tok, messages)
    with pytest.raises(jinja2.exceptions.TemplateError, match=error) as from_template:
        tok.apply_chat_template(messages, tokenize=False)
    assert str(from_python.value) == str(from_template.value)


def test_bad_conversation_containers(tok):
    with pytest.raises(ValueError, match="conversation is empty"):
        render_conversation(tok, {"messages": []})
    with pytest.raises(ValueError, match="needs a 'messages' key"):
        render_conversation(tok, {"conversation": []})
    with pytest.raises(ValueError, match="or a list of messages, got str"):
        render_conversation(tok, "hello")
    with pytest.raises(ValueError, match="Message 0: a message must be a dict"):
        render_conversation(tok, ["hello"])
    with pytest.raises(ValueError, match="not valid JSON"):
        bad = {"type": "function", "function": {"name": "python", "arguments": "{code: 1"}}
        render_conversation(tok, [{"role": U, "content": "a"}, {"role": A, "tool_calls": [bad]}])


# ----------------------------------------------------------------------------------------------------------------
# train/tokenizer.py


def _load_script():
    spec = importlib.util.spec_from_file_location("train_tokenizer_script", ROOT / "train" / "tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # a fresh interpreter importing torch, transformers and datasets: 5-10 s on a loaded CPU
def test_script_trains_saves_and_reports(tmp_path):
    data = tmp_path / "corpus.txt"
    data.write_text("\n\n".join(make_corpus(1500, seed=1)), encoding="utf-8")
    out = tmp_path / "tok"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train" / "tokenizer.py"),
            "--data",
            str(data),
            "--vocab-size",
            "600",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert "compression on 15 held-out documents" in result.stdout and "chars/token" in result.stdout
    assert "round-trip check OK" in result.stdout
    loaded = AutoTokenizer.from_pretrained(out)
    assert len(loaded) == 600 and loaded.chat_template == CHAT_TEMPLATE
    assert load_token_bytes(out).shape == (600,)


def test_script_errors(tmp_path, capsys, monkeypatch):
    script = _load_script()
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"body": "some text", "id": 1}\n', encoding="utf-8")
    assert script.main(["--data", str(rows), "--vocab-size", "512", "--out", str(tmp_path / "o")]) == 2
    assert "has no column 'text'; its columns: body, id" in capsys.readouterr().err
    assert script.main(["--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    # default dataset while offline: a clear pointer to --data, no traceback
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("datasets.config.HF_HUB_OFFLINE", True)
    assert script.main(["--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "could not reach the Hugging Face Hub" in err and "--data" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_tokenizer_and_pretraining_read_the_same_documents_and_hold_out_the_same(tmp_path, monkeypatch, suffix):
    """The tokenizer trains on exactly pretraining's training documents of the same --data (the union of its data
    streams, in order for one stream) and measures compression on exactly pretraining's validation documents."""
    from hfnanochat.training.data import DocumentStream

    corpus = [" ".join(make_corpus(4, seed=i)) for i in range(250)]  # 3 held-out documents of > 2,000 characters
    data = tmp_path / f"corpus{suffix}"
    if suffix == ".txt":
        data.write_text("\n\n".join(corpus), encoding="utf-8")
    else:
        data.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus), encoding="utf-8")
    script = _load_script()
    seen = {}
    real_train = script.train_tokenizer

    def recording_train(texts, **kwargs):
        texts = list(texts)
        seen["train"] = texts
        return real_train(texts, **kwargs)

    real_tokenize = None

    def recording_tokenizer(tok):
        nonlocal real_tokenize
        real_tokenize = tok.__class__.__call__

        def call(self, texts, **kwargs):
            seen.setdefault("held_out", list(texts))
            return real_tokenize(self, texts, **kwargs)

        tok.__class__ = type("Recording", (tok.__class__,), {"__call__": call})
        return tok

    monkeypatch.setattr(
        script, "train_tokenizer", lambda texts, **kw: recording_tokenizer(recording_train(texts, **kw))
    )
    assert script.main(["--data", str(data), "--vocab-size", "512", "--out", str(tmp_path / "tok")]) == 0

    one_stream = list(itertools.islice(DocumentStream(str(data), split="train"), len(corpus)))
    pretrain_train = one_stream[: len(corpus) - 3]  # 250 documents, rows 0, 100, 200 held out
    pretrain_val = list(DocumentStream(str(data), split="val"))
    assert seen["train"] == pretrain_train
    assert seen["held_out"] == pretrain_val == [corpus[0], corpus[100], corpus[200]]
    streams = [DocumentStream(str(data), split="train", rank=r, world_size=4) for r in range(4)]
    union = [t for s in streams for t in itertools.islice(s, len(corpus) // 4 + 1) if not s.epoch]
    assert sorted(union) == sorted(pretrain_train)
