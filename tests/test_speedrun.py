"""The README's main command end to end: `bash speedrun.sh --rl` in a fresh copy of the repository, offline, with no
data beside it, on CPU (the tiny preset; HFNANOCHAT_SPEEDRUN_SMOKE=1 shortens it to fit CI). Every stage must run, the
report must fill its summary table for the stages that ran, a second run must skip them all, and the chat command the
run prints at its end must answer. The first run stops half way (--stop-after) and the same command finishes it."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROWS = ["CORE", "ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "ChatCORE"]
COLUMNS = ["BASE", "MID", "SFT", "RL"]
STAGES = ["data", "tokenizer", "pretrain", "core", "mid", "chat_eval_mid", "sft", "chat_eval_sft", "rl", "chat_eval_rl"]


def fresh_copy(dest: Path) -> Path:
    """The tracked and untracked-but-not-ignored files, as a clone would have them (no out/, no .venv)."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    for name in filter(None, (f.decode() for f in files)):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def speedrun(repo: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(
        os.environ,
        PYTHON=sys.executable,
        HF_HUB_OFFLINE="1",
        HFNANOCHAT_SPEEDRUN_SMOKE="1",
        CUDA_VISIBLE_DEVICES="",  # the CPU path, whatever the test machine has
        OMP_NUM_THREADS="2",
    )
    env.pop("PYTHONPATH", None)  # the copy's own code, as a user's clone would use
    # the README's first command, from the README's own text (a user copies it from there)
    command = shlex.split(readme_commands(repo)[0])
    return subprocess.run([*command, *args], cwd=repo, env=env, capture_output=True, text=True)


def readme_commands(repo: Path) -> list[str]:
    """The README's set-up commands: its fenced bash blocks, in order."""
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", (repo / "README.md").read_text(), re.S)]


def test_readme_starts_with_the_main_job_and_the_test_command_ci_runs():
    main_job, tests = readme_commands(ROOT)[:2]
    assert main_job == "bash speedrun.sh"
    assert tests.startswith("pip install") and "pytest" in tests
    assert tests in (ROOT / ".ci" / "run").read_text()  # CI runs exactly the README's test command


def summary_table(report: str) -> dict[str, dict[str, str]]:
    table = {}
    for line in report.split("## Summary", 1)[1].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == len(COLUMNS) + 1 and cells[0] in ROWS:
            table[cells[0]] = dict(zip(COLUMNS, cells[1:]))
    return table


@pytest.mark.slow
def test_speedrun_offline_end_to_end(tmp_path):
    repo = fresh_copy(tmp_path / "hfnanochat")
    # in two parts, as a job with a time limit runs it: --stop-after, then the same command without it
    first = speedrun(repo, "--rl", "--stop-after", "sft")
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    assert "== stopped after sft (--stop-after); to continue: bash speedrun.sh --rl" in first.stdout
    assert "== chat_eval_sft" not in first.stdout
    assert (repo / "out" / "report" / "sft.json").is_file()  # the last stage's report section was written
    run = speedrun(repo, "--rl")
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    out = repo / "out"
    for i, stage in enumerate(STAGES):
        ran_in = first if i <= STAGES.index("sft") else run
        assert f"== {stage} done" in ran_in.stdout, stage
        assert (out / "logs" / f"{stage}.log").is_file()

    report = (out / "report" / "report.md").read_text()
    assert "offline data" in report and "near chance" in report
    for section in [
        "## tokenizer",
        "## pretrain",
        "## core",
        "## mid",
        "## sft",
        "## rl",
        "## chat-eval-mid",
        "## chat-eval-sft",
        "## chat-eval-rl",
        "## data",
    ]:
        assert section in report, section
    table = summary_table(report)
    assert sorted(table) == sorted(ROWS)
    number = re.compile(r"^-?\d+(\.\d+)?$")
    assert number.match(table["CORE"]["BASE"]), table["CORE"]
    for row in ROWS[1:]:
        for column in ["MID", "SFT", "RL"]:
            assert number.match(table[row][column]), (row, column, table[row])
    assert "Total wall time" in report and "Estimated cost" in report
    for stage in STAGES:  # each stage's whole process, timed by the script
        assert re.search(rf"^\| {stage} \| \d+m\d\ds \| 0 \|$", report, re.M), stage

    # the last lines say how to chat, and that command works
    assert run.stdout.rstrip().splitlines()[-1].strip() == "python -m hfnanochat.chat --model out/rl/final"
    chat = subprocess.run(
        [sys.executable, "-m", "hfnanochat.chat", "--model", "out/sft/final", "-p", "hi", "--max-new-tokens", "16"],
        cwd=repo,
        env=dict(os.environ, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(repo)),
        capture_output=True,
        text=True,
    )
    assert chat.returncode == 0, chat.stderr[-2000:]
    assert chat.stdout.strip()

    # a second run finds every stage complete and only rewrites the report
    again = speedrun(repo, "--rl")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    for stage in STAGES:
        assert f"== {stage}: skipped, its output is complete" in again.stdout, stage
    assert "== report done" in again.stdout


def test_speedrun_bad_arguments(tmp_path):
    """User errors: one line naming the problem, exit 2, nothing written."""
    for args, message in [
        (["--preset", "d99"], "error: --preset d99: one of d20, d26, d32, gpu, tiny"),
        (["--bogus"], "error: unknown argument --bogus"),
        (["--push", "noslash"], "error: --push noslash: a repo id ORG/NAME"),
        (["--stop-after", "lunch"], "error: --stop-after lunch: one of data tokenizer pretrain core mid"),
    ]:
        run = subprocess.run(["bash", str(ROOT / "speedrun.sh"), *args, "--out", str(tmp_path / "o")],
                             capture_output=True, text=True)  # fmt: skip
        assert run.returncode == 2 and run.stderr.strip().startswith(message), (args, run.stderr)
    assert not (tmp_path / "o").exists()


def test_offline_evals_are_read_by_the_real_loaders(tmp_path):
    """The generated stand-ins load through the same code as the public datasets, their calculator marks are right,
    and the same seed writes the same files."""
    from hfnanochat.evaluation.chat import load_problems
    from hfnanochat.evaluation.core import load_bundle, load_rows
    from hfnanochat.inference.sandbox import calculator
    from hfnanochat.tasks.gsm8k import extract_answer
    from hfnanochat.training.offline_data import write_offline_evals

    out = write_offline_evals(tmp_path / "a", seed=3, train=50, test=20)
    for task, folder in [("arc-easy", "ai2_arc"), ("arc-challenge", "ai2_arc"), ("mmlu", "mmlu"), ("gsm8k", "gsm8k")]:
        problems, bad = load_problems(task, str(out / folder))
        assert len(problems) == 20 and bad == 0, task
    for row in map(json.loads, (out / "gsm8k" / "main" / "train.jsonl").read_text().splitlines()):
        marks = re.findall(r"<<([^=>]+)=([^>]+)>>", row["answer"])
        assert marks and all(calculator(expr) == result for expr, result in marks), row
        assert extract_answer(row["answer"]) == marks[-1][1]
    tasks, skipped = load_bundle(out / "core")
    assert not skipped and [t.task_type for t in tasks] == ["language_modeling", "multiple_choice"]
    assert all(len(load_rows(t)) == 20 for t in tasks)
    assert "MIT" in (out / "LICENSE.txt").read_text()
    again = write_offline_evals(tmp_path / "b", seed=3, train=50, test=20)
    for path in out.rglob("*.jsonl"):
        assert path.read_bytes() == (again / path.relative_to(out)).read_bytes(), path
