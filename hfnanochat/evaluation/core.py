"""CORE, the DCLM in-context-learning metric, computed exactly as nanochat's `core_eval.py` + `base_eval.py` do.

Notable:
- The bundle (`core.yaml`, `eval_data/**.jsonl`, `eval_meta_data.csv`) is nanochat's; `download_bundle` fetches it
  once into the cache, or any folder of that layout is given by path.
- Rows are shuffled with `random.Random(1337)` and optionally cropped to the first N (capped runs compare);
  few-shot rows for example `idx` come from `random.Random(1234 + idx)` over the other rows of that (cropped) list.
- Three task types. multiple_choice: one prompt per choice, scored span = tokens after the common prefix;
  schema: one prompt per context, span = the common suffix; language_modeling: the span is the continuation.
  MC/schema pick the option of lowest mean fp32 loss over its span; LM needs every greedy prediction right.
- Batched, unlike nanochat's one example per forward: the sequences of many examples are sorted by length and
  padded with BOS on the right into one forward (causal attention makes the padding invisible to the rows), and
  only the positions from the earliest span on go through the LM head (`logits_to_keep`).
- A sequence longer than the model's context keeps its last `max_position_embeddings` tokens (nanochat does this
  for GPT-2); how many examples were cut is counted per task.
- Under torch.distributed (`accelerate launch`, or called from pretraining) rank r takes examples r, r+W, ... and
  the per-example results are summed across ranks, as nanochat does.
- Accuracy is centred by the task's random baseline (percent): (acc - 0.01 b) / (1 - 0.01 b); CORE is the mean.
"""

import csv
import json
import os
import random
import shutil
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from filelock import FileLock
from tqdm.auto import tqdm

BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
# the fields each task type's rows need, with their types
ROW_FIELDS = {
    "multiple_choice": {"query": str, "choices": list, "gold": int},
    "schema": {"context_options": list, "continuation": str, "gold": int},
    "language_modeling": {"context": str, "continuation": str},
}
SHUFFLE_SEED = 1337  # base_eval.py: shuffle every task's rows, then crop to --max-per-task
FEWSHOT_SEED = 1234  # core_eval.py: few-shot rows of example idx come from Random(1234 + idx)


class BundleError(ValueError):
    """A problem with the bundle or one of its tasks, worded for the user."""


@dataclass
class CoreTask:
    label: str
    path: Path
    task_type: str
    num_fewshot: int
    delimiter: str
    baseline: float  # random baseline in percent, as eval_meta_data.csv gives it


@dataclass
class TaskResult:
    label: str
    accuracy: float
    centered: float
    examples: int
    truncated: int  # examples with at least one sequence cut from the left to fit the context
    correct: list[bool] = field(repr=False)
    # per example, per option: mean loss over the scored span (LM: one entry, the continuation's mean loss)
    losses: list[list[float]] = field(repr=False)


def default_bundle_dir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "hfnanochat" / "eval_bundle"


