"""hfnanochat.tasks: every source's conversations, the canonical message format, bad rows, local copies.

Fixtures are tiny files written into tmp_path in each source's real layout (GSM8K's jsonl, a Hub parquet snapshot for
ARC, MMLU's wrapped auxiliary_train rows). The real GSM8K train file is used when ../shared (beside the checkout) has
it.
"""

import json
import logging
import random
import re
from pathlib import Path

import datasets
import pytest

from hfnanochat import tasks
from hfnanochat.tokenizer import render_conversation, train_tokenizer

GSM8K_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"  # ../shared beside the checkout
SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "ta", "shi", "po", "ve", "dan", "tor", "el", "qu", "zi", "fa", "gu", "ber"]


@pytest.fixture(scope="module")
def tok():
    rng = random.Random(0)
    words = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(2000)]
    texts = [
        " ".join(rng.choice(words) for _ in range(rng.randint(5, 40))) + rng.choice(".?!") + f" {i}"
        for i in range(3000)
    ]
    return train_tokenizer(texts, vocab_size=512)


def call(code):
    return [{"type": "function", "function": {"name": "python", "arguments": {"code": code}}}]


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def template(tok, messages):
    out = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    return out["input_ids"], out["assistant_masks"]


# -- the canonical format --------------------------------------------------------------------------------------------

VALID = {
    "parts": {
        "messages": [
            {"role": "user", "content": "what is 12 times 7"},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "Let me compute "},
                    {"type": "python", "text": "12*7"},
                    {"type": "python_output", "text": "84"},
                    {"type": "text", "text": " so it is 84."},
                ],
            },
        ]
    },
    "tool_calls_json_args_and_system": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "add 2 and 3"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"function": {"name": "python", "arguments": '{"code": "2+3"}'}}],
        },
        {"role": "tool", "content": "5"},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "thanks"},
        {"role": "assistant", "content": "welcome"},
    ],
    "two_calls_in_a_row": [
        {"role": "user", "content": "q"},
        {
            "role": "assistant",
            "content": [
                {"type": "python", "text": "1+1"},
                {"type": "python_output", "text": "2"},
                {"type": "python", "text": "2*3"},
                {"type": "python_output", "text": "6"},
                {"type": "text", "text": "#### 6"},
            ],
        },
    ],
}


@pytest.mark.parametrize("name", sorted(VALID))
def test_to_messages_keeps_tokens_and_mask(tok, name):
    conversation = VALID[name]
    messages = tasks.to_messages(conversation)
    assert all(isinstance(m["content"], str) for m in messages)  # Arrow-friendly: no list content anywhere
    reference = render_conversation(tok, conversation)
    assert render_conversation(tok, messages) == reference
    assert template(tok, messages) == reference  # what TRL's assistant_only_loss will see
    # and it stores in the one schema every task shares
    stored = datasets.Dataset.from_dict({"messages": [messages]}, features=tasks.FEATURES)
    assert template(tok, stored[0]["messages"]) == reference


def test_tool_calls_become_tool_messages():
    messages = tasks.to_messages(VALID["parts"])
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant"]
    assert messages[1] == {"role": "assistant", "content": "Let me compute ", "tool_calls": call("12*7")}
    assert messages[2] == {"role": "tool", "content": "84"}
    assert messages[3] == {"role": "assistant", "content": " so it is 84."}


U, A = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}
BAD = [
    ([{"content": "no role"}, A], "unknown role"),
    ([U, U, A], "roles must alternate"),
    ([U, A, A], "roles must alternate"),
    ([A], "roles must alternate"),
    ([U, {"role": "tool", "content": "5"}, A], "tool message must follow"),
    (
        [U, {"role": "assistant", "content": [{"type": "python_output", "text": "5"}, {"type": "text", "text": "x"}]}],
        "tool output with no python call",
    ),
    (
        [U, {"role": "assistant", "content": [{"type": "python", "text": "1+1"}, {"type": "text", "text": "x"}]}],
        "python call with no tool output",
    ),
    ([U, {"role": "assistant", "content": "", "tool_calls": call("1+1")}], "ends with a tool call"),
    (
        [U, {"role": "assistant", "content": "", "tool_calls": call("1+1")}, {"role": "tool", "content": "2"}],
        "ends on a tool output",
    ),
    (
        [U, {"role": "assistant", "content": "", "tool_calls": call(" ")}, {"role": "tool", "content": "2"}, A],
        "empty python call",
    ),
    ([{"role": "user", "content": "  "}, A], "empty message"),
    ([U, {"role": "assistant", "content": ""}], "empty assistant turn"),
    ([U, A, U], "ends with a user message"),
    ([], "empty"),
    ([{"role": "user", "content": "say <|assistant_end|> now"}, A], "special token"),
    ([U, {"role": "assistant", "content": 3}], "string or a list of parts"),
]


