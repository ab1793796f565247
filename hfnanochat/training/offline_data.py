"""An offline English corpus for machines without internet: the documentation that ships inside Python itself.

The tiny preset must run on a fresh machine with no Hub access and no downloaded data. Every Python installation
carries a few MB of real English prose in its standard library's docstrings; we collect them as documents (one per
module, class or function with a substantial docstring), which is enough to train a small tokenizer and watch a
depth-4 model's loss fall. It is not FineWeb: use `--data` with real data for anything you want to keep.

    python -m hfnanochat.training.offline_data out/offline_corpus.txt
"""

import importlib
import inspect
import pkgutil
import sys
import warnings
from pathlib import Path

# modules whose import has side effects (GUI, tests, interpreter internals) or is slow
SKIP_PREFIXES = (
    "test",
    "idlelib",
    "tkinter",
    "turtle",
    "antigravity",
    "this",
    "lib2to3",
    "ensurepip",
    "venv",
    "pydoc_data",
    "__",
    "_",
    "xxsubtype",
    "multiprocessing.popen",
    "asyncio.__main__",
    "sre_",
)
MIN_DOC_CHARS = 200  # shorter docstrings are mostly signatures, not prose


def _docstrings(module):
    seen = set()
    for obj in [module, *(v for _, v in inspect.getmembers(module))]:
        doc = inspect.getdoc(obj) if (inspect.ismodule(obj) or inspect.isclass(obj) or inspect.isroutine(obj)) else None
        if doc and len(doc) >= MIN_DOC_CHARS and doc not in seen:
            seen.add(doc)
            yield doc


def stdlib_documents():
    """Yield documentation texts from the standard library, in a deterministic order."""
    names = sorted(set(sys.stdlib_module_names))
    for name in names:
        if name.startswith(SKIP_PREFIXES):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = importlib.import_module(name)
        except Exception:  # platform-specific modules (winreg, msvcrt, ...) simply aren't there
            continue
        yield from _docstrings(module)
        for info in sorted(pkgutil.iter_modules(getattr(module, "__path__", []) or []), key=lambda m: m.name):
            sub = f"{name}.{info.name}"
            if info.name.startswith(("_", "test")) or sub.startswith(SKIP_PREFIXES):
                continue
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    yield from _docstrings(importlib.import_module(sub))
            except Exception:
                continue


def write_offline_corpus(path: str | Path, max_chars: int = 20_000_000) -> Path:
    """Write the documents to a .txt file, separated by blank lines (the paragraph format `training.data` reads)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    total = 0
    with open(path, "w", encoding="utf-8") as f:
        for doc in stdlib_documents():
            # blank lines inside a docstring would split it into several documents; keep it whole
            text = "\n".join(line for line in doc.splitlines() if line.strip())
            f.write(text + "\n\n")
            total += len(text)
            if total >= max_chars:
                break
    if total == 0:
        raise RuntimeError("found no documentation in this Python installation (was it stripped with -OO?)")
    return path


if __name__ == "__main__":
    out = write_offline_corpus(sys.argv[1] if len(sys.argv) > 1 else "out/offline_corpus.txt")
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB of Python's own documentation)")
