"""hfnanochat.report: a tiny pipeline writes its sections and report.md renders all of them.

The tokenizer, pretraining (train/pretrain.py with --report-dir) and its CORE pass (on two real tasks when the shared
task files are there) are real runs on a tiny model. MID/SFT/RL and their chat evaluations come from other scripts;
their sections are written here with report_section directly, which is all those scripts do.
"""

import json
import re
import time

import pytest
from test_core import CORE_DATA, write_bundle
from test_pretrain import TINY, make_corpus, pretrain

from hfnanochat import report
from hfnanochat.tokenizer import save_tokenizer, train_tokenizer

CHAT = {  # the seed's report card (nanochat README), as the chat stages would log it
    "mid": {"ARC-Easy": 0.3561, "ARC-Challenge": 0.2875, "MMLU": 0.3111, "GSM8K": 0.0250, "HumanEval": 0.0671},
    "sft": {"ARC-Easy": 0.3876, "ARC-Challenge": 0.2807, "MMLU": 0.3151, "GSM8K": 0.0455, "HumanEval": 0.0854},
}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    reports = root / "report"
    corpus = root / "corpus.txt"
    corpus.write_text(make_corpus(100_000), encoding="utf-8")
    t0 = time.time()
    tok = train_tokenizer(corpus.read_text(encoding="utf-8").split("\n\n"), vocab_size=512)
    save_tokenizer(tok, root / "tok")
    report.report_section(
        reports, "tokenizer", config={"vocab_size": 512}, metrics={"vocab_size": len(tok)}, wall_time_s=time.time() - t0
    )
    flags = [x for x in TINY if x != "--no-core"]
    if CORE_DATA.is_dir():
        bundle = write_bundle(root / "bundle", tasks=[
            ("copa", "commonsense_reasoning/copa.jsonl", "multiple_choice", 0, 50, " "),
            ("winograd", "language_understanding/winograd_wsc.jsonl", "schema", 0, 50, " "),
        ])  # fmt: skip
        flags += ["--core-bundle", str(bundle), "--core-max-per-task", "8"]
    else:
        flags += ["--no-core"]
    pretrain.main(["--data", str(corpus), "--tokenizer", str(root / "tok"), "--out", str(root / "pretrain"), *flags,
                   "--num-iterations", "6", "--eval-every", "3", "--save-every", "0"])  # fmt: skip
    for stage, column in (("mid", "MID"), ("sft", "SFT")):
        memory = {"mid": 21.37, "sft": 9.0}[stage]  # as a GPU run's stage passes it
        report.report_section(
            reports, stage, config={"source": "base"}, wall_time_s=30.0, tokens=1000, peak_memory_gib=memory
        )
        metrics = CHAT[stage] | {"ChatCORE": 0.08}
        report.report_section(reports, f"chat-eval-{stage}", metrics=metrics, column=column, wall_time_s=12.0)
    report.report_section(reports, "rl", config={"samples": 16}, wall_time_s=60.0)
    report.report_section(reports, "chat-eval-rl", metrics={"GSM8K": 0.0758}, column="RL", wall_time_s=5.0)
    report.report_section(reports, "notes", metrics={"comment": "an unknown section goes last"})
    report.write_report(reports)  # what each stage does after its section
    return root, reports


def test_report_has_every_section_in_pipeline_order(pipeline):
    root, reports = pipeline
    text = (reports / "report.md").read_text()
    names = re.findall(r"^## (.+)$", text, flags=re.M)
    expected = ["System", "tokenizer", "pretrain", "core", "mid", "chat-eval-mid", "sft", "chat-eval-sft", "rl"]
    expected += ["chat-eval-rl", "notes", "Summary"]
    if not CORE_DATA.is_dir():
        expected.remove("core")
    assert names == expected
    for field in ("python", "torch", "transformers", "cpu_count", "gpus"):
        assert f"- {field}: " in text, field
    pre = json.loads((reports / "pretrain.json").read_text())
    assert pre["tokens"] == 6 * 512 and pre["config"]["depth"] == 2 and pre["config"]["steps"] == 6
    # the final evaluation (after step 6) is newer than any metrics.jsonl line, and lower than the one at step 3
    logged = [json.loads(line)["val_bpb"] for line in (root / "pretrain/metrics.jsonl").read_text().splitlines()]
    final = pre["metrics"]["val_bpb"]
    assert final < logged[-1] < logged[0]
    assert f"- val_bpb: {final:.4f}" in text and "- tokens: 3,072" in text


def test_summary_table_rows_columns_and_empty_cells(pipeline):
    _, reports = pipeline
    text = (reports / "report.md").read_text()
    rows = {}
    summary = text[text.index("## Summary") :].split("\n\n")[1]  # the table, up to the blank line after it
    for line in summary.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and cells[0] != "Metric":
            rows[cells[0]] = cells[1:]
    assert list(rows) == report.SUMMARY_ROWS
    assert "| Metric | BASE | MID | SFT | RL |" in text
    if CORE_DATA.is_dir():
        core = json.loads((reports / "core.json").read_text())["metrics"]["CORE"]
        assert rows["CORE"] == [f"{core:.4f}", "-", "-", "-"]
    else:
        assert rows["CORE"] == ["-"] * 4
    assert rows["ARC-Easy"] == ["-", "0.3561", "0.3876", "-"]
    assert rows["GSM8K"] == ["-", "0.0250", "0.0455", "0.0758"]
    assert rows["ChatCORE"] == ["-", "0.0800", "0.0800", "-"]


