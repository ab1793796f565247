"""The speed tables of docs/benchmarks.md in one command on one GPU: a correctness check, then pretraining, SFT
against our own loop, RL rollouts, decode; then each figure against its goal.

    python bench/speed.py --tokenizer tok --gsm8k gsm8k     # one GPU
    python bench/speed.py                                   # offline: generates its tokenizer and word problems first
    python bench/speed.py --smoke --device cpu              # every bench at a tiny size (what the test runs)

Each bench runs in a process of its own, one after the other, with its own time limit: one that fails or runs out of
time is reported and the others still run. Every JSON line of every bench goes to --jsonl (default
bench-speed.jsonl); the run ends with a table of the figures and their goals, then each measurement's peak GPU
memory, and exits non-zero if a bench failed. --profile: the pretraining, SFT and decode benches also profile their
steps and print where the time went. Correctness comes first: bench/gpu_check.py compares the fast paths the other
benches time (the compiled decode with its kernels, the compiled pretraining and SFT losses and gradients) with the
plain model on the GPU; the run fails if any comparison does.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hfnanochat.training.metrics import append_jsonl

ROOT = Path(__file__).resolve().parents[1]
BENCHES = ("check", "pretraining", "sft", "rollouts", "decode")

# (figure, bench, the fields its JSON line has, the key read, the goal); from the speed issue of the roadmap
GOALS = [
    ("pretraining d20 MFU, %", "pretraining", {}, "mfu_pct", 60.0),
    ("rollout tok/s, 16 x 16 at d20", "rollouts", {"impl": "engine"}, "tok_per_sec", 15000),
    ("decode tok/s, batch 1", "decode", {"impl": "engine", "batch": 1}, "decode_tok_s", 2400),
    ("decode tok/s, batch 32", "decode", {"impl": "engine", "batch": 32}, "decode_tok_s", 25000),
]


def benches(args, tok: str, gsm8k: str) -> list[tuple[str, list[str], int]]:
    """(name, command, seconds allowed) of each bench, sized for one GPU, or tiny with --smoke."""
    py = sys.executable
    if args.smoke:
        return [
            ("check", [py, "bench/gpu_check.py", "--depth", "2", "--train-depth", "2", "--vocab-size", "512",
                       "--seq-len", "64", "--prompt-len", "16", "--new-tokens", "8", "--batch", "4", "--device",
                       args.device], 300),
            ("pretraining", [py, "bench/pretrain_throughput.py", "--depth", "2", "--max-seq-len", "64",
                             "--device-batch-size", "2", "--total-batch-size", "256", "--vocab-size", "512",
                             "--steps", "2", "--warmup", "1", "--no-compile", "--loss-chunk-size", "64"], 300),
            ("sft", [py, "bench/sft_throughput.py", "--gsm8k", gsm8k, "--stage", "midtrain", "--depth", "2",
                     "--max-seq-len", "256", "--vocab-size", "512", "--max-rows", "400", "--skip-steps", "0",
                     "--no-pretrain", "--total-batch-size", "512", "--", "--device-batch-size", "2"], 300),
            ("rollouts", [py, "bench/rl_rollouts.py", "--depth", "2", "--vocab-size", "4096", "--tokenizer", tok,
                          "--data", f"{gsm8k}/train.jsonl", "--prompts", "2", "--samples", "2", "--new-tokens", "8",
                          "--repeats", "1", "--impls", "engine", "--device", args.device], 300),
            ("decode", [py, "bench/decode.py", "--depth", "2", "--vocab-size", "4096", "--prompt-len", "16",
                        "--new-tokens", "8", "--repeats", "1", "--tokenizer", tok, "--configs",
                        "engine/static,generate/static", "--device", args.device], 300),
        ]  # fmt: skip
    profiled = ["--profile"] if args.profile else []
    return [
        # decode at d20 (batch 1 and 8), the pretraining and SFT losses and gradients at d4, vocabulary 65,536
        ("check", [py, "bench/gpu_check.py"], 120),
        # the d20 preset's step: the comparison with nanochat is at these settings
        ("pretraining", [py, "bench/pretrain_throughput.py", "--depth", "20", "--loss-chunk-size", "8192",
                         "--activation-memory-budget", "0.9", "--steps", "3", "--warmup", "2", *profiled], 180),
        # mid-training through SFTTrainer (compiled) and our pretraining step, both d12 on packed 2048-token rows
        ("sft", [py, "bench/sft_throughput.py", "--gsm8k", gsm8k, "--stage", "midtrain", "--max-rows", "7473",
                 "--tokenizer", tok, "--total-batch-size", "65536", *profiled], 300),
        ("rollouts", [py, "bench/rl_rollouts.py", "--depth", "20", "--tokenizer", tok, "--data",
                      f"{gsm8k}/train.jsonl", "--repeats", "2"], 120),
        ("decode", [py, "bench/decode.py", "--tokenizer", tok, "--repeats", "3", "--configs",
                    "engine/static,generate/static", *profiled], 150),
    ]  # fmt: skip


def offline_inputs(work: Path, smoke: bool) -> tuple[str, str]:
    """A chat tokenizer and a GSM8K-layout folder made here (word problems with `####` answers), for a machine
    without the Hub or local copies."""
    data = work / "data"
    problems = "2000" if smoke else "20000"
    run_quiet([sys.executable, "-m", "hfnanochat.training.offline_data", str(data / "corpus.txt"),
               "--word-problems", problems, "--evals", str(data / "evals")])  # fmt: skip
    vocab = "4096" if smoke else "8192"
    run_quiet([sys.executable, "train/tokenizer.py", "--vocab-size", vocab, "--data", str(data / "corpus.txt"),
               "--out", str(work / "tok")])  # fmt: skip
    return str(work / "tok"), str(data / "evals" / "gsm8k" / "main")


def run_quiet(cmd: list[str]) -> None:
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")


def run_bench(name: str, cmd: list[str], limit: int, jsonl: Path, show: bool) -> tuple[list[dict], str | None]:
    """The bench's JSON lines (tagged with its name, appended to `jsonl`) and why it failed, if it did. `show`: also
    print what else it wrote to stdout (its profile)."""
    print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.monotonic()
    try:
        result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit)
        output = result.stdout + result.stderr
        failure = None if result.returncode == 0 else f"exit code {result.returncode}"
    except subprocess.TimeoutExpired as e:  # what it printed before is kept: its figures so far still count
        output = "".join(b.decode(errors="replace") if isinstance(b, bytes) else b for b in (e.stdout, e.stderr) if b)
        failure = f"stopped after its {limit} s"
    lines = []
    for line in output.splitlines():
        if line.startswith("{"):
            row = {"bench": name, **json.loads(line)}
            lines.append(row)
            append_jsonl(jsonl, row)
    if show and not failure:
        print("\n".join(f"   {line}" for line in result.stdout.splitlines() if not line.startswith("{")), flush=True)
    if failure:
        print(f"   FAILED ({failure}):\n" + "\n".join(output.splitlines()[-15:]), flush=True)
    print(f"   {len(lines)} figure(s) in {time.monotonic() - t0:.0f} s", flush=True)
    return lines, failure


def summary(rows: list[dict]) -> list[str]:
    """Each goal's figure (the first matching line), and SFT's rate as a share of our pretraining loop's."""
    table = ["| figure | measured | goal | met |", "|---|---|---|---|"]
    checks = [r for r in rows if r["bench"] == "check"]
    if checks:
        passed = sum(bool(r.get("ok")) for r in checks)
        table.append(
            f"| correctness checks passed | {passed} | {len(checks)} | {'yes' if passed == len(checks) else 'no'} |"
        )
    for what, bench, fields, key, goal in GOALS:
        matching = (r for r in rows if r["bench"] == bench and fields.items() <= r.items())
        found = next((r[key] for r in matching if r.get(key) is not None), None)
        shown = "—" if found is None else f"{found:,.1f}"
        met = "—" if found is None else ("yes" if found >= goal else "no")
        table.append(f"| {what} | {shown} | ≥ {goal:,} | {met} |")
    sft = next((r["tok_per_sec"] for r in rows if str(r.get("loop", "")).startswith("SFTTrainer")), None)
    own = next((r["tok_per_sec"] for r in rows if r.get("loop") == "pretraining step"), None)
    if sft is not None and own is not None:
        share = 100 * sft / own
        table.append(f"| SFTTrainer tok/s as a share of our loop's, d12 | {share:.1f}% | ≥ 90% | "
                     f"{'yes' if share >= 90 else 'no'} |")  # fmt: skip
    return table + memory_table(rows)