def download_bundle(bundle_dir: str | os.PathLike | None = None, url: str = BUNDLE_URL) -> Path:
    """The eval bundle at `bundle_dir` (default `~/.cache/hfnanochat/eval_bundle`), downloaded and unzipped on first
    use. A lock makes concurrent processes download it once; the folder appears by rename only when complete."""
    bundle_dir = Path(bundle_dir) if bundle_dir else default_bundle_dir()
    if (bundle_dir / "core.yaml").is_file():
        return bundle_dir
    bundle_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(bundle_dir) + ".lock"):
        if (bundle_dir / "core.yaml").is_file():  # another process finished while we waited
            return bundle_dir
        tmp = bundle_dir.with_name(bundle_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        archive = tmp / "eval_bundle.zip"
        print(f"downloading the CORE eval bundle (~160 MB) from {url}")
        with urllib.request.urlopen(url, timeout=60) as response, open(archive, "wb") as f:
            shutil.copyfileobj(response, f, length=1 << 20)
        with zipfile.ZipFile(archive) as z:
            z.extractall(tmp / "unzipped")
        # the zip holds one top folder, eval_bundle/
        found = [p.parent for p in (tmp / "unzipped").rglob("core.yaml")]
        if not found:
            raise BundleError(f"{url}: the archive holds no core.yaml")
        shutil.rmtree(bundle_dir, ignore_errors=True)
        os.replace(found[0], bundle_dir)
        shutil.rmtree(tmp)
    return bundle_dir


def load_bundle(bundle_dir: str | os.PathLike) -> tuple[list[CoreTask], dict[str, str]]:
    """The tasks of a bundle in `core.yaml` order, and {label: reason} for the entries that cannot run (unknown task
    type, no random baseline, missing data file). A missing or unreadable core.yaml / csv raises BundleError."""
    bundle_dir = Path(bundle_dir)
    config_path, meta_path = bundle_dir / "core.yaml", bundle_dir / "eval_meta_data.csv"
    for path in (config_path, meta_path):
        if not path.is_file():
            raise BundleError(f"{bundle_dir} is not a CORE eval bundle: no {path.name}")
    try:
        entries = yaml.safe_load(config_path.read_text(encoding="utf-8"))["icl_tasks"]
        assert isinstance(entries, list)
    except (yaml.YAMLError, KeyError, TypeError, AssertionError) as e:
        raise BundleError(f"{config_path}: expected a mapping with a list 'icl_tasks' ({e})") from None
    with open(meta_path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if not {"Eval Task", "Random baseline"} <= set(reader.fieldnames or []):
            raise BundleError(f"{meta_path}: needs the columns 'Eval Task' and 'Random baseline'")
        baselines = {row["Eval Task"]: row["Random baseline"] for row in reader}
    tasks, skipped = [], {}
    for n, entry in enumerate(entries):
        label = entry.get("label") if isinstance(entry, dict) else None
        if not isinstance(label, str):
            skipped[f"icl_tasks[{n}]"] = f"{config_path}: entry {n} has no 'label'"
            continue
        try:
            task_type = entry["icl_task_type"]
            if task_type not in TASK_TYPES:
                raise BundleError(f"unknown icl_task_type {task_type!r} (known: {', '.join(TASK_TYPES)})")
            shots = entry["num_fewshot"][0]
            if not isinstance(shots, int) or shots < 0:
                raise BundleError(f"num_fewshot {entry['num_fewshot']!r} is not a list holding a count")
            if label not in baselines:
                raise BundleError(f"no random baseline for it in {meta_path.name}")
            try:
                baseline = float(baselines[label])
            except ValueError:
                raise BundleError(f"random baseline {baselines[label]!r} is not a number") from None
            path = bundle_dir / "eval_data" / entry["dataset_uri"]
            if not path.is_file():
                raise BundleError(f"data file {path} is missing")
            delimiter = entry.get("continuation_delimiter", " ")  # DCLM's default
            tasks.append(CoreTask(label, path, task_type, shots, delimiter, baseline))
        except (KeyError, TypeError, IndexError) as e:
            skipped[label] = f"core.yaml entry has no valid {e}"
        except BundleError as e:
            skipped[label] = str(e)
    return tasks, skipped


def load_rows(task: CoreTask) -> list[dict]:
    """The task's rows, each checked against its type; the first bad row raises BundleError naming file:line."""
    rows = []
    with open(task.path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{task.path}:{line_no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise BundleError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise BundleError(f"{where}: a row must be a JSON object")
            for key, kind in ROW_FIELDS[task.task_type].items():
                if not isinstance(row.get(key), kind) or isinstance(row.get(key), bool):
                    raise BundleError(f"{where}: {task.task_type} rows need {key!r} ({kind.__name__})")
            options = _options(row)
            if options is not None:
                if not options or not all(isinstance(o, str) for o in options):
                    raise BundleError(f"{where}: the options must be a non-empty list of strings")
                if not 0 <= row["gold"] < len(options):
                    raise BundleError(f"{where}: gold {row['gold']} is not an index into {len(options)} options")
            rows.append(row)
    if not rows:
        raise BundleError(f"{task.path}: no rows")
    return rows


def _options(row: dict) -> list[str] | None:
    return row.get("choices", row.get("context_options"))


def select_rows(rows: list, max_per_task: int = -1) -> list:
    """base_eval.py's order: shuffle with Random(1337), then keep the first `max_per_task` (-1: all)."""
    rows = list(rows)
    random.Random(SHUFFLE_SEED).shuffle(rows)
    return rows[:max_per_task] if max_per_task > 0 else rows


def fewshot_indices(idx: int, n: int, shots: int) -> list[int]:
    """core_eval.py's few-shot draw for example `idx` of `n`: `shots` distinct other rows."""
    if shots == 0:
        return []
    return random.Random(FEWSHOT_SEED + idx).sample([i for i in range(n) if i != idx], shots)


def render_prompts(task_type: str, item: dict, delimiter: str, shots: list[dict]) -> list[str]:
    """nanochat's Jinja templates as f-strings. Shots and item are joined by a blank line; MC/schema give one prompt
    per option; LM gives [without, with] the continuation, `without` stripped so that its tokens prefix `with`'s
    (the delimiter's space then travels with the continuation's first token)."""
    d = delimiter
    if task_type == "multiple_choice":
        prefix = "".join(f"{s['query']}{d}{s['choices'][s['gold']]}\n\n" for s in shots)
        return [f"{prefix}{item['query']}{d}{choice}" for choice in item["choices"]]
    if task_type == "schema":
        prefix = "".join(f"{s['context_options'][s['gold']]}{d}{s['continuation']}\n\n" for s in shots)
        return [f"{prefix}{option}{d}{item['continuation']}" for option in item["context_options"]]
    prefix = "".join(f"{s['context'].strip()}{d}{s['continuation']}\n\n" for s in shots)
    without = f"{prefix}{item['context'].strip()}{d}"
    return [without.strip(), without + item["continuation"]]


def _common_length(seqs: list[list[int]], from_end: bool) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        k = -1 - i if from_end else i
        if any(s[k] != seqs[0][k] for s in seqs):
            return i
    return n


def scored_spans(task_type: str, token_lists: list[list[int]]) -> list[tuple[list[int], int, int]]:
    """(tokens, start, end) per sequence to run: tokens[start:end] is the span whose losses/predictions count."""
    if task_type == "multiple_choice":
        start = _common_length(token_lists, from_end=False)
        return [(t, start, len(t)) for t in token_lists]
    if task_type == "schema":
        suffix = _common_length(token_lists, from_end=True)
        return [(t, len(t) - suffix, len(t)) for t in token_lists]
    without, with_ = token_lists
    return [(with_, len(without), len(with_))]


def crop_left(tokens: list[int], start: int, end: int, max_len: int | None) -> tuple[list[int], int, int, bool]:
    """Keep the last `max_len` tokens and shift the span with them (nanochat's rule for fixed-context models). The
    span keeps at least one position before it, so its first token is still predicted from something."""
    if max_len is None or len(tokens) <= max_len:
        return tokens, max(start, 1), end, False  # start 0: a schema option that is all suffix (BOS included)
    cut = len(tokens) - max_len
    return tokens[cut:], max(start - cut, 1), end - cut, True


def centered(accuracy: float, baseline_percent: float) -> float:
    b = 0.01 * baseline_percent
    return (accuracy - b) / (1.0 - b)


def core_score(centered_scores: list[float]) -> float:
    return sum(centered_scores) / len(centered_scores) if centered_scores else float("nan")


def _dist() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def evaluate_task(
    model,
    tokenizer,
    task: CoreTask,
    rows: list[dict],
    *,
    batch_size: int = 32,
    progress: bool = True,
) -> TaskResult:
    """Accuracy of `model` on `rows` (already selected with `select_rows`), this rank's share of the examples,
    summed across ranks. `batch_size`: sequences per forward."""
    n = len(rows)
    if task.num_fewshot > n - 1:
        raise BundleError(f"{task.num_fewshot}-shot needs at least {task.num_fewshot + 1} rows, {n} selected")
    rank, world = _dist()
    device = next(model.parameters()).device
    bos = tokenizer.bos_token_id
    max_len = getattr(model.config, "max_position_embeddings", None)

    # every sequence of this rank's examples: (example, option, tokens, start, end)
    seqs, truncated = [], [0] * n
    for idx in range(rank, n, world):
        shots = [rows[i] for i in fewshot_indices(idx, n, task.num_fewshot)]
        prompts = render_prompts(task.task_type, rows[idx], task.delimiter, shots)
        # split_special_tokens: text is text, as nanochat's encode_ordinary
        ids = tokenizer(prompts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        spans = scored_spans(task.task_type, [[bos, *t] for t in ids])
        for option, (tokens, start, end) in enumerate(spans):
            tokens, start, end, cut = crop_left(tokens, start, end, max_len)
            truncated[idx] |= cut
            seqs.append((idx, option, tokens, start, end))
    width = max(len(_options(r) or [None]) for r in rows)  # the same on every rank, for the all-reduce
    losses = torch.zeros(n, width, device=device)  # mean span loss per option, fp32
    hits = torch.zeros(n, device=device)  # LM: every span token predicted

    seqs.sort(key=lambda s: -len(s[2]))  # similar lengths share a batch: little padding, a short logits window
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    bar = tqdm(total=len(seqs), desc=task.label, unit="seq", disable=not progress or rank != 0, leave=False)
    for b in range(0, len(seqs), batch_size):
        batch = seqs[b : b + batch_size]
        T = len(batch[0][2])
        input_ids = torch.full((len(batch), T), bos, dtype=torch.long)
        for row, (_, _, tokens, _, _) in enumerate(batch):
            input_ids[row, : len(tokens)] = torch.tensor(tokens)
        input_ids = input_ids.to(device)
        columns = list(zip(*batch))
        idx, option, starts, ends = (torch.tensor(columns[k], device=device) for k in (0, 1, 3, 4))
        lo = starts.min().item() - 1  # the first position whose prediction is scored
        with autocast:
            logits = model(input_ids=input_ids, logits_to_keep=T - lo).logits
        logits = logits[:, :-1].float()  # positions lo .. T-2 predict tokens lo+1 .. T-1
        targets = input_ids[:, lo + 1 :]
        token_losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)
        position = torch.arange(targets.shape[1], device=device)
        in_span = (position >= (starts - 1 - lo)[:, None]) & (position < (ends - 1 - lo)[:, None])
        # mean over the span (an empty span gives nan, as torch's mean of nothing does in nanochat)
        losses[idx, option] = (token_losses * in_span).sum(1) / in_span.sum(1)
        if task.task_type == "language_modeling":
            hits[idx] = ((logits.argmax(dim=-1) == targets) | ~in_span).all(1).float()
        bar.update(len(batch))
    bar.close()

    truncated = torch.tensor(truncated, dtype=torch.float32, device=device)
    if world > 1:
        for t in (losses, hits, truncated):
            dist.all_reduce(t)
    losses_list = losses.tolist()
    if task.task_type == "language_modeling":
        correct = [bool(h) for h in hits.tolist()]
        per_example = [row[:1] for row in losses_list]
    else:
        per_example = [row[: len(_options(r))] for row, r in zip(losses_list, rows)]
        # the first option of lowest mean loss, as `mean_losses.index(min(mean_losses))`
        correct = [m.index(min(m)) == r["gold"] for m, r in zip(per_example, rows)]
    accuracy = sum(correct) / n
    return TaskResult(
        label=task.label,
        accuracy=accuracy,
        centered=centered(accuracy, task.baseline),
        examples=n,
        truncated=int(truncated.sum().item()),
        correct=correct,
        losses=per_example,
    )


def evaluate_core(
    model,
    tokenizer,
    bundle_dir: str | os.PathLike,
    *,
    max_per_task: int = -1,
    tasks: list[str] | None = None,
    batch_size: int = 32,
    progress: bool = True,
) -> dict:
    """CORE of `model` over the bundle's tasks (or the labels in `tasks`), nanochat's way.

    Returns {"core", "tasks": {label: {"accuracy", "centered", "examples", "truncated"}}, "skipped": {label: why},
    "max_per_task"}. A task that cannot run (missing file, malformed row, unknown type or label) is skipped with its
    reason and CORE is the mean over the tasks that ran. Every rank must call this (the results are summed)."""
    rank, _ = _dist()
    bundle_tasks, skipped = load_bundle(bundle_dir)
    if tasks is not None:
        known = {t.label for t in bundle_tasks} | set(skipped)
        for label in tasks:
            if label not in known:
                skipped[label] = f"unknown task; the bundle has: {', '.join(sorted(known))}"
        skipped = {k: v for k, v in skipped.items() if k in tasks}
        bundle_tasks = [t for t in bundle_tasks if t.label in tasks]
    results = {}
    model_was_training = model.training
    model.eval()
    for task in bundle_tasks:
        try:
            rows = select_rows(load_rows(task), max_per_task)
            result = evaluate_task(model, tokenizer, task, rows, batch_size=batch_size, progress=progress)
        except BundleError as e:
            skipped[task.label] = str(e)
            continue
        results[task.label] = result
        if rank == 0 and progress:
            tqdm.write(
                f"{task.label:<34} accuracy {result.accuracy:.4f} | centered {result.centered:.4f} | "
                f"{result.examples} examples" + (f", {result.truncated} truncated" if result.truncated else "")
            )
    model.train(model_was_training)
    if rank == 0:
        for label, reason in skipped.items():
            tqdm.write(f"skipped {label}: {reason}")
    return {
        "core": core_score([r.centered for r in results.values()]),
        "tasks": {
            label: {"accuracy": r.accuracy, "centered": r.centered, "examples": r.examples, "truncated": r.truncated}
            for label, r in results.items()
        },
        "skipped": skipped,
        "max_per_task": max_per_task,
    }
