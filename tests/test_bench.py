"""bench/speed.py, the one command behind the benchmarks page's speed tables, at its tiny CPU size: every bench runs,
its figures land in the JSON lines, and the closing table holds each goal's figure."""

import json
import os
import subprocess
import sys
from pathlib import Path

from test_pretrain import make_corpus

from hfnanochat.tokenizer import save_tokenizer, train_tokenizer

REPO = Path(__file__).resolve().parents[1]


def test_speed_suite_runs_every_bench_and_tables_the_goals(tmp_path):
    jsonl = tmp_path / "speed.jsonl"
    cmd = [sys.executable, str(REPO / "bench" / "speed.py"), "--smoke", "--device", "cpu", "--jsonl", str(jsonl)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert {row["bench"] for row in rows} == {"pretraining", "sft", "rollouts", "decode"}
    assert any(row["bench"] == "sft" and row["loop"] == "SFTTrainer (midtrain)" for row in rows)
    decode = {(row["impl"], row["batch"]) for row in rows if row["bench"] == "decode"}
    assert decode == {(impl, batch) for impl in ("engine", "generate") for batch in (1, 32)}
    table = r.stdout[r.stdout.index("| figure |") :].splitlines()
    engine_b1 = next(row["decode_tok_s"] for row in rows if row["bench"] == "decode" and row["batch"] == 1
                     and row["impl"] == "engine")  # fmt: skip
    assert f"| decode tok/s, batch 1 | {engine_b1:,.1f} | ≥ 2,400 | no |" in table  # a CPU is far from the goal
    assert "| pretraining d20 MFU, % | — | ≥ 60.0 | — |" in table  # no MFU without a GPU's peak


def test_speed_suite_rejects_an_unknown_bench():
    cmd = [sys.executable, str(REPO / "bench" / "speed.py"), "--smoke", "--only", "decode,training"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 2 and "--only training: choose among pretraining, sft, rollouts, decode" in r.stderr


def test_sft_bench_profiles_the_trainer_steps_in_process(tmp_path):
    """--profile trains through train/sft.py's own build in the bench's process and prints where a step's time went
    (on a CPU: the host's share; the GPU lines need CUDA)."""
    tokenizer = train_tokenizer(make_corpus(60_000).split("\n\n"), vocab_size=512)
    save_tokenizer(tokenizer, tmp_path / "tok")
    gsm8k = tmp_path / "gsm8k"
    gsm8k.mkdir()
    with open(gsm8k / "train.jsonl", "w") as f:
        for a in range(40):
            b = 3 * a + 7
            question = f"Tom has {a} apples and buys {b} more. How many apples does he have?"
            f.write(
                json.dumps(
                    {"question": question, "answer": f"He has {a} + {b} = <<{a}+{b}={a + b}>>{a + b}.\n#### {a + b}"}
                )
                + "\n"
            )
    cmd = [sys.executable, str(REPO / "bench" / "sft_throughput.py"), "--gsm8k", str(gsm8k), "--stage", "midtrain",
           "--depth", "2", "--max-seq-len", "128", "--tokenizer", str(tmp_path / "tok"), "--max-rows", "40",
           "--skip-steps", "1",
           "--no-pretrain", "--profile", "--profile-steps", "2", "--total-batch-size", "256", "--",
           "--device-batch-size", "2"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "wall time of one step:" in r.stdout and "host self time:" in r.stdout
    result = json.loads(next(line for line in r.stdout.splitlines() if line.startswith('{"loop"')))
    assert result["loop"] == "SFTTrainer (midtrain)" and result["total_batch"] == 256 and result["tok_per_sec"] > 0
