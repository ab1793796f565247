"""Chat evaluation (nanochat's definitions) and lm-eval on our checkpoints: categorical scoring against a forward pass
written here from the rules, ChatCORE against nanochat's own report, HumanEval verdicts in the sandbox, GSM8K on real
rows through the engine, the CLI's handling of bad input, and lm-eval's own runs on local task files."""

import importlib.util
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_engine import random_model, scripted_model, tiny_config

from hfnanochat.evaluation.chat import (
    TASKS,
    chatcore,
    evaluate_problems,
    extract_program,
    humaneval_program,
    judge,
    load_problems,
    prompt_ids,
)
from hfnanochat.inference.engine import Engine
from hfnanochat.tokenizer import get_special_token_ids, train_tokenizer
from hfnanochat.training.export import save_final

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}

rng = random.Random(0)
SYLLABLES = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"]


def words(n):
    return " ".join("".join(rng.choices(SYLLABLES, k=rng.randint(1, 3))) for _ in range(n))


@pytest.fixture(scope="module")
def tokenizer():
    # "####" must become one token for the scripted GSM8K reply (a bigram chain cannot repeat a token)
    return train_tokenizer([words(30) + " The answer is #### 18. #### 72" * 3 for _ in range(200)], vocab_size=512)


@pytest.fixture(scope="module")
def model(tokenizer):
    return random_model(tiny_config(len(tokenizer), max_position_embeddings=256))


@pytest.fixture(scope="module")
def model_dir(model, tokenizer, tmp_path_factory):
    return save_final(model, tokenizer, tmp_path_factory.mktemp("chat") / "model")


def arc_rows(n, seed=1):
    local = random.Random(seed)
    rows = []
    for i in range(n):
        # nanochat keeps a row's own labels: some ARC rows use 1-4 or have 3 or 5 choices
        labels = ["1", "2", "3"] if i % 5 == 4 else list("ABCDE"[: local.choice([4, 4, 5])])
        rows.append(
            {
                "id": f"q{i}",
                "question": words(local.randint(3, 30)) + "?",
                "choices": {"text": [words(local.randint(1, 4)) for _ in labels], "label": labels},
                "answerKey": local.choice(labels),
            }
        )
    return rows


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A --data-dir with ARC-Easy (Hub layout: ai2_arc/ARC-Easy/test.jsonl) and no GSM8K."""
    root = tmp_path_factory.mktemp("data")
    write_jsonl(root / "ai2_arc" / "ARC-Easy" / "test.jsonl", arc_rows(13))
    return root


def mc_prompt(tokenizer, question, labels, texts):
    """nanochat's chat prompt for a multiple-choice question, spelled out from its rules."""
    sp = get_special_token_ids(tokenizer)
    text = f"Multiple Choice question: {question}\n"
    for label, choice in zip(labels, texts):
        text += f"- {choice}={label}\n"
    text += "\nRespond only with the letter of the correct answer."
    ids = tokenizer.encode(text, add_special_tokens=False)
    return [sp["bos"], sp["user_start"], *ids, sp["user_end"], sp["assistant_start"]]


def letter_argmax(model, ids, letter_ids):
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
    return int(logits[letter_ids].argmax())


# ------------------------------------------------------------------------------------------------------------------


def test_categorical_scoring_equals_an_independent_computation(tokenizer, model, data_dir):
    rows = arc_rows(13)
    problems, bad = load_problems("arc-easy", str(data_dir / "ai2_arc"))
    assert bad == 0 and len(problems) == len(rows)
    # nanochat's order: datasets' shuffle with seed 42 is numpy's default_rng(42) permutation
    order = np.random.default_rng(42).permutation(len(rows))
    expected = []
    for problem, k in zip(problems, order):
        row = rows[k]
        labels, texts = row["choices"]["label"], row["choices"]["text"]
        assert problem["letters"] == labels
        ids = mc_prompt(tokenizer, row["question"], labels, texts)
        letter_ids = [tokenizer.convert_tokens_to_ids(label) for label in labels]
        expected.append(int(labels[letter_argmax(model, ids, letter_ids)] == row["answerKey"]))
    # batches of 3 mix prompt lengths: the right padding must not move the answer position
    correct, truncated = evaluate_problems("arc-easy", problems, model, tokenizer, batch_size=3)
    assert truncated == 0
    assert correct == expected
    assert 0 < sum(correct) < len(correct)  # a random model: some right, some wrong, so the comparison means something
    # --max-problems takes nanochat's first N
    firsts, _ = load_problems("arc-easy", str(data_dir / "ai2_arc"), max_problems=4)
    assert [p["messages"] for p in firsts] == [p["messages"] for p in problems[:4]]


