"""Step checkpoints of our own training loop (pretraining): atomic save, verified resume, retention.

A checkpoint is `OUT/checkpoints/step_NNNNNN/`, holding what `Accelerator.save_state` writes (optimizer, RNG,
scheduler; under FSDP the sharded model too), the model as a `from_pretrained` folder under `model/`, whatever the
caller adds (data positions, `trainer_state.json`), and last `manifest.json` with every file's size and hash.

- Atomic: everything is written into `.tmp_step_NNNNNN` and renamed into place, so a crash mid-write leaves the
  previous checkpoints as they were; stale `.tmp_*` folders are removed by the next save.
- Verified: `find_checkpoint(out, "latest")` takes the newest checkpoint whose files match its manifest. A truncated
  or corrupted one (a disk that filled up, a copy cut short) is skipped with a message saying which file is wrong,
  and the previous complete one is used.
- Retention: the newest `keep` complete checkpoints stay (files of the sizes their manifest records); older ones,
  and incomplete or damaged ones, are removed (renamed to `.tmp_delete_*` first, so a crash mid-delete never leaves
  a `step_` folder with files missing).

TRL's and transformers' Trainer keep their own checkpoints (`checkpoint-N`); this module is for the loop that
Accelerate runs directly, where nothing else provides them.
"""

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from .export import verify_folder, write_manifest


def checkpoints(out: Path) -> list[Path]:
    """OUT/checkpoints/step_NNNNNN folders, complete or not, oldest first (by step number, not by name)."""
    found = [p for p in (Path(out) / "checkpoints").glob("step_*") if p.name[5:].isdigit() and p.is_dir()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def problem(path: Path) -> str | None:
    """None for a complete checkpoint, else what is wrong with it."""
    if not (path / "trainer_state.json").is_file() or not (path / "model" / "config.json").is_file():
        return f"{path} is not a complete checkpoint folder (no trainer_state.json or model/)"
    return verify_folder(path)


def find_checkpoint(out: Path, resume: str, log: Callable[[str], None] = print) -> Path:
    """The checkpoint `--resume` names: a folder (which must be complete), or "latest", the newest complete one under
    OUT/checkpoints (incomplete ones are reported and skipped)."""
    if resume != "latest":
        path = Path(resume)
        wrong = problem(path)
        if wrong:
            raise ValueError(f"--resume {resume}: {wrong}")
        return path
    for path in reversed(checkpoints(out)):
        wrong = problem(path)
        if wrong is None:
            return path
        log(f"skipping checkpoint {path.name}: {wrong}")
    raise ValueError(f"--resume: no complete checkpoint in {Path(out) / 'checkpoints'}")


def save_checkpoint(
    accelerator, out: Path, step: int, keep: int, write_extra: Callable[[Path], None], state: dict
) -> Path:
    """Write step `step`'s checkpoint (every rank calls this: `save_state` and `write_extra` run on all of them).

    `write_extra(folder)` adds each rank's own files (data positions); `state` becomes `trainer_state.json`."""
    checkpoints_dir = Path(out) / "checkpoints"
    final = checkpoints_dir / f"step_{step:06d}"
    tmp = checkpoints_dir / f".tmp_step_{step:06d}"
    if accelerator.is_main_process:
        for stale in checkpoints_dir.glob(".tmp_*"):  # left by a crash mid-write or mid-delete
            shutil.rmtree(stale)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    write_extra(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
        write_manifest(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)  # atomic on POSIX: readers see the old set of checkpoints or the new one
        # sizes against the manifest (cheap): a damaged checkpoint is removed, never kept in place of a good one
        complete = [p for p in checkpoints(out) if verify_folder(p, hashes=False) is None]
        partial = [p for p in checkpoints(out) if p not in complete]
        for old in complete[:-keep] + partial:
            trash = old.with_name(f".tmp_delete_{old.name}")
            os.replace(old, trash)
            shutil.rmtree(trash)
    accelerator.wait_for_everyone()
    return final


def last_good(out: Path) -> Path | None:
    """The newest checkpoint whose files have the sizes of its manifest (cheap: no hashing), for messages."""
    complete = [p for p in checkpoints(out) if verify_folder(p, hashes=False) is None]
    return complete[-1] if complete else None


def checkpoint_model_as_hf_folder(accelerator, model, raw_model, fsdp: bool) -> Callable[[], dict]:
    """Make `save_state`/`load_state` keep the model as a `from_pretrained` folder (`model/`) in each checkpoint.

    Under DDP that folder *is* the model state, so Accelerate's own copy is skipped; under FSDP Accelerate keeps its
    sharded-model files (it knows how to load them into shards) and the HF folder is written beside them from the
    gathered full state dict. Returns `full_state_dict()`, the gathered weights (a collective: every rank calls it),
    named as in the plain module."""

    def full_state_dict() -> dict:
        return {k.removeprefix("_orig_mod."): v for k, v in accelerator.get_state_dict(model).items()}

    def save_model_hook(models, weights, output_dir):
        state_dict = full_state_dict()
        if accelerator.is_main_process:
            raw_model.save_pretrained(Path(output_dir) / "model", state_dict=state_dict)
        if not fsdp:
            weights.clear()

    def load_model_hook(models, input_dir):
        if fsdp:
            return
        loaded = type(raw_model).from_pretrained(Path(input_dir) / "model", dtype=next(raw_model.parameters()).dtype)
        raw_model.load_state_dict(loaded.state_dict())
        models.clear()

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)
    return full_state_dict
