"""One convention for every entry point (`train/*`, `eval/*`, `python -m hfnanochat.*`).

- Numbers and paths are checked before any work starts: `positive_int`, `non_negative_int`, `fraction` as argparse
  types, `model_folder` for a `--model`/`--tokenizer` that looks like a path.
- Bad input ends the program with one line on stderr, `error: <what is wrong>`, and exit code 2 (argparse's own
  usage errors included); a traceback means a bug. `HFNANOCHAT_TRACEBACK=1` shows the traceback of a user error too.
- A run folder that already holds a run is refused unless the user says what to do with it: `--resume` continues it,
  `--overwrite` replaces it. Nothing is deleted or truncated silently.
"""

import argparse
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

# What a user can cause by what they typed or pointed us at; anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with defaults shown in --help (once: help strings don't repeat them) and usage errors as one line."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"error: {message}\n")


def _checked(kind, rule: str, ok: Callable) -> Callable[[str], object]:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {rule}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {rule}, got {text}")
        return value

    parse.__name__ = rule  # argparse names the type in its messages
    return parse


positive_int = _checked(int, "a positive integer", lambda v: v >= 1)
non_negative_int = _checked(int, "an integer >= 0", lambda v: v >= 0)
positive_float = _checked(float, "a positive number", lambda v: v > 0)
non_negative_float = _checked(float, "a number >= 0", lambda v: v >= 0)
fraction = _checked(float, "a fraction in (0, 1]", lambda v: 0 < v <= 1)


def looks_like_path(name: str) -> bool:
    """A Hub id is `name` or `org/name`; anything else with a path's shape is meant as a local folder, and so is
    `org/name` when `org` is a folder here (`out/sft`)."""
    if name.startswith(("/", ".", "~")) or name.count("/") > 1 or name.endswith("/"):
        return True
    return "/" in name and Path(name.split("/")[0]).is_dir()


def model_folder(flag: str, name: str) -> str:
    """`name` unchanged when it is an existing folder or a Hub id; a clear error for a path that is not there."""
    path = Path(os.path.expanduser(name))
    if path.is_dir():
        return str(path)
    if path.exists():
        raise NotADirectoryError(f"{flag} {name}: not a folder")
    if looks_like_path(name):
        raise FileNotFoundError(f"{flag} {name}: no such folder")
    return name


def check_output(out: str | Path, *, resume: bool, overwrite: bool, what: str = "run") -> bool:
    """Refuse to write into a run folder that already holds files unless asked to: `resume` continues what is
    there, `overwrite` replaces it. Returns whether the caller must clear `out` first (`clear_output`, on one
    process). Writes nothing, so every process of a run can call it."""
    out = Path(out)
    if resume and overwrite:
        raise ValueError("--resume continues the run in the output folder, --overwrite replaces it: pick one")
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out}: exists and is not a folder")
    holds = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not holds or resume:
        return False
    if not overwrite:
        shown = ", ".join(holds[:4]) + (", ..." if len(holds) > 4 else "")
        raise FileExistsError(
            f"{out} already holds a {what} ({shown}): pass --resume to continue it, --overwrite to replace it, "
            "or choose another output folder"
        )
    return True


def clear_output(out: str | Path) -> None:
    """Empty a run folder the user asked to replace (--overwrite), by renaming it aside first: a crash mid-delete
    leaves `.<name>.replaced`, never a half-deleted run that looks like the new one. The folder is left in place,
    empty, for the new run's first write (a metrics line may come before any checkpoint)."""
    out = Path(out)
    aside = out.with_name(f".{out.name}.replaced")
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(out, aside)
    out.mkdir()
    shutil.rmtree(aside)


def run(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Call an entry point's `main`, turning a user error into `error: ...` and exit code 2."""
    try:
        return main(argv) or 0
    except USER_ERRORS as e:
        if os.environ.get("HFNANOCHAT_TRACEBACK") == "1":
            raise
        # under torchrun / accelerate every rank fails the same way: one message is enough
        if os.environ.get("RANK", "0") == "0":
            message = str(e) if not isinstance(e, OSError) or e.filename is None else f"{e.strerror}: {e.filename}"
            message = "; ".join(line.strip() for line in message.splitlines() if line.strip())  # one line
            print(f"error: {message}", file=sys.stderr)
        return 2


def main_entry(main: Callable) -> None:
    """`if __name__ == "__main__": main_entry(main)`."""
    sys.exit(run(main))
