"""CORE (eval/core.py, hfnanochat.evaluation.core) against an independent, one-example-at-a-time computation.

The reference below is written from the rules (nanochat's Jinja templates, its `find_common_length`, one forward per
example with the options stacked, nanochat's loss/argmax slicing), not by calling the module. The model is a depth-2
GPT with a 128-token context, trained for a few steps on the ends of half the LM prompts it is scored on, so that it
gets some LM examples right (a random model scores 0 on every LM task, which would compare nothing); MC and schema
verdicts are mixed already at random. Many 10-shot prompts are longer than its context (truncation). The data are six
real CORE tasks.
"""

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import jinja2
import pytest
import torch
import torch.nn.functional as F

from hfnanochat import HFNanoChatForCausalLM, config_for_depth
from hfnanochat.evaluation import core
from hfnanochat.tokenizer import train_tokenizer
from hfnanochat.training.export import save_final

ROOT = Path(__file__).resolve().parents[1]
CORE_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "core"
needs_data = pytest.mark.skipif(not CORE_DATA.is_dir(), reason=f"no CORE task files at {CORE_DATA}")
# label, file, type, shots, random baseline %, delimiter: core.md's table for the six shared tasks
TASKS = [
    ("jeopardy", "world_knowledge/jeopardy_small.jsonl", "language_modeling", 10, 0, "\nAnswer: "),
    ("arc_easy", "world_knowledge/arc_easy.jsonl", "multiple_choice", 10, 25, "\nAnswer: "),
    ("copa", "commonsense_reasoning/copa.jsonl", "multiple_choice", 0, 50, " "),
    ("lambada_openai", "language_understanding/lambada_openai_small.jsonl", "language_modeling", 0, 0, " "),
    ("winograd", "language_understanding/winograd_wsc.jsonl", "schema", 0, 50, " "),
    ("bigbench_operators", "symbolic_problem_solving/bigbench_operators.jsonl", "language_modeling", 10, 0, " "),
]
MAX_PER_TASK = 12  # > 10 shots; jeopardy_small has 16 rows, lambada_openai_small 8
CONTEXT = 128


