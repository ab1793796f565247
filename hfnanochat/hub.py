"""Share a stage's final folder on the Hugging Face Hub: the upload folder, its model card, and the Space.

Layout of a run (what the training scripts write): `RUN/<stage>/final/` for each stage (pretrain, mid, sft, rl),
`RUN/<stage>/metrics.jsonl` beside it, and the run's report as `RUN/report/` (report.md, curve PNGs, one JSON file
per report section with `metrics` and `column`) or a single `RUN/report.md`.

`build_upload_folder` writes exactly what gets uploaded:
- the final folder as `save_final` wrote it (weights, config with `auto_map` and the modeling code, tokenizer and
  chat template, generation_config.json, manifest.json), checked against its manifest first;
- `native/` with `native=True`: the same weights as transformers' own `NanoChatForCausalLM`, which loads without
  remote code (seed architecture only);
- `report.md` and the curve PNGs, when the run has them;
- `README.md`: the model card, generated from the config, the stages' metrics logs and the report's sections.

Everything in the folder is a function of its inputs (no dates, no paths of this machine), so pushing the same run
twice uploads identical files, and the Hub client drops unchanged files and makes no commit at all (`upload_folder`
asks the preupload endpoint for each file's remote hash and skips the commit when nothing differs).
"""

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData

from .training.export import verify_folder

# the pipeline's stages in order, and the column each one has in nanochat's report card
STAGES = ("pretrain", "base", "mid", "sft", "rl")
REPORT_COLUMNS = {"pretrain": "BASE", "base": "BASE", "mid": "MID", "sft": "SFT", "rl": "RL"}

# report metric name -> (task type, dataset id, dataset name, config, split, metric type); names are nanochat's
KNOWN_METRICS = {
    "CORE": ("text-generation", "mlfoundations/dclm-core", "CORE (DCLM)", None, None, "core_metric"),
    "ARC-Easy": ("multiple-choice", "allenai/ai2_arc", "ARC-Easy", "ARC-Easy", "test", "accuracy"),
    "ARC-Challenge": ("multiple-choice", "allenai/ai2_arc", "ARC-Challenge", "ARC-Challenge", "test", "accuracy"),
    "MMLU": ("multiple-choice", "cais/mmlu", "MMLU", "all", "test", "accuracy"),
    "GSM8K": ("text-generation", "openai/gsm8k", "GSM8K", "main", "test", "accuracy"),
    "HumanEval": ("text-generation", "openai/openai_humaneval", "HumanEval", None, "test", "pass@1"),
    "SpellingBee": ("text-generation", "spellingbee", "SpellingBee", None, "test", "accuracy"),
    "ChatCORE": ("text-generation", "chatcore", "ChatCORE", None, None, "chatcore_metric"),
}
CURVE_SUFFIXES = (".png", ".svg")


def run_layout(folder: str | os.PathLike) -> tuple[str, Path]:
    """(stage name, run folder) of a final folder `RUN/<stage>/final`; a folder not named `final` is its own stage."""
    folder = Path(folder).resolve()
    stage_dir = folder.parent if folder.name == "final" else folder
    return stage_dir.name, stage_dir.parent


def stage_tokens(stage_dir: str | os.PathLike) -> int | None:
    """Tokens a stage trained on, from its `metrics.jsonl`: TRL's running `num_tokens` (SFT), or the sum over steps
    of tok/s x step time (pretraining logs every step's batch that way). None without a log."""
    path = Path(stage_dir) / "metrics.jsonl"
    if not path.is_file():
        return None
    counted, summed = None, 0.0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a last line cut short by a crash
            continue
        if record.get("num_tokens") is not None:
            counted = max(counted or 0, int(record["num_tokens"]))
        elif record.get("tok_per_sec") is not None and record.get("dt") is not None:
            summed += record["tok_per_sec"] * record["dt"]
    return counted if counted is not None else (round(summed) or None)


