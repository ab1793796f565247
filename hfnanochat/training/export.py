"""The one writer of a stage's final model folder: what every stage hands to the next, to the Hub and to users.

A final folder holds
- `model.safetensors` (+ index when sharded) and `config.json` with `auto_map`, plus the modeling and configuration
  files, so `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` loads it in a process where
  hfnanochat is not installed (the files are PyTorch + transformers only);
- the tokenizer (`tokenizer.json`, `tokenizer_config.json`, `chat_template.jinja`) and `token_bytes.pt` (bits per
  byte);
- `generation_config.json` stopping on `<|assistant_end|>` or `<|bos|>`, nanochat's two stop tokens;
- `manifest.json`: every file's size and SHA-256, written last, so a reader can tell a complete folder from one a
  crash cut short (`verify_folder`).

The folder is written beside its destination and renamed into place, so a crash mid-write leaves the previous
folder (or none), never a partial one.
"""

import hashlib
import json
import os
import shutil
from pathlib import Path

from ..tokenizer import save_tokenizer

MANIFEST = "manifest.json"


def set_generation_defaults(model, tokenizer) -> None:
    """Stop on `<|assistant_end|>` or `<|bos|>` (nanochat's Engine stops on both); pad with the tokenizer's pad."""
    bos = tokenizer.convert_tokens_to_ids("<|bos|>")
    end = tokenizer.convert_tokens_to_ids("<|assistant_end|>")
    model.generation_config.bos_token_id = bos
    model.generation_config.eos_token_id = [end, bos]
    model.generation_config.pad_token_id = tokenizer.pad_token_id


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: str | os.PathLike) -> dict:
    """Sizes and hashes of every file under `folder` (but the manifest), written to `folder/manifest.json`."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def verify_folder(folder: str | os.PathLike, hashes: bool = True) -> str | None:
    """None when `folder` holds every file of its manifest with the recorded size (and hash), else what is wrong."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        return f"no {MANIFEST} in {folder} (written last: the save did not finish)"
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError:
        return f"{path} is not valid JSON"
    for name, entry in manifest.items():
        file = folder / name
        if not file.is_file():
            return f"{file} is missing"
        if file.stat().st_size != entry["bytes"]:
            return f"{file} has {file.stat().st_size} bytes, {entry['bytes']} were written"
        if hashes and _sha256(file) != entry["sha256"]:
            return f"{file} does not match the hash written at save time"
    return None


def replace_folder(tmp: Path, final: Path) -> None:
    """Move a finished `tmp` folder to `final`, replacing what was there, in two renames: a crash in between leaves
    the old folder under a `.old` name beside it, never a half-written `final`."""
    old = final.with_name(f".old_{final.name}")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def save_final(model, tokenizer, out_dir: str | os.PathLike, *, state_dict: dict | None = None) -> Path:
    """Write `model` + `tokenizer` as a final folder at `out_dir` (see the module docstring). Main process only.

    `state_dict`: the full weights when the model is sharded (FSDP) and `model` holds only this rank's part. A PEFT
    model is merged first, its adapter kept beside the folder as `adapter/`."""
    from peft import PeftModel

    out_dir = Path(out_dir)
    if isinstance(model, PeftModel):
        model.save_pretrained(out_dir.parent / "adapter")
        model = model.merge_and_unload()
    tmp = out_dir.with_name(f".tmp_{out_dir.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.config.use_cache = True
    set_generation_defaults(model, tokenizer)
    model.save_pretrained(tmp, state_dict=state_dict)
    save_tokenizer(tokenizer, tmp)
    if not any(tmp.glob("*.safetensors")):
        raise RuntimeError(f"save_pretrained wrote no safetensors weights in {tmp}")
    write_manifest(tmp)
    replace_folder(tmp, out_dir)
    return out_dir


def check_model_folder(folder: str | os.PathLike) -> None:
    """Before loading a final folder: a clear error naming the file when one is missing or cut short (sizes against
    the manifest; folders written before manifests existed, or by other tools, pass unchecked)."""
    folder = Path(folder)
    if folder.is_dir() and (folder / MANIFEST).is_file():
        wrong = verify_folder(folder, hashes=False)
        if wrong:
            raise ValueError(f"{wrong}: the folder is damaged; write it again with the stage that made it")