def test_a_prompt_longer_than_the_context_keeps_its_last_tokens_and_is_counted(tokenizer, data_dir):
    short = random_model(tiny_config(len(tokenizer), max_position_embeddings=128))
    problems, _ = load_problems("arc-easy", str(data_dir / "ai2_arc"))
    full = [prompt_ids(tokenizer, p, None)[0] for p in problems]
    assert any(len(ids) > 128 for ids in full) and any(len(ids) <= 128 for ids in full)
    correct, truncated = evaluate_problems("arc-easy", problems, short, tokenizer, batch_size=4)
    assert truncated == sum(len(ids) > 128 for ids in full)
    expected = []
    for problem, ids in zip(problems, full):
        letter_ids = [tokenizer.convert_tokens_to_ids(label) for label in problem["letters"]]
        k = letter_argmax(short, ids[-128:], letter_ids)
        expected.append(int(problem["letters"][k] == problem["messages"][-1]["content"]))
    assert correct == expected


def test_chatcore_formula_on_hand_numbers_and_on_nanochats_report():
    hand = {"ARC-Easy": 0.55, "ARC-Challenge": 0.40, "MMLU": 0.25, "GSM8K": 0.10, "HumanEval": 0.05}
    # centred: 0.3/0.75, 0.15/0.75, 0, 0.10, 0.05
    assert math.isclose(chatcore(hand), (0.4 + 0.2 + 0.0 + 0.10 + 0.05) / 5)
    # the seed's report card: MID and SFT rows give its ChatCORE 0.0730 and 0.0884
    mid = {"ARC-Easy": 0.3561, "ARC-Challenge": 0.2875, "MMLU": 0.3111, "GSM8K": 0.0250, "HumanEval": 0.0671}
    sft = {"ARC-Easy": 0.3876, "ARC-Challenge": 0.2807, "MMLU": 0.3151, "GSM8K": 0.0455, "HumanEval": 0.0854}
    assert round(chatcore(mid), 4) == 0.0730
    assert round(chatcore(sft), 4) == 0.0884
    assert chatcore({"ARC-Easy": 0.25, "GSM8K": 0.0}) == 0.0  # chance everywhere
    with pytest.raises(ValueError, match="ChatCORE needs"):
        chatcore({"SpellingBee": 0.5})


def test_humaneval_through_the_sandbox_passes_canonical_and_fails_wrong_solutions():
    problems, bad = load_problems("humaneval")
    assert len(problems) == 164 and bad == 0
    chosen = problems[:3]
    replies = []
    for p in chosen:
        canonical = p["messages"][-1]["content"]  # prompt + canonical solution, nanochat's reference answer
        fenced = f"Here is the function:\n```python\n{canonical}\n```\nIt passes the examples."
        signature = p["prompt"].rstrip()
        wrong = f"{signature}\n    return None\n"
        body_only = p["messages"][-1]["content"][len(p["prompt"]) :]  # no def: nanochat runs the reply as the program
        replies.append([canonical, fenced, wrong, body_only])
    assert extract_program(replies[0][1]) == replies[0][0].strip()
    assert "check(" in humaneval_program(chosen[0], replies[0][0])
    assert judge("humaneval", chosen, replies, workers=4) == [2, 2, 2]
    # each verdict on its own, to see which passed
    verdicts = judge("humaneval", [chosen[0]] * 4, [[r] for r in replies[0]], workers=4)
    assert verdicts == [1, 1, 0, 0]