def test_curve_png_is_linked_and_exists(pipeline):
    pytest.importorskip("matplotlib")
    _, reports = pipeline
    text = (reports / "report.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert links == ["pretrain_loss.png"]
    png = reports / links[0]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_total_time_and_cost(pipeline, tmp_path):
    _, reports = pipeline
    text = (reports / "report.md").read_text()
    sections = [json.loads(p.read_text()) for p in reports.glob("*.json")]
    total = sum(s["wall_time_s"] or 0 for s in sections)
    assert f"Total wall time: {report._duration(total)}" in text
    assert "Estimated cost: 0.00 GPU-hours x $3.00/GPU-hour = $0.00" in text  # every stage ran on the CPU
    # the same stage on an 8-GPU node for an hour: nanochat's $24
    node = json.loads((reports / "rl.json").read_text())
    node["system"]["gpus_used"], node["wall_time_s"] = 8, 3600.0
    (tmp_path / "rl.json").write_text(json.dumps(node))
    report.main([str(tmp_path)])
    assert "Estimated cost: 8.00 GPU-hours x $3.00/GPU-hour = $24.00" in (tmp_path / "report.md").read_text()
    report.main([str(tmp_path), "--gpu-hour-usd", "2"])
    assert "8.00 GPU-hours x $2.00/GPU-hour = $16.00" in (tmp_path / "report.md").read_text()


def test_speedrun_stage_times_give_the_total_and_the_cost(pipeline, tmp_path):
    """speedrun.sh's per-stage timings (whole processes) replace the sections' own timers; a re-run stage counts once,
    a line cut short by a killed run is ignored."""
    _, reports = pipeline
    for path in reports.glob("*.json"):
        (tmp_path / path.name).write_text(path.read_text())
    (tmp_path / report.STAGE_TIMES).write_text(
        '{"stage": "tokenizer", "seconds": 20, "gpus": 8}\n'
        '{"stage": "pretrain", "seconds": 9000, "gpus": 8}\n'
        '{"stage": "pretrain", "seconds": 3580, "gpus": 8}\n'
        '{"stage": "chat_eval_sft", "seco'
    )
    report.main([str(tmp_path)])
    text = (tmp_path / "report.md").read_text()
    assert "| tokenizer | 0m20s | 8 |" in text and "| pretrain | 59m40s | 8 |" in text
    assert "chat_eval_sft |" not in text
    assert "Total wall time: 1h00m00s" in text
    assert "Estimated cost: 8.00 GPU-hours x $3.00/GPU-hour = $24.00" in text


def test_peak_gpu_memory_per_stage(pipeline):
    """A stage that ran on a GPU says its peak memory, in its section and in the table of stages; a CPU stage (the
    real pretraining run here) has none, and no line for it."""
    _, reports = pipeline
    text = (reports / "report.md").read_text()
    assert json.loads((reports / "pretrain.json").read_text())["peak_memory_gib"] is None
    mid = text[text.index("\n## mid\n") : text.index("\n## chat-eval-mid")]
    assert "- peak GPU memory: 21.4 GiB" in mid
    assert "| Stage | Peak GPU memory |\n|---|---|\n| mid | 21.4 GiB |\n| sft | 9.0 GiB |\n" in text
    assert text.count("peak GPU memory:") == 2


def test_regenerating_gives_the_same_report_and_leaves_no_temporary_files(pipeline):
    _, reports = pipeline
    before = (reports / "report.md").read_text()
    report.main([str(reports)])
    after = (reports / "report.md").read_text()
    strip = lambda t: re.sub(r"Generated \S+", "", t)  # noqa: E731
    assert strip(before) == strip(after)
    assert not list(reports.glob(".tmp_*"))


def test_bad_section_arguments(tmp_path, capsys):
    with pytest.raises(ValueError, match="column 'BOGUS': one of BASE, MID, SFT, RL"):
        report.report_section(tmp_path, "x", column="BOGUS")
    with pytest.raises(ValueError, match="section name 'report'"):
        report.report_section(tmp_path, "report")
    with pytest.raises(SystemExit) as e:
        report.main([str(tmp_path / "missing")])
    assert e.value.code == 2 and "is not a folder" in capsys.readouterr().err


def test_plot_curves_without_data_returns_none(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss"')  # the last line cut short by a crash
    assert report.plot_curves(metrics, tmp_path / "none.png", ["reward"]) is None
    if report.plot_curves(metrics, tmp_path / "loss.png", ["loss"]) is not None:
        assert (tmp_path / "loss.png").is_file()