def read_report_sections(report_dir: str | os.PathLike | None) -> dict[str, dict]:
    """{section name: {"metrics": {name: number}, "column": str | None}} from the report folder's JSON files; the
    folder or any file may be missing or malformed (the report is optional), those are skipped."""
    sections = {}
    if report_dir is None or not Path(report_dir).is_dir():
        return sections
    for path in sorted(Path(report_dir).glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        metrics = data.get("metrics") if isinstance(data, dict) else None
        if not isinstance(metrics, dict):
            continue
        numbers = {
            str(k): float(v)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        }
        sections[path.stem] = {"metrics": numbers, "column": data.get("column")}
    return sections


def stage_metrics(sections: dict[str, dict], stage: str) -> dict[str, float]:
    """The metrics of the report's column for `stage` (sections without a column count for every stage)."""
    column = REPORT_COLUMNS.get(stage, stage.upper())
    metrics = {}
    for section in sections.values():
        if section["column"] is None or str(section["column"]).upper() == column:
            metrics.update(section["metrics"])
    return metrics


def eval_results(metrics: dict[str, float]) -> list[EvalResult]:
    results = []
    for name, value in metrics.items():
        task, dataset, dataset_name, config, split, metric = KNOWN_METRICS.get(
            name, ("text-generation", name, name, None, None, name)
        )
        results.append(
            EvalResult(
                task_type=task,
                dataset_type=dataset,
                dataset_name=dataset_name,
                dataset_config=config,
                dataset_split=split,
                metric_type=metric,
                metric_name=name,
                metric_value=value,
            )
        )
    return results


def count_parameters(folder: str | os.PathLike) -> int:
    """Parameters of the model the folder's config describes, built on the meta device (no memory, no weights)."""
    import torch

    from . import HFNanoChatConfig, HFNanoChatForCausalLM

    config = HFNanoChatConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = HFNanoChatForCausalLM(config)
    return sum(p.numel() for p in model.parameters())


def _human(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def model_card(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    report_dir: str | os.PathLike | None = None,
    native: bool = False,
) -> ModelCard:
    """The model card of a final folder: YAML metadata with `model-index` results from the report, then the
    architecture, size, training stages, metrics, usage and limitations."""
    from . import HFNanoChatConfig

    folder = Path(folder)
    stage, run_dir = run_layout(folder)
    config = HFNanoChatConfig.from_pretrained(folder)
    params = count_parameters(folder)
    metrics = stage_metrics(read_report_sections(report_dir), stage)

    # the stages that led to this one, in pipeline order, with the tokens each trained on
    upto = STAGES.index(stage) + 1 if stage in STAGES else len(STAGES)
    trained = [(s, stage_tokens(run_dir / s)) for s in STAGES[:upto] if (run_dir / s / "metrics.jsonl").is_file()]
    if stage not in STAGES and (run_dir / stage / "metrics.jsonl").is_file():
        trained.append((stage, stage_tokens(run_dir / stage)))

    name = repo_id.split("/")[-1]
    data = ModelCardData(
        language="en",
        license="mit",
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["nanochat", "hfnanochat", "custom_code", "text-generation"],
        model_name=name,
        eval_results=eval_results(metrics) or None,
    )
    options = [
        f"{k}={getattr(config, k)}"
        for k in ("value_embeddings", "residual_scalars", "smear", "backout")
        if getattr(config, k, False)
    ]
    if config.window_pattern and "S" in config.layer_window_letters():
        options.append(f"window_pattern={config.window_pattern}")
    architecture = [
        "| | |",
        "|---|---|",
        f"| parameters | {params:,} ({_human(params)}) |",
        f"| layers (depth) | {config.num_hidden_layers} |",
        f"| model width | {config.hidden_size} |",
        f"| attention heads (query / key-value) | {config.num_attention_heads} / {config.num_key_value_heads} |",
        f"| context length | {config.max_position_embeddings} |",
        f"| vocabulary | {config.vocab_size:,} |",
        f"| logit softcap | {config.final_logit_softcapping} |",
        f"| 2026 options | {', '.join(options) if options else 'none (the original nanochat architecture)'} |",
    ]
    if trained:
        stages_md = ["| stage | tokens trained |", "|---|---|"] + [
            f"| {s} | {f'{t:,}' if t else 'unknown'} |" for s, t in trained
        ]
    else:
        stages_md = ["No training logs were found beside this checkpoint."]
    if metrics:
        metrics_md = ["| metric | value |", "|---|---|"] + [f"| {k} | {v:.4f} |" for k, v in metrics.items()]
    else:
        metrics_md = ["No evaluation results were recorded for this stage."]
    native_md = (
        [
            "",
            "Stock transformers, no remote code (the `native/` folder holds the same weights as transformers' own "
            "`NanoChatForCausalLM`):",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            f'model = AutoModelForCausalLM.from_pretrained("{repo_id}", subfolder="native")',
            f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}", subfolder="native")',
            "```",
        ]
        if native
        else []
    )
    body = "\n".join(
        [
            "---",
            "{{ card_data }}",
            "---",
            "",
            f"# {name}",
            "",
            "A small ChatGPT-style model trained with hfnanochat: [nanochat](https://github.com/karpathy/nanochat)'s "
            "pipeline (tokenizer, pretraining with Muon + AdamW, mid-training, SFT, optional RL) rebuilt on "
            "transformers, Accelerate and TRL. It chats in nanochat's format and can call a calculator tool.",
            "",
            f"This checkpoint is the output of the **{stage}** stage.",
            "",
            "## Architecture and size",
            "",
            *architecture,
            "",
            "## Training",
            "",
            *stages_md,
            "",
            "## Evaluation",
            "",
            *metrics_md,
            "",
            "## Usage",
            "",
            "transformers (the modeling code ships with the weights, hence `trust_remote_code=True`):",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            f'model = AutoModelForCausalLM.from_pretrained("{repo_id}", trust_remote_code=True)',
            f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}", trust_remote_code=True)',
            'messages = [{"role": "user", "content": "What is 12 times 7?"}]',
            "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors='pt',",
            "                                       return_dict=True)",
            "out = model.generate(**inputs, max_new_tokens=64)",
            "print(tokenizer.decode(out[0, inputs['input_ids'].shape[1]:], skip_special_tokens=True))",
            "```",
            "",
            "pipeline:",
            "",
            "```python",
            "from transformers import pipeline",
            f'chat = pipeline("text-generation", model="{repo_id}", trust_remote_code=True)',
            'print(chat([{"role": "user", "content": "Why is the sky blue?"}], max_new_tokens=64))',
            "```",
            *native_md,
            "",
            "Chat in a terminal, with the calculator tool in the loop (from a hfnanochat checkout):",
            "",
            "```bash",
            f"python -m hfnanochat.chat --model {repo_id}",
            "```",
            "",
            "Evaluate with lm-eval:",
            "",
            "```bash",
            f"lm_eval --model hf --model_args pretrained={repo_id},trust_remote_code=True --tasks arc_easy",
            "```",
            "",
            "## Limitations",
            "",
            "- A small model trained on a small budget: it makes factual and arithmetic mistakes, invents things and "
            "should not be relied on for anything that matters.",
            "- English only; no safety tuning beyond what the SFT data carries.",
            f"- The context is {config.max_position_embeddings} tokens.",
            "- The calculator tool runs only inside hfnanochat's engine (the CLI chat and the Space); plain "
            "`generate` and `pipeline` write the tool call as text and do not execute it.",
            "",
            "## License",
            "",
            "MIT, like nanochat.",
            "",
        ]
    )
    return ModelCard.from_template(data, template_str=body)