@pytest.mark.skipif(not (SHARED / "data" / "gsm8k" / "test.jsonl").is_file(), reason="needs ../shared/data/gsm8k")
def test_gsm8k_on_real_rows_through_the_engine_with_a_scripted_reply(tokenizer):
    problems, bad = load_problems("gsm8k", str(SHARED / "data" / "gsm8k"))
    assert len(problems) == 1319 and bad == 0
    janet = next(p for p in problems if p["messages"][0]["content"].startswith("Janet’s ducks"))
    assert janet["reference"].endswith("#### 18")
    others = [p for p in problems if not p["reference"].endswith("#### 18")][:2]
    chosen = [others[0], janet, others[1]]
    # a real model whose greedy reply to any prompt is "The answer is #### 18" and then <|assistant_end|>
    sp = get_special_token_ids(tokenizer)
    reply = tokenizer.encode("The answer is #### 18", add_special_tokens=False)
    model = scripted_model(tokenizer, [sp["assistant_start"], *reply, sp["assistant_end"]])
    correct, truncated = evaluate_problems(
        "gsm8k", chosen, model, tokenizer, engine=Engine(model, tokenizer), batch_size=2, max_new_tokens=16
    )
    assert correct == [0, 1, 0]
    # the context is 128 tokens: the longer prompts kept their end (still <|assistant_start|>) and were counted
    assert truncated == sum(len(prompt_ids(tokenizer, p, None)[0]) > 128 for p in chosen) > 0
    # nanochat's rule: the number after "####", commas removed, exact
    assert judge("gsm8k", [janet] * 4, [["#### 18"], ["so #### 18.0"], ["#### 1,8"], ["18"]]) == [1, 0, 1, 0]


def run_cli(*args):
    env = {**os.environ, **OFFLINE, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, str(ROOT / "eval" / "chat_eval.py"), *args], capture_output=True, text=True, env=env
    )


