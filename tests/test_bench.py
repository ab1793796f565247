"""bench/speed.py, the one command behind the benchmarks page's speed tables, at its tiny CPU size: every bench runs,
its figures land in the JSON lines, and the closing table holds each goal's figure."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from hfnanochat.tokenizer import render_conversation

REPO = Path(__file__).resolve().parents[1]


def test_speed_suite_runs_every_bench_and_tables_the_goals(tmp_path):
    jsonl = tmp_path / "speed.jsonl"
    cmd = [sys.executable, str(REPO / "bench" / "speed.py"), "--smoke", "--device", "cpu", "--jsonl", str(jsonl)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert {row["bench"] for row in rows} == {"check", "pretraining", "sft", "rollouts", "decode"}
    checks = [row for row in rows if row["bench"] == "check"]
    assert len(checks) == 4 and all(row["ok"] for row in checks)  # decode at batch 1 and 4; 2 training paths
    assert any(row["bench"] == "sft" and row["loop"] == "SFTTrainer (midtrain)" for row in rows)
    decode = {(row["impl"], row["batch"]) for row in rows if row["bench"] == "decode"}
    assert decode == {(impl, batch) for impl in ("engine", "generate") for batch in (1, 32)}
    table = r.stdout[r.stdout.index("| figure |") :].splitlines()
    engine_b1 = next(row["decode_tok_s"] for row in rows if row["bench"] == "decode" and row["batch"] == 1
                     and row["impl"] == "engine")  # fmt: skip
    assert f"| decode tok/s, batch 1 | {engine_b1:,.1f} | ≥ 2,400 | no |" in table  # a CPU is far from the goal
    assert "| pretraining d20 MFU, % | — | ≥ 60.0 | — |" in table  # no MFU without a GPU's peak
    assert "| correctness checks passed | 4 | 4 | yes |" in table
    # every measurement says its peak GPU memory: none on a CPU, so no memory table
    assert all("peak_mem_gib" in row and row["peak_mem_gib"] is None for row in rows)
    assert "| peak GPU memory of | GiB |" not in r.stdout


def test_speed_summary_lists_each_measurements_peak_memory():
    spec = importlib.util.spec_from_file_location("speed", REPO / "bench" / "speed.py")
    speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(speed)
    rows = [  # as the GPU benches write them
        {"bench": "pretraining", "depth": 20, "mfu_pct": 51.6, "peak_mem_gib": 49.06},
        {"bench": "sft", "loop": "SFTTrainer (midtrain)", "depth": 12, "tok_per_sec": 5.0e5, "peak_mem_gib": 20.4},
        {"bench": "sft", "loop": "pretraining step", "depth": 12, "tok_per_sec": 6.0e5, "peak_mem_gib": 18.0},
        {"bench": "decode", "impl": "engine", "cache": "static", "batch": 32, "depth": 20, "decode_tok_s": 1.7e4,
         "peak_mem_gib": 6.25},
        {"bench": "decode", "impl": "generate", "cache": "static", "batch": 32, "depth": 20, "decode_tok_s": 9.5e3},
    ]  # fmt: skip
    table = speed.summary(rows)
    assert "| SFTTrainer tok/s as a share of our loop's, d12 | 83.3% | ≥ 90% | no |" in table
    memory = table[table.index("| peak GPU memory of | GiB |") + 2 :]
    assert memory == [
        "| pretraining, d20 | 49.1 |",
        "| sft, SFTTrainer (midtrain), d12 | 20.4 |",
        "| sft, pretraining step, d12 | 18.0 |",
        "| decode, engine, static, batch 32, d20 | 6.2 |",
    ]


def test_gpu_check_allows_a_different_token_only_at_a_near_tie():
    sys.path.insert(0, str(REPO / "bench"))
    from gpu_check import agreement

    reference, gaps = [5, 6, 7, 8], [2.0, 0.0005, 1.5, 3.0]
    assert agreement([5, 6, 7, 8], reference, gaps, tie=1e-3) == (4, True)
    assert agreement([5, 9, 1, 1], reference, gaps, tie=1e-3) == (1, True)  # the reference nearly tied there
    assert agreement([5, 6, 9, 8], reference, gaps, tie=1e-3) == (2, False)  # a clear winner, not taken
    assert agreement([5, 6], reference, gaps, tie=1e-3) == (2, False)  # stopped early


def test_decode_profile_counts_overlapping_kernels_once():
    """bench/decode.py --profile's timeline: kernels launched early (programmatic dependent launch) overlap the one
    before; their overlap is busy time once, and gaps split into launch gaps and waits for the host."""
    sys.path.insert(0, str(REPO / "bench"))
    from decode import timeline

    # 0-10 and 6-14 overlap (14 busy), a 2 us launch gap, 16-20, a 30 us wait, 50-51, then one inside 50-51's span
    span, busy, short, long = timeline([(0, 10), (6, 14), (16, 20), (50, 51), (50.5, 50.8)])
    assert (span, busy, short, long) == (51, 19, 2, 30)
    assert span == busy + short + long


def test_speed_suite_rejects_an_unknown_bench():
    cmd = [sys.executable, str(REPO / "bench" / "speed.py"), "--smoke", "--only", "decode,training"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 2 and "--only training: choose among check, pretraining, sft, rollouts, decode" in r.stderr


@pytest.mark.slow
def test_stage_memory_runs_every_stage_for_a_few_steps(tmp_path):
    """bench/stage_memory.py at a tiny size: each stage's own entry point runs and reports (no GPU: no peak)."""
    tokenizer = tmp_path / "tok"
    data = tmp_path / "data"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-m", "hfnanochat.training.offline_data", str(data / "corpus.txt"),
                    "--word-problems", "200", "--evals", str(data / "evals")],
                   check=True, env=env, cwd=REPO, capture_output=True)  # fmt: skip
    subprocess.run([sys.executable, "train/tokenizer.py", "--vocab-size", "1024", "--data", str(data / "corpus.txt"),
                    "--out", str(tokenizer)], check=True, env=env, cwd=REPO, capture_output=True)  # fmt: skip
    jsonl = tmp_path / "memory.jsonl"
    cmd = [sys.executable, "bench/stage_memory.py", "--tokenizer", str(tokenizer), "--depth", "2", "--data-dir",
           str(data / "evals"), "--stages", "pretrain,mid,sft,rl,chat_eval,core", "--jsonl", str(jsonl), "--out",
           str(tmp_path / "run"),
           "--pretrain-args", "--max-seq-len 128 --device-batch-size 4 --total-batch-size 1024",
           "--mid-args", "--max-seq-len 128 --device-batch-size 4 --total-batch-size 1024 --max-rows 40",
           "--sft-args", "--device-batch-size 2 --examples-per-step 4",
           "--rl-args", "--max-new-tokens 16 --prompts-per-step 2 --num-samples 2 --device-batch-size 2 "
                        "--prompts-per-call 2",
           "--chat-eval-args", "--max-problems 2 --max-new-tokens 16", "--core-args", "--max-per-task 4"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [row["stage"] for row in rows] == ["pretrain", "mid", "sft", "rl", "chat_eval", "core"]
    assert all(row["peak_mem_gib"] is None for row in rows)
    # SFT trained on conversations that fill the model's context (128 tokens here): its worst case
    sft_steps = [json.loads(line) for line in (tmp_path / "run" / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert sft_steps and all(s["loss"] == s["loss"] for s in sft_steps if "loss" in s)
    chats = [json.loads(line) for line in (tmp_path / "run" / "full_context_chats.jsonl").read_text().splitlines()]
    chat_tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    lengths = [len(render_conversation(chat_tokenizer, c["messages"], sys.maxsize)[0]) for c in chats]
    assert len(chats) == 96 and all(100 <= n <= 128 for n in lengths), lengths


def test_stage_memory_reads_a_flag_in_either_form():
    sys.path.insert(0, str(REPO / "bench"))
    from stage_memory import flag_value

    assert flag_value(["--device-batch-size", "4", "--max-seq-len", "512"], "--max-seq-len") == 512
    assert flag_value(["--max-seq-len=256"], "--max-seq-len") == 256
    assert flag_value(["--max-seq-len-x", "3"], "--max-seq-len") is None
