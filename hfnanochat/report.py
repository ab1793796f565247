"""report.md: the run's report card, as nanochat's `report.py` wrote it, from sections each stage leaves behind.

    python -m hfnanochat.report out/report                    # (re)write out/report/report.md
    python -m hfnanochat.report out/report --gpu-hour-usd 2.5

Notable:
- Each stage calls `report_section(report_dir, name, ...)` once, on the main process: it writes `<name>.json`
  atomically (config, metrics, wall time, tokens, peak GPU memory, curve PNGs, and the machine it ran on). Stages
  never edit a shared file, so they can run from different scripts, processes or machines.
- `write_report` renders them: a header (GPUs, CPU, library versions, git commit), the sections in pipeline order
  (tokenizer, pretrain, core, mid, sft, rl, each stage's evaluations after it; unknown names after, oldest first),
  then nanochat's summary table (CORE ... ChatCORE x BASE/MID/SFT/RL, '-' where nothing was measured), each
  stage's peak GPU memory (what the smallest GPU for the run must hold), the total wall time and the estimated cost.
- Time and cost: where speedrun.sh left `stage_times.jsonl` (each stage's process timed from start to end, the
  GPUs of the node it held), the total is its stages' sum, listed stage by stage; otherwise the sum of the sections'
  own timers (which leave out process start-up, model loading and data preparation). Cost = GPU-hours x a rate: $3
  per H100-hour by default (nanochat's "$24/h for an 8xH100 node"), `HFNANOCHAT_GPU_HOUR_USD` or `--gpu-hour-usd`.
- `plot_curves` draws metrics.jsonl columns against the step into a PNG when matplotlib is installed
  (`pip install hfnanochat[report]`); without it the report simply has no pictures.
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

SUMMARY_ROWS = ["CORE", "ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "ChatCORE"]
SUMMARY_COLUMNS = ["BASE", "MID", "SFT", "RL"]
# pipeline order; a section named "<anything>-<stage>" (chat-eval-sft, lm-eval-mid) follows that stage
PIPELINE = ["tokenizer", "pretrain", "base", "core", "mid", "sft", "rl"]
STAGE_OF_SUFFIX = {"base": "core", "mid": "mid", "sft": "sft", "rl": "rl"}
DEFAULT_GPU_HOUR_USD = 3.0  # nanochat: an 8xH100 node at $24/h
STAGE_TIMES = "stage_times.jsonl"  # speedrun.sh appends {"stage", "seconds", "gpus"} after each stage it ran
LIBRARIES = ["torch", "transformers", "accelerate", "trl", "datasets", "tokenizers", "lm-eval", "hfnanochat"]


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp_{path.name}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def system_info() -> dict:
    """The machine this process runs on: GPUs, CPU, Python and library versions, git commit of the code."""
    import torch

    info = {
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["gpus"] = f"{len(names)} x {names[0]}" if len(set(names)) == 1 else ", ".join(names)
        info["cuda"] = torch.version.cuda
    # the GPUs this stage used: one per process under a launcher, else the one it ran on
    info["gpus_used"] = int(os.environ.get("WORLD_SIZE", 1)) if torch.cuda.is_available() else 0
    for name in LIBRARIES:
        try:
            info[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    try:
        root = Path(__file__).resolve().parent.parent
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if commit.returncode == 0:
            info["git_commit"] = commit.stdout.strip() + (" (dirty)" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def report_section(
    report_dir,
    name: str,
    *,
    config: dict | None = None,
    metrics: dict | None = None,
    column: str | None = None,
    wall_time_s: float | None = None,
    tokens: int | None = None,
    curves: dict[str, str] | None = None,
    peak_memory_gib: float | None = None,
) -> Path:
    """Write `report_dir/<name>.json` (atomically; a second call replaces it). `column` (one of SUMMARY_COLUMNS) puts
    the `metrics` named in SUMMARY_ROWS into that column of the summary table. `curves`: {title: PNG path}, kept
    relative to `report_dir` so that the report folder can move. `peak_memory_gib`: the stage's peak GPU memory (its
    main process's, `training.metrics.peak_memory_gib`)."""
    if column is not None and column not in SUMMARY_COLUMNS:
        raise ValueError(f"column {column!r}: one of {', '.join(SUMMARY_COLUMNS)}")
    if not name or "/" in name or name.startswith(".") or name == "report":
        raise ValueError(f"section name {name!r}: a plain file name other than 'report'")
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    rel_curves = {}
    for title, png in (curves or {}).items():
        png = Path(png)
        try:
            rel_curves[title] = str(png.resolve().relative_to(report_dir.resolve()))
        except ValueError:
            rel_curves[title] = str(png.resolve())
    section = dict(
        name=name,
        time=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        column=column,
        wall_time_s=wall_time_s,
        tokens=tokens,
        peak_memory_gib=peak_memory_gib,
        config=config or {},
        metrics=metrics or {},
        curves=rel_curves,
        system=system_info(),
    )
    path = report_dir / f"{name}.json"
    _atomic_write(path, json.dumps(section, indent=2, default=str) + "\n")
    return path