def memory_table(rows: list[dict]) -> list[str]:
    """Each measurement's peak GPU memory (warm-up included), named by its bench and what sets it apart."""
    table = []
    for r in rows:
        if r.get("peak_mem_gib") is None or r["bench"] == "check":  # the check's models are not a stage's
            continue
        parts = [r["bench"]] + [str(r[k]) for k in ("loop", "impl", "cache") if r.get(k)]
        parts += [f"batch {r['batch']}"] if r.get("batch") else []
        parts += [f"d{r['depth']}"] if isinstance(r.get("depth"), int) else []
        table.append(f"| {', '.join(parts)} | {r['peak_mem_gib']:.1f} |")
    return ["", "| peak GPU memory of | GiB |", "|---|---|", *table] if table else []


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", default=None, help="chat tokenizer folder (default: trained here on generated text)")
    p.add_argument("--gsm8k", default=None, help="folder with GSM8K's train.jsonl (default: generated word problems)")
    p.add_argument("--only", default=None, help="comma-separated subset: " + ", ".join(BENCHES))
    p.add_argument("--smoke", action="store_true", help="every bench at a tiny size (CPU)")
    p.add_argument("--device", default="cuda", help="--smoke: the device of the decode and rollout benches")
    p.add_argument("--jsonl", default="bench-speed.jsonl")
    p.add_argument("--profile", action="store_true", help="GPU: pretraining, SFT and decode also print their profiles")
    args = p.parse_args(argv)
    names = args.only.split(",") if args.only else list(BENCHES)
    unknown = [name for name in names if name not in BENCHES]
    if unknown:
        p.error(f"--only {','.join(unknown)}: choose among {', '.join(BENCHES)}")
    with tempfile.TemporaryDirectory() as tmp:
        tok, gsm8k = args.tokenizer, args.gsm8k
        if tok is None or gsm8k is None:
            made_tok, made_gsm8k = offline_inputs(Path(tmp), args.smoke)
            tok, gsm8k = tok or made_tok, gsm8k or made_gsm8k
        todo = [bench for bench in benches(args, tok, gsm8k) if bench[0] in names]
        rows, failed, t0 = [], [], time.monotonic()
        for name, cmd, limit in todo:
            limit += 120 if args.profile else 0  # profiled steps, then their tables (the SFT bench: ~250 s in all)
            lines, failure = run_bench(name, cmd, limit, Path(args.jsonl), show=args.profile)
            rows += lines
            if failure:
                failed.append(f"{name} ({failure})")
    print(f"{len(todo)} bench(es) in {time.monotonic() - t0:.0f} s")
    print("\n".join(summary(rows)))
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