def test_cli_runs_the_tasks_it_can_and_names_what_it_skipped(tokenizer, model, model_dir, data_dir, tmp_path):
    out, report_dir = tmp_path / "results.json", tmp_path / "report"
    # the report module comes from the report work; the CLI imports it only when asked for a report
    report = (
        ["--report-dir", str(report_dir), "--column", "SFT"] if importlib.util.find_spec("hfnanochat.report") else []
    )
    proc = run_cli(
        "--model", str(model_dir), "--tasks", "arc-easy,bogus,gsm8k", "--data-dir", str(data_dir),
        "--max-problems", "5", "--out", str(out), *report,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "error: bogus: unknown task" in proc.stderr
    assert "error: gsm8k:" in proc.stderr and "does not exist" in proc.stderr
    result = json.loads(out.read_text())
    problems, _ = load_problems("arc-easy", str(data_dir / "ai2_arc"), max_problems=5)
    correct, _ = evaluate_problems("arc-easy", problems, model, tokenizer)
    assert result["tasks"]["ARC-Easy"]["accuracy"] == sum(correct) / 5
    assert result["tasks"]["ARC-Easy"]["total"] == 5
    assert result["ChatCORE"] is None  # nanochat's ChatCORE needs all five tasks
    assert set(result["skipped"]) == {"bogus", "gsm8k"}
    if report:
        written = "".join(f.read_text() for f in report_dir.rglob("*") if f.is_file() and "chat-eval-sft" in f.name)
        assert '"ARC-Easy"' in written and str(result["tasks"]["ARC-Easy"]["accuracy"]) in written

    no_tokenizer = tmp_path / "weights_only"
    no_tokenizer.mkdir()
    for f in model_dir.iterdir():
        if f.name.startswith(("config", "model", "modeling", "configuration", "generation")):
            (no_tokenizer / f.name).write_bytes(f.read_bytes())
    proc = run_cli("--model", str(no_tokenizer), "--tasks", "arc-easy")
    assert proc.returncode == 2 and proc.stderr.startswith("error: no tokenizer in"), proc.stderr


def test_unknown_task_in_the_library_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown chat task 'hellaswag'.*arc-easy"):
        load_problems("hellaswag")
    assert set(TASKS) == {"arc-easy", "arc-challenge", "mmlu", "gsm8k", "humaneval"}


# ------------------------------------------------------------------------------------------------------------------
# lm-eval on our checkpoints, through lm-eval itself, offline on local task files


@pytest.fixture()
def lm_eval_data(tmp_path, monkeypatch):
    """eval/tasks' files (data/lm_eval/arc_easy/{train,test}.jsonl) under a working directory of their own."""
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    rows = arc_rows(10, seed=2)
    for split in ("train", "test"):
        write_jsonl(tmp_path / "data" / "lm_eval" / "arc_easy" / f"{split}.jsonl", rows)
    monkeypatch.chdir(tmp_path)
    return rows


def loglikelihood(model, context_ids, whole_ids):
    with torch.no_grad():
        logprobs = model(input_ids=torch.tensor([whole_ids])).logits[0].float().log_softmax(-1)
    return sum(logprobs[i - 1, whole_ids[i]].item() for i in range(len(context_ids), len(whole_ids)))


def test_lm_eval_runs_a_local_task_on_a_saved_model_like_the_cli(tokenizer, model, model_dir, lm_eval_data):
    import lm_eval
    from lm_eval.tasks import TaskManager

    tasks = TaskManager(include_path=str(ROOT / "eval" / "tasks"), include_defaults=False)
    # what `lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True,add_bos_token=True` runs
    out = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={model_dir},trust_remote_code=True,add_bos_token=True",
        tasks=["arc_easy_local"],
        task_manager=tasks,
        num_fewshot=0,
        batch_size=4,
        device="cpu",
    )
    samples = sorted(out["samples"]["arc_easy_local"], key=lambda s: s["doc_id"])
    bos = tokenizer.bos_token_id
    hits = []
    for sample, row in zip(samples, lm_eval_data):
        context = f"Question: {row['question']}\nAnswer:"
        context_ids = [bos, *tokenizer.encode(context, add_special_tokens=False)]
        ours = []
        for text in row["choices"]["text"]:
            whole = [bos, *tokenizer.encode(f"{context} {text}", add_special_tokens=False)]
            ours.append(loglikelihood(model, context_ids, whole))
        theirs = [r[0] for r in sample["filtered_resps"]]
        assert np.allclose(theirs, ours, atol=1e-3), (theirs, ours)
        hits.append(int(np.argmax(ours)) == row["choices"]["label"].index(row["answerKey"]))
    assert math.isclose(out["results"]["arc_easy_local"]["acc,none"], sum(hits) / len(hits))


def test_lm_eval_chat_task_in_process_equals_nanochats_categorical_score(tokenizer, model, lm_eval_data, tmp_path):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tasks = TaskManager(include_path=str(ROOT / "eval" / "tasks"), include_defaults=False)
    out = lm_eval.simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4, device="cpu"),
        tasks=["arc_easy_chat"],
        task_manager=tasks,
        num_fewshot=0,
        apply_chat_template=True,
        fewshot_as_multiturn=True,
    )
    # the same rows through eval/chat_eval.py's scoring: the letter logits at <|assistant_start|>
    write_jsonl(tmp_path / "ai2_arc" / "ARC-Easy" / "test.jsonl", lm_eval_data)
    problems, _ = load_problems("arc-easy", str(tmp_path / "ai2_arc"))
    correct, _ = evaluate_problems("arc-easy", problems, model, tokenizer)
    assert math.isclose(out["results"]["arc_easy_chat"]["acc,none"], sum(correct) / len(correct))
    by_question = {p["messages"][0]["content"]: c for p, c in zip(problems, correct)}
    for sample in out["samples"]["arc_easy_chat"]:
        context = sample["arguments"][0][0]
        question = context.split("<|user_start|>")[1].split("<|user_end|>")[0]
        assert sample["acc"] == by_question[question]