def plot_curves(metrics_jsonl, out_png, keys: list[str]) -> Path | None:
    """One panel per key of `metrics_jsonl` (JSON lines with a "step") against the step, saved to `out_png`. None
    when matplotlib is not installed or no line holds any of the keys."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    records = []
    for line in Path(metrics_jsonl).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a crash
            continue
    series = {}
    for key in keys:
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and "step" in r]
        if points:
            series[key] = points
    if not series:
        return None
    fig, axes = plt.subplots(1, len(series), figsize=(5 * len(series), 3.5), squeeze=False)
    for ax, (key, points) in zip(axes[0], series.items()):
        ax.plot(*zip(*points))
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def load_sections(report_dir) -> list[dict]:
    """The sections of `report_dir` in pipeline order (see the module docstring)."""
    sections = []
    for path in Path(report_dir).glob("*.json"):
        try:
            section = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            continue
        if isinstance(section, dict) and "name" in section:
            sections.append(section)

    def order(section):
        name = section["name"]
        if name in PIPELINE:
            return (PIPELINE.index(name), 0, section["time"])
        stage = STAGE_OF_SUFFIX.get(name.rsplit("-", 1)[-1])
        if stage is not None:
            return (PIPELINE.index(stage), 1, section["time"])
        return (len(PIPELINE), 0, section["time"])

    return sorted(sections, key=order)


def load_stage_times(report_dir) -> dict[str, dict]:
    """speedrun.sh's stage timings, the last run of each stage (a --force re-run replaces the earlier one)."""
    path = Path(report_dir) / STAGE_TIMES
    if not path.is_file():
        return {}
    times = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
            times[entry["stage"]] = {"seconds": float(entry["seconds"]), "gpus": int(entry["gpus"])}
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue  # a line cut short by a killed run
    return times


def _fmt(value) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.4f}" if value == 0 or 1e-3 <= abs(value) < 1e9 else f"{value:.3e}"
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    return str(value)


def _duration(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def write_report(report_dir, *, gpu_hour_usd: float | None = None) -> Path:
    """Render every section of `report_dir` into `report_dir/report.md` (atomically) and return its path."""
    report_dir = Path(report_dir)
    if gpu_hour_usd is None:
        gpu_hour_usd = float(os.environ.get("HFNANOCHAT_GPU_HOUR_USD", DEFAULT_GPU_HOUR_USD))
    sections = load_sections(report_dir)
    system = min(sections, key=lambda s: s["time"])["system"] if sections else system_info()
    lines = ["# hfnanochat report", ""]
    lines.append(f"Generated {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}")
    lines += ["", "## System", ""]
    lines += [f"- {key}: {value}" for key, value in system.items() if key != "gpus_used"]
    if "gpus" not in system:
        lines.append("- gpus: none (CPU)")

    table = {row: dict.fromkeys(SUMMARY_COLUMNS) for row in SUMMARY_ROWS}
    for section in sections:
        lines += ["", f"## {section['name']}", "", f"written {section['time']}"]
        if section.get("wall_time_s") is not None:
            lines.append(f"- wall time: {_duration(section['wall_time_s'])}")
        if section.get("tokens") is not None:
            lines.append(f"- tokens: {section['tokens']:,}")
        if section.get("peak_memory_gib") is not None:
            lines.append(f"- peak GPU memory: {section['peak_memory_gib']:.1f} GiB")
        if section.get("config"):
            lines += ["", "Config:", ""] + [f"- {k}: {_fmt(v)}" for k, v in section["config"].items()]
        if section.get("metrics"):
            lines += ["", "Metrics:", ""] + [f"- {k}: {_fmt(v)}" for k, v in section["metrics"].items()]
        for title, png in section.get("curves", {}).items():
            lines += ["", f"![{title}]({png})"]
        if section.get("column"):
            for key, value in section.get("metrics", {}).items():
                if key in table:
                    table[key][section["column"]] = value  # sections come oldest first within a stage: last wins

    lines += ["", "## Summary", ""]
    lines.append("| Metric | " + " | ".join(SUMMARY_COLUMNS) + " |")
    lines.append("|---" * (len(SUMMARY_COLUMNS) + 1) + "|")
    for row in SUMMARY_ROWS:
        cells = ["-" if table[row][c] is None else _fmt(table[row][c]) for c in SUMMARY_COLUMNS]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    memory = [(s["name"], s["peak_memory_gib"]) for s in sections if s.get("peak_memory_gib") is not None]
    if memory:  # what the smallest GPU for this run must hold
        lines += ["", "| Stage | Peak GPU memory |", "|---|---|"]
        lines += [f"| {name} | {gib:.1f} GiB |" for name, gib in memory]
    stage_times = load_stage_times(report_dir)
    if stage_times:
        total_s = sum(t["seconds"] for t in stage_times.values())
        gpu_hours = sum(t["seconds"] * t["gpus"] for t in stage_times.values()) / 3600
        lines += ["", "| Stage | Wall time | GPUs |", "|---|---|---|"]
        lines += [f"| {name} | {_duration(t['seconds'])} | {t['gpus']} |" for name, t in stage_times.items()]
    else:  # the sections' own timers
        timed = [s for s in sections if s.get("wall_time_s") is not None]
        total_s = sum(s["wall_time_s"] for s in timed)
        gpu_hours = sum(s["wall_time_s"] * s.get("system", {}).get("gpus_used", 0) for s in timed) / 3600
    lines += [
        "",
        f"Total wall time: {_duration(total_s)}",
        f"Estimated cost: {gpu_hours:.2f} GPU-hours x ${gpu_hour_usd:.2f}/GPU-hour = ${gpu_hours * gpu_hour_usd:.2f}",
        "",
    ]
    path = report_dir / "report.md"
    report_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, "\n".join(lines))
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description="(Re)write DIR/report.md from the sections the stages wrote into DIR.")
    p.add_argument("report_dir")
    p.add_argument("--gpu-hour-usd", type=float, default=None, help=f"default ${DEFAULT_GPU_HOUR_USD} (an H100)")
    args = p.parse_args(argv)
    if not Path(args.report_dir).is_dir():
        print(f"error: {args.report_dir} is not a folder", file=sys.stderr)
        sys.exit(2)
    print(write_report(args.report_dir, gpu_hour_usd=args.gpu_hour_usd))


if __name__ == "__main__":
    main()