def build_upload_folder(
    folder: str | os.PathLike,
    out_dir: str | os.PathLike,
    repo_id: str,
    *,
    report: str | os.PathLike | None = None,
    native: bool = False,
) -> Path:
    """Write the folder `push` uploads for the final folder `folder` to `out_dir` (which must not exist yet or be
    empty). `report`: the run's report folder or report.md (default: `report/` or `report.md` in the run folder).
    `native=True` adds `native/` for stock transformers; ValueError when the architecture cannot be expressed."""
    folder, out_dir = Path(folder), Path(out_dir)
    problem = verify_folder(folder)
    if problem is not None:
        raise ValueError(f"{folder} is not a complete final folder: {problem}")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"{out_dir} exists and is not empty: give a new folder")
    _, run_dir = run_layout(folder)
    if report is None:
        report = run_dir / "report" if (run_dir / "report").is_dir() else run_dir / "report.md"
    report = Path(report)
    report_dir = report if report.is_dir() else None
    report_md = report / "report.md" if report.is_dir() else report

    # built beside out_dir and renamed into place: a failure (e.g. --native on a 2026 architecture) leaves no
    # half-written folder that looks like a dry run's result
    tmp = out_dir.with_name(f".tmp_{out_dir.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for path in sorted(folder.iterdir()):
            if path.is_file():
                shutil.copy2(path, tmp / path.name)
        if native:
            from .convert import hf_to_native

            hf_to_native(folder, tmp / "native")
        if report_md.is_file():
            shutil.copy2(report_md, tmp / "report.md")
        if report_dir is not None:
            for path in sorted(report_dir.iterdir()):
                if path.suffix in CURVE_SUFFIXES:
                    shutil.copy2(path, tmp / path.name)
        model_card(folder, repo_id, report_dir=report_dir, native=native).save(tmp / "README.md")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out_dir.exists():
        out_dir.rmdir()  # checked empty above
    os.replace(tmp, out_dir)
    return out_dir


def push(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    report: str | os.PathLike | None = None,
    native: bool = False,
    token: str | None = None,
    api: HfApi | None = None,
):
    """Create the model repo if needed and upload the folder `build_upload_folder` writes. The token is `token`, else
    the usual login (`hf auth login`) or `HF_TOKEN`. Returns the CommitInfo (the repo's last commit when nothing
    changed)."""
    api = api or HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="hfnanochat_push_") as tmp:
        staged = build_upload_folder(folder, Path(tmp) / "upload", repo_id, report=report, native=native)
        # not private: None, so a new repo gets its owner's default visibility
        api.create_repo(repo_id, repo_type="model", private=private or None, exist_ok=True)
        return api.upload_folder(
            repo_id=repo_id,
            repo_type="model",
            folder_path=staged,
            commit_message=f"Upload {run_layout(folder)[0]} checkpoint with hfnanochat",
        )