@pytest.mark.parametrize("messages,error", BAD, ids=[e for _, e in BAD])
def test_malformed_conversations_raise(messages, error):
    with pytest.raises(ValueError, match=error):
        tasks.to_messages(messages)


def test_render_mc_is_nanochats_prompt():
    assert tasks.render_mc("Capital of France?", "AB", ["Paris", "Rome"]) == (
        "Multiple Choice question: Capital of France?\n- Paris=A\n- Rome=B\n\n"
        "Respond only with the letter of the correct answer."
    )


# -- sources ----------------------------------------------------------------------------------------------------------


def test_gsm8k_marks_become_calculator_calls():
    answer = (
        "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
        "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"
    )
    messages = tasks.to_messages(tasks.gsm8k_conversation("How many clips?", answer))
    assert messages == [
        {"role": "user", "content": "How many clips?"},
        {"role": "assistant", "content": "Natalia sold 48/2 = ", "tool_calls": call("48/2")},
        {"role": "tool", "content": "24"},
        {"role": "assistant", "content": "24 clips in May.\nNatalia sold 48+24 = ", "tool_calls": call("48+24")},
        {"role": "tool", "content": "72"},
        {"role": "assistant", "content": "72 clips altogether in April and May.\n#### 72"},
    ]
    # the last "=" splits (an expression may compare), and a mark without "=" keeps an empty output
    weird = tasks.to_messages(tasks.gsm8k_conversation("q", "a <<1==1=True>> b <<7*3>> c\n#### 1"))
    assert [m["content"] for m in weird if m["role"] == "tool"] == ["True", ""]
    assert weird[1]["tool_calls"] == call("1==1")


def nanochat_parts(answer: str) -> list[dict]:
    """An independent transcription of nanochat's GSM8K parser (tasks/gsm8k.py)."""
    parts = []
    for piece in re.split(r"(<<[^>]+>>)", answer):
        if piece.startswith("<<") and piece.endswith(">>"):
            inner = piece[2:-2]
            expr, result = inner.rsplit("=", 1) if "=" in inner else (inner, "")
            parts += [{"type": "python", "text": expr}, {"type": "python_output", "text": result}]
        else:
            parts.append({"type": "text", "text": piece})
    return parts


@pytest.mark.skipif(not (GSM8K_DIR / "train.jsonl").is_file(), reason="the real GSM8K is not in /work/shared/data")
def test_real_gsm8k_renders_like_nanochat(tok):
    data = tasks.gsm8k(source=str(GSM8K_DIR))
    raw = datasets.load_dataset("json", data_files=str(GSM8K_DIR / "train.jsonl"), split="train")
    assert len(data) == len(raw) == 7473  # no row is malformed
    by_question = {row["question"]: row["answer"] for row in raw}
    for row in data.select(range(300)):
        messages = row["messages"]
        question = messages[0]["content"]
        reference = [
            {"role": "user", "content": question},
            {"role": "assistant", "content": nanochat_parts(by_question[question])},
        ]
        assert template(tok, messages) == render_conversation(tok, reference)
        assert re.search(r"#### -?[\d,.]+$", messages[-1]["content"])  # the answer line stays text


def test_gsm8k_and_smoltalk_from_local_jsonl(tmp_path, caplog):
    gsm = write_jsonl(
        tmp_path / "gsm8k" / "train.jsonl",
        [
            {"question": "2+2?", "answer": "It is <<2+2=4>>4.\n#### 4"},
            {"question": "", "answer": "#### 1"},  # empty question: skipped
        ],
    )
    write_jsonl(tmp_path / "gsm8k" / "test.jsonl", [{"question": "1+1?", "answer": "<<1+1=2>>2\n#### 2"}])
    with caplog.at_level(logging.WARNING):
        assert len(tasks.gsm8k(source=str(gsm.parent))) == 1
        assert len(tasks.gsm8k(split="test", source=str(gsm.parent))) == 1
    assert "GSM8K main: skipped 1 of 2 conversations" in caplog.text

    good = [[U, A], [{"role": "system", "content": "sys"}, U, A, U, A]]
    bad = [
        [U, U, A],
        [{"role": "user", "content": ""}, A],
        [{"content": "x"}, A],
        [U, {"role": "assistant", "content": "<|user_start|>"}],
        [U],
    ]
    path = write_jsonl(tmp_path / "smol" / "train.jsonl", [{"messages": m} for m in good * 3 + bad])
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        data = tasks.smoltalk(source=str(path))
    assert len(data) == 6
    assert "SmolTalk: skipped 5 of 11 conversations" in caplog.text
    assert len(tasks.smoltalk(source=str(path), stop=4)) <= 4  # the first 4 after the seed-42 shuffle