def _core(module_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("eval_core_script", module_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


core_script = _core(ROOT / "eval" / "core.py")


def write_bundle(root: Path, tasks=TASKS) -> Path:
    """core.yaml + eval_data/ + eval_meta_data.csv in the real bundle's layout (the real csv has more columns)."""
    lines = ["icl_tasks:"]
    csv = ["Eval Task,Task Category,Random baseline"]
    for label, uri, kind, shots, baseline, delimiter in tasks:
        lines += [f"- label: {label}", f"  dataset_uri: {uri}", f"  num_fewshot: [{shots}]", f"  icl_task_type: {kind}"]
        lines.append(f"  continuation_delimiter: {json.dumps(delimiter)}")
        csv.append(f"{label},{uri.split('/')[0]},{baseline}")
        target = root / "eval_data" / uri
        target.parent.mkdir(parents=True, exist_ok=True)
        source = CORE_DATA / Path(uri).name
        if source.is_file():
            target.write_bytes(source.read_bytes())
    (root / "core.yaml").write_text("\n".join(lines) + "\n")
    (root / "eval_meta_data.csv").write_text("\n".join(csv) + "\n")
    return root


# ---------------------------------------------------------------------------------------------------------------
# the independent reference

TEMPLATES = {  # nanochat core_eval.py's templates
    "multiple_choice": """
{%- for example in fewshot_examples -%}
{{ example.query }}{{ continuation_delimiter }}{{ example.choices[example.gold] }}

{% endfor -%}
{{ item.query }}{{ continuation_delimiter }}{{ choice }}""",
    "schema": """
{%- for example in fewshot_examples -%}
{{ example.context_options[example.gold] }}{{ continuation_delimiter }}{{ example.continuation }}

{% endfor -%}
{{ context }}{{ continuation_delimiter }}{{ item.continuation }}""",
    "language_modeling": """
{%- for example in fewshot_examples -%}
{{ example.context | trim }}{{ continuation_delimiter }}{{ example.continuation }}

{% endfor -%}
{{ item.context | trim }}{{ continuation_delimiter }}{% if include_continuation %}{{ item.continuation }}{% endif %}""",
}


def reference_prompts(kind, item, delimiter, shots):
    template = jinja2.Template(TEMPLATES[kind].strip())
    ctx = dict(fewshot_examples=shots, continuation_delimiter=delimiter, item=item)
    if kind == "multiple_choice":
        return [template.render(choice=c, **ctx) for c in item["choices"]]
    if kind == "schema":
        return [template.render(context=c, **ctx) for c in item["context_options"]]
    return [
        template.render(include_continuation=False, **ctx).strip(),
        template.render(include_continuation=True, **ctx),
    ]


def common_length(seqs, direction):
    n = min(len(s) for s in seqs)
    indices = range(n) if direction == "left" else range(-1, -n - 1, -1)
    for i, k in enumerate(indices):
        if not all(s[k] == seqs[0][k] for s in seqs):
            return i
    return n


def reference_task(model, tok, rows, kind, shots, delimiter):
    """Per example: (correct, mean losses, truncated), one forward per example."""
    out = []
    for idx, item in enumerate(rows):
        fewshot = []
        if shots:
            rng = random.Random(1234 + idx)
            fewshot = [rows[i] for i in rng.sample([i for i in range(len(rows)) if i != idx], shots)]
        prompts = reference_prompts(kind, item, delimiter, fewshot)
        tokens = [[tok.bos_token_id] + tok.encode(p, add_special_tokens=False) for p in prompts]
        if kind == "multiple_choice":
            s = common_length(tokens, "left")
            spans = [(s, len(t)) for t in tokens]
        elif kind == "schema":
            s = common_length(tokens, "right")
            spans = [(len(t) - s, len(t)) for t in tokens]
        else:
            assert tokens[0] == tokens[1][: len(tokens[0])]
            spans, tokens = [(len(tokens[0]), len(tokens[1]))], [tokens[1]]
        cut_any = False
        for j, t in enumerate(tokens):
            if len(t) > CONTEXT:
                cut = len(t) - CONTEXT
                tokens[j], spans[j] = t[-CONTEXT:], (spans[j][0] - cut, spans[j][1] - cut)
                assert spans[j][0] >= 1
                cut_any = True
        width = max(len(t) for t in tokens)
        x = torch.tensor([t + [tok.bos_token_id] * (width - len(t)) for t in tokens])
        with torch.no_grad():
            logits = model(input_ids=x).logits.float()
        targets = torch.roll(x, -1, dims=1)
        losses = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        predictions = logits.argmax(-1)
        if kind == "language_modeling":
            s, e = spans[0]
            correct = bool(torch.all(predictions[0, s - 1 : e - 1] == x[0, s:e]))
            means = [losses[0, s - 1 : e - 1].mean().item()]
        else:
            means = [losses[i, s - 1 : e - 1].mean().item() for i, (s, e) in enumerate(spans)]
            correct = means.index(min(means)) == item["gold"]
        out.append((correct, means, cut_any))
    return out


def shuffled(rows, n):
    rows = list(rows)
    random.Random(1337).shuffle(rows)
    return rows[:n] if n > 0 else rows


# ---------------------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    if not CORE_DATA.is_dir():
        pytest.skip(f"no CORE task files at {CORE_DATA}")
    return write_bundle(tmp_path_factory.mktemp("bundle"))


def _rows(file):
    return [json.loads(line) for line in (CORE_DATA / Path(file).name).read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def model_dir(bundle, tmp_path_factory):
    """A 512-token BPE and a depth-2 model, trained for 20 steps on the ends of half the LM prompts."""
    texts = []
    for _, uri, *_ in TASKS:
        for row in _rows(uri):
            texts += [v for v in row.values() if isinstance(v, str)] + row.get(
                "choices", row.get("context_options", [])
            )
    tok = train_tokenizer(texts, vocab_size=512)
    config = config_for_depth(
        2,
        vocab_size=len(tok),
        max_seq_len=CONTEXT,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = HFNanoChatForCausalLM.from_config_on_device(config)
    train = []
    for _, uri, kind, shots, _, delimiter in TASKS:
        rows = shuffled(_rows(uri), MAX_PER_TASK)
        for idx, item in enumerate(rows):
            # the ends of half of the LM prompts (continuation included): seen answers, unseen ones
            if kind != "language_modeling" or idx % 2:
                continue
            fewshot = [
                rows[i] for i in random.Random(1234 + idx).sample([i for i in range(len(rows)) if i != idx], shots)
            ]
            text = reference_prompts(kind, item, delimiter, fewshot)[-1]
            train.append(([tok.bos_token_id] + tok.encode(text, add_special_tokens=False))[-48:])
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    for step in range(20):
        batch = [train[(step * 8 + i) % len(train)] for i in range(8)]  # 16 prompts
        width = max(len(t) for t in batch)
        x = torch.tensor([t + [tok.bos_token_id] * (width - len(t)) for t in batch])
        labels = torch.tensor([t + [-100] * (width - len(t)) for t in batch])
        model(input_ids=x, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return save_final(model, tok, tmp_path_factory.mktemp("model") / "final")


@pytest.fixture(scope="module")
def loaded(model_dir):
    from transformers import AutoTokenizer

    return HFNanoChatForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(
        model_dir
    )


@pytest.fixture(scope="module")
def reference(loaded):
    model, tok = loaded
    return {
        label: reference_task(model, tok, shuffled(_rows(uri), MAX_PER_TASK), kind, shots, delimiter)
        for label, uri, kind, shots, _, delimiter in TASKS
    }


@pytest.fixture(scope="module")
def cli_results(model_dir, bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "core.json"
    argv = ["--model", str(model_dir), "--bundle", str(bundle), "--max-per-task", str(MAX_PER_TASK)]
    core_script.main([*argv, "--batch-size", "7", "--out", str(out)])  # 7: batches mix examples and tasks' options
    return json.loads(out.read_text())


# ---------------------------------------------------------------------------------------------------------------
# CORE equals the independent computation


@needs_data
def test_accuracies_equal_the_reference(cli_results, reference):
    assert set(cli_results["tasks"]) == {t[0] for t in TASKS} and cli_results["skipped"] == {}
    for label, _, _, _, baseline, _ in TASKS:
        expected = sum(c for c, _, _ in reference[label]) / len(reference[label])
        got = cli_results["tasks"][label]
        assert got["accuracy"] == expected, label
        assert got["examples"] == len(reference[label])
        assert got["centered"] == pytest.approx((expected - 0.01 * baseline) / (1 - 0.01 * baseline))
    # the training made the comparison mean something: right and wrong answers in every task type
    by_kind = {}
    for label, _, kind, *_ in TASKS:
        by_kind.setdefault(kind, []).extend(c for c, _, _ in reference[label])
    for kind, verdicts in by_kind.items():
        assert 0 < sum(verdicts) < len(verdicts), kind
    centered = [cli_results["tasks"][t[0]]["centered"] for t in TASKS]
    assert cli_results["core"] == pytest.approx(sum(centered) / len(centered))


@needs_data
def test_per_example_verdicts_and_losses_equal_the_reference(loaded, bundle, reference):
    """Beyond the accuracy: the same verdict and the same mean span loss for every example and option."""
    model, tok = loaded
    tasks, skipped = core.load_bundle(bundle)
    assert not skipped and [t.label for t in tasks] == [t[0] for t in TASKS]
    for task in tasks[1:3] + tasks[4:]:  # one task per type is enough here: ARC, COPA, winograd, operators
        result = core.evaluate_task(
            model, tok, task, core.select_rows(core.load_rows(task), MAX_PER_TASK), batch_size=5, progress=False
        )
        ref = reference[task.label]
        assert result.correct == [c for c, _, _ in ref], task.label
        for got, (_, want, _) in zip(result.losses, ref):
            assert got == pytest.approx(want, abs=1e-4), task.label


@needs_data
def test_truncation_is_counted(cli_results, reference):
    for label, *_ in TASKS:
        assert cli_results["tasks"][label]["truncated"] == sum(cut for _, _, cut in reference[label]), label
    assert cli_results["tasks"]["arc_easy"]["truncated"] > 0  # 10-shot ARC is longer than 128 tokens
    assert cli_results["tasks"]["copa"]["truncated"] == 0


# ---------------------------------------------------------------------------------------------------------------
# the rules on hand numbers


def test_centering_and_mean_on_hand_numbers():
    assert core.centered(0.5, 25) == pytest.approx(1 / 3)  # (0.5 - 0.25) / 0.75
    assert core.centered(0.3, 0) == pytest.approx(0.3)
    assert core.centered(0.62, 62) == pytest.approx(0.0)
    assert core.centered(0.25, 50) == pytest.approx(-0.5)  # below chance is negative
    assert core.centered(0.2, 9.1) == pytest.approx((0.2 - 0.091) / 0.909)
    assert core.core_score([1 / 3, 0.3, 0.0, -0.5]) == pytest.approx((1 / 3 + 0.3 - 0.5) / 4)


def test_max_per_task_selection_is_nanochats_shuffle():
    rows = [{"i": i} for i in range(200)]
    expected = list(rows)
    random.Random(1337).shuffle(expected)
    assert core.select_rows(rows, 25) == expected[:25]
    assert core.select_rows(rows, -1) == expected  # uncapped runs are shuffled too: the few-shot draw sees this order
    assert core.select_rows(rows, 500) == expected
    assert [r["i"] for r in core.select_rows(rows, 5)] == [r["i"] for r in expected[:5]]


def test_prompt_rendering_matches_core_md_examples():
    mc = core.render_prompts("multiple_choice", {"query": "Q3", "choices": ["a", "b"], "gold": 0}, " ", [
        {"query": "Q1", "choices": ["x", "y"], "gold": 1}, {"query": "Q2", "choices": ["z"], "gold": 0}
    ])  # fmt: skip
    assert mc == ["Q1 y\n\nQ2 z\n\nQ3 a", "Q1 y\n\nQ2 z\n\nQ3 b"]
    lm = core.render_prompts("language_modeling", {"context": " C3 ", "continuation": "k"}, " ", [
        {"context": "C1\n", "continuation": "c1"}
    ])  # fmt: skip
    assert lm == ["C1 c1\n\nC3", "C1 c1\n\nC3 k"]


# ---------------------------------------------------------------------------------------------------------------
# bad input


@needs_data
def test_bad_bundle_skips_what_cannot_run(model_dir, tmp_path, capsys):
    tasks = [
        ("copa", "commonsense_reasoning/copa.jsonl", "multiple_choice", 0, 50, " "),
        ("gone", "x/missing_task.jsonl", "multiple_choice", 0, 25, " "),
        ("broken", "x/broken.jsonl", "schema", 0, 50, " "),
        ("bad_gold", "x/bad_gold.jsonl", "multiple_choice", 0, 25, " "),
        ("odd_type", "commonsense_reasoning/copa.jsonl", "generation_task", 0, 50, " "),
        ("few_rows", "x/few.jsonl", "language_modeling", 10, 0, " "),
    ]
    bundle = write_bundle(tmp_path / "bundle", tasks)
    good = '{"context_options": ["a b", "c d"], "continuation": "e", "gold": 0}\n'
    (bundle / "eval_data/x/broken.jsonl").write_text(good + good + '{"context_options": ["a", \n')
    (bundle / "eval_data/x/bad_gold.jsonl").write_text('{"query": "q", "choices": ["a", "b"], "gold": 2}\n')
    (bundle / "eval_data/x/few.jsonl").write_text('{"context": "a", "continuation": "b"}\n' * 5)
    out = tmp_path / "core.json"
    argv = ["--model", str(model_dir), "--bundle", str(bundle), "--max-per-task", "6", "--out", str(out)]
    core_script.main([*argv, "--tasks", "copa,gone,broken,bad_gold,odd_type,few_rows,hellaswag"])
    result = json.loads(out.read_text())
    assert list(result["tasks"]) == ["copa"]
    skipped = result["skipped"]
    assert "missing_task.jsonl is missing" in skipped["gone"]
    assert "broken.jsonl:3: not valid JSON" in skipped["broken"]
    assert "bad_gold.jsonl:1: gold 2 is not an index into 2 options" in skipped["bad_gold"]
    assert "unknown icl_task_type 'generation_task'" in skipped["odd_type"]
    assert "10-shot needs at least 11 rows, 5 selected" in skipped["few_rows"]
    assert skipped["hellaswag"].startswith("unknown task; the bundle has: ")
    assert result["core"] == result["tasks"]["copa"]["centered"]
    printed = capsys.readouterr().out
    assert "skipped broken:" in printed and "skipped hellaswag:" in printed


def test_model_folder_without_tokenizer(model_dir, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in Path(model_dir).iterdir():
        if f.name.startswith(("config", "model")):
            (bare / f.name).write_bytes(f.read_bytes())
    with pytest.raises(SystemExit) as e:
        core_script.main(["--model", str(bare), "--bundle", str(tmp_path)])
    assert e.value.code == 2
    assert f"error: --model {bare} holds no tokenizer" in capsys.readouterr().err


def test_folder_that_is_not_a_bundle(model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        core_script.main(["--model", str(model_dir), "--bundle", str(tmp_path)])
    assert e.value.code == 2
    assert f"error: {tmp_path} is not a CORE eval bundle: no core.yaml" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# two processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_data
@pytest.mark.slow  # two fresh interpreters over gloo: ~20 s on 2 loaded cores
def test_two_processes_give_the_same_results(model_dir, bundle, cli_results, tmp_path):
    out = tmp_path / "two.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(ROOT / "eval" / "core.py"), "--model", str(model_dir),
           "--bundle", str(bundle), "--max-per-task", str(MAX_PER_TASK), "--tasks", "arc_easy,winograd,jeopardy",
           "--out", str(out)]  # fmt: skip
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    two = json.loads(out.read_text())
    for label in ("arc_easy", "winograd", "jeopardy"):
        assert two["tasks"][label] == cli_results["tasks"][label], label


def test_bundle_download_unpacks_once(tmp_path):
    """The real download path, fed a local zip laid out like eval_bundle.zip (one top folder)."""
    import zipfile

    archive = tmp_path / "eval_bundle.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("eval_bundle/core.yaml", "icl_tasks: []\n")
        z.writestr("eval_bundle/eval_meta_data.csv", "Eval Task,Random baseline\n")
    target = tmp_path / "cache" / "eval_bundle"
    assert core.download_bundle(target, url=archive.as_uri()) == target
    assert (target / "core.yaml").is_file() and core.load_bundle(target) == ([], {})
    archive.unlink()  # a second call finds the folder and downloads nothing
    assert core.download_bundle(target, url=archive.as_uri()) == target
    assert sorted(p.name for p in target.parent.iterdir()) == ["eval_bundle", "eval_bundle.lock"]