def space_source() -> Path:
    """The Space's sources (`spaces_app/` of a hfnanochat checkout)."""
    return Path(__file__).resolve().parents[1] / "spaces_app"


def build_space_folder(out_dir: str | os.PathLike, model_id: str | None = None) -> Path:
    """Write the Space's folder to `out_dir`: the app, its requirements, its README whose `models:` names `model_id`
    (the app's default model), and the hfnanochat package itself, which the app imports for the engine and the
    calculator (the package is not on PyPI, and shipping its few source files pins the Space to this version)."""
    from huggingface_hub import SpaceCard

    src, out_dir = space_source(), Path(out_dir)
    if not (src / "app.py").is_file():
        raise ValueError(f"{src} has no app.py: publish the Space from a hfnanochat checkout")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"{out_dir} exists and is not empty: give a new folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("app.py", "requirements.txt"):
        shutil.copy2(src / name, out_dir / name)
    card = SpaceCard.load(src / "README.md")
    if model_id is not None:
        card.data.models = [model_id]
    card.save(out_dir / "README.md")
    package = Path(__file__).resolve().parent
    for path in sorted(package.rglob("*.py")):
        target = out_dir / "hfnanochat" / path.relative_to(package)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    return out_dir


def push_space(
    repo_id: str,
    model_id: str | None = None,
    *,
    private: bool = False,
    token: str | None = None,
    api: HfApi | None = None,
):
    """Create the Gradio Space if needed and upload the folder `build_space_folder` writes."""
    api = api or HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="hfnanochat_space_") as tmp:
        staged = build_space_folder(Path(tmp) / "space", model_id)
        api.create_repo(repo_id, repo_type="space", space_sdk="gradio", private=private or None, exist_ok=True)
        return api.upload_folder(
            repo_id=repo_id, repo_type="space", folder_path=staged, commit_message="Upload the hfnanochat Space"
        )