def test_mmlu_rows_wrapped_or_flat(tmp_path, caplog):
    row = {"question": "2+2?", "choices": ["3", "4", "5", "6"], "answer": 1, "subject": "math"}
    folder = tmp_path / "mmlu"
    datasets.Dataset.from_list([{"train": row}, {"train": {**row, "answer": 9}}]).to_parquet(
        str(folder / "auxiliary_train" / "train-00000-of-00001.parquet")
    )
    with caplog.at_level(logging.WARNING):
        data = tasks.mmlu(source=str(folder))
    assert "skipped 1 of 2" in caplog.text
    assert data[0]["messages"][0]["content"] == tasks.render_mc("2+2?", "ABCD", ["3", "4", "5", "6"])
    assert data[0]["messages"][1]["content"] == "B"  # the bare letter
    flat = write_jsonl(tmp_path / "flat.jsonl", [row, {**row, "choices": ["1", "2"]}])
    assert [m["messages"][1]["content"] for m in tasks.mmlu(source=str(flat))] == ["B"]


def test_arc_from_a_hub_snapshot(tmp_path):
    rows = [
        {
            "id": "1",
            "question": "Which is a star?",
            "choices": {"text": ["Sun", "Moon", "Mars", "Venus"], "label": ["A", "B", "C", "D"]},
            "answerKey": "A",
        },
        {
            "id": "2",
            "question": "Pick two",
            "choices": {"text": ["one", "two", "three"], "label": ["1", "2", "3"]},
            "answerKey": "2",
        },
        {"id": "3", "question": "Broken", "choices": {"text": ["x", "y"], "label": ["A", "B"]}, "answerKey": "E"},
    ]
    for subset in ("ARC-Easy", "ARC-Challenge"):
        datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / subset / "train-00000-of-00001.parquet"))
    data = tasks.arc("ARC-Challenge", source=str(tmp_path))
    answers = sorted((m["messages"][0]["content"].split("\n")[0], m["messages"][1]["content"]) for m in data)
    assert answers == [("Multiple Choice question: Pick two", "2"), ("Multiple Choice question: Which is a star?", "A")]
    with pytest.raises(ValueError, match="ARC-Easy or ARC-Challenge"):
        tasks.arc("ARC-Hard", source=str(tmp_path))


def test_missing_columns_and_paths_raise(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"text": "no messages here"}])
    with pytest.raises(ValueError, match=r"needs \['messages'\]"):
        tasks.smoltalk(source=str(path))
    with pytest.raises(ValueError, match="missing"):
        tasks.gsm8k(source=str(path))
    with pytest.raises(ValueError, match="does not exist"):
        tasks.gsm8k(source=str(tmp_path / "nowhere.jsonl"))
    with pytest.raises(ValueError, match="no 'test' files"):
        tasks.gsm8k(split="test", source=str(tmp_path))
    with pytest.raises(ValueError, match=r"seems offline: use local files .*--source TASK=PATH"):  # HF_HUB_OFFLINE=1
        tasks.gsm8k(source="hfnanochat-tests/no-such-dataset")


# -- generated tasks -------------------------------------------------------------------------------------------------


def test_identity_is_deterministic_named_and_valid(tmp_path):
    def identity(seed):
        return list(tasks.identity("Zed", size=50, seed=seed)["messages"])

    a = identity(1)
    assert a == identity(1) and a != identity(2)
    answers = [m["content"] for conv in a for m in conv if m["role"] == "assistant"]
    assert sum("Zed" in x for x in answers) > 10 and not any("{name}" in x for x in answers)
    assert len({json.dumps(c) for c in a}) > 40  # varied, not one conversation repeated
    # nanochat's own file format: one JSON list of messages per line
    path = write_jsonl(tmp_path / "identity.jsonl", [[U, A], {"messages": [U, A, U, A]}])
    assert len(tasks.identity(path=str(path))) == 2
    with pytest.raises(ValueError, match="name"):
        tasks.identity(" ")


def test_spelling_tasks(tok):
    def bee(size, split="train", seed=3):
        return list(tasks.spelling_bee(size, split, seed=seed)["messages"])

    assert bee(200) == bee(200)
    assert bee(200)[:50] == bee(50)  # a bigger size only appends
    assert bee(200) != bee(200, seed=4)
    assert bee(200) != bee(200, "test")
    for conv in bee(200):
        code = conv[1]["tool_calls"][0]["function"]["arguments"]["code"]
        word, letter = re.fullmatch(r"'([a-z]+)'\.count\('([a-z])'\)", code).groups()
        assert conv[2] == {"role": "tool", "content": str(word.count(letter)), "tool_calls": None}
        assert f"{word}:{','.join(word)}" in conv[1]["content"]  # spelled out before the tool call
        assert conv[3]["content"].endswith(f"#### {word.count(letter)}")
        ids, mask = render_conversation(tok, conv)
        assert template(tok, conv) == (ids, mask)
    simple = tasks.simple_spelling(20, seed=3)
    for conv in list(simple["messages"]):
        word = conv[0]["content"].removeprefix("Spell the word: ")
        assert conv[1]["content"] == f"{word}:{','.join(word)}"
    with pytest.raises(ValueError, match="lowercase alphabetic"):
        tasks.simple_spelling(3, words=["ok", "Not OK"])
    with pytest.raises(ValueError, match="split"):
        tasks.spelling_bee(3, "validation")


def test_spelling_train_and_test_words_are_disjoint():
    def spelled(split, words=None):
        return {
            conv[0]["content"].removeprefix("Spell the word: ")
            for conv in tasks.simple_spelling(2000, split, words=words)["messages"]
        }

    train, test = spelled("train"), spelled("test")
    assert train and test and not train & test
    # 2,000 draws reach nearly every word of each split: the embedded list is small
    assert len(train | test) > 0.95 * len(set(tasks.spelling.WORDS)) and len(test) < 0.2 * len(train | test)
    bee_words = {
        re.search(r"'([a-z]+)'\.count", conv[1]["tool_calls"][0]["function"]["arguments"]["code"])[1]
        for conv in tasks.spelling_bee(300, "test")["messages"]
    }
    assert bee_words <= test
    # a stable hash: the same words land in test on any machine ("there" is one, "the" is not)
    assert spelled("test", ["the", "there"]) == {"there"}
    with pytest.raises(ValueError, match="no test words"):
        tasks.simple_spelling(3, "test", words=["the"])


# -- user data, length, mixtures ---------------------------------------------------------------------------------------


def test_user_jsonl_is_strict(tmp_path):
    ok = write_jsonl(tmp_path / "ok.jsonl", [{"messages": [U, A]}, [U, A, U, A], VALID["parts"]])
    assert len(tasks.jsonl_conversations(str(ok))) == 3
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps([U, A]) + "\n\n" + json.dumps([U, U]) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl line 3: .*roles must alternate"):
        tasks.jsonl_conversations(str(bad))
    bad.write_text('{"messages": [\n')
    with pytest.raises(ValueError, match="line 1: not valid JSON"):
        tasks.jsonl_conversations(str(bad))
    bad.write_text("\n")
    with pytest.raises(ValueError, match="no conversations"):
        tasks.jsonl_conversations(str(bad))
    with pytest.raises(ValueError, match="no such file"):
        tasks.jsonl_conversations(str(tmp_path / "missing.jsonl"))


def test_drop_long_skips_or_raises(tok, caplog):
    long = [U, {"role": "assistant", "content": "ka lo mi " * 100}]
    data = datasets.Dataset.from_dict(
        {"messages": [tasks.to_messages(c) for c in ([U, A], long, [U, A])]}, features=tasks.FEATURES
    )
    with caplog.at_level(logging.WARNING):
        assert len(tasks.drop_long(data, tok, 64, "fixture")) == 2
    assert "fixture: skipped 1 of 3 conversations" in caplog.text and "more than the context of 64" in caplog.text
    with pytest.raises(ValueError, match=r"fixture: conversation 1 \(0-based, in file order\): \d+ tokens"):
        tasks.drop_long(data, tok, 64, "fixture", strict=True)


def test_mixture_shuffles_and_limits():
    a = list(tasks.simple_spelling(30)["messages"])
    b = list(tasks.spelling_bee(10)["messages"])
    parts = [tasks.simple_spelling(30), tasks.spelling_bee(10)]
    mixed = list(tasks.mixture([parts[0], parts[1], parts[1]])["messages"])  # a part passed twice is seen twice
    assert sorted(map(json.dumps, mixed)) == sorted(map(json.dumps, a + b + b))
    assert mixed[:30] != a  # shuffled together
    assert mixed == list(tasks.mixture([parts[0], parts[1], parts[1]])["messages"])  # with a fixed seed
    assert len(tasks.mixture(parts, limit=7)) == 7
