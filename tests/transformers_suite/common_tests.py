"""transformers' own common model tests, for the installed transformers version.

The test files are not part of the transformers wheel; they ship in its source distribution. `load()` downloads the
sdist of the installed version once (`pip download --no-binary :all:`), keeps its `tests/*_common.py` files under
`~/.cache/hfnanochat/transformers-tests/<version>/` (or `$HFNANOCHAT_CACHE`), and imports them as the package
`transformers_common_tests`. A failed fetch raises `Unavailable` with the reason, which the test module turns into a
skip.

The sdist leaves out two modules that `test_modeling_common.py` imports: `tests/exporters/test_export.py` and
`tests/generation/test_utils.py`. Their mixins hold tests that are not distributed, so we write empty mixins of the
same names in their place (the generation contract has our own tests: tests/test_generation_contract.py). With an
empty `GenerationTesterMixin`, a tester declares no generative classes (see `test_hfnanochat_common.py`).
"""

import importlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import transformers

PACKAGE = "transformers_common_tests"
COMMON_FILES = ("test_modeling_common.py", "test_configuration_common.py")
MISSING_MIXINS = {
    "exporters/test_export.py": "ExportTesterMixin",
    "generation/test_utils.py": "GenerationTesterMixin",
}
# Also missing from the sdist: tests/utils/test_configuration_utils.py, whose `config_common_kwargs` the ConfigTester
# sets on a config and reads back. Ours: PreTrainedConfig's common arguments, each away from its default.
CONFIG_COMMON_KWARGS = """config_common_kwargs = {
    "return_dict": False,
    "output_hidden_states": True,
    "output_attentions": True,
    "dtype": "float16",
    "chunk_size_feed_forward": 5,
    "is_encoder_decoder": True,
    "architectures": ["BertModel"],
    "id2label": {0: "label"},
    "label2id": {"label": "0"},
    "problem_type": "regression",
    "bos_token_id": 3,
    "eos_token_id": 4,
    "pad_token_id": 5,
    "tie_word_embeddings": True,
}
"""


class Unavailable(RuntimeError):
    """The common test files could not be fetched or imported."""


def cache_dir() -> Path:
    root = os.environ.get("HFNANOCHAT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / (
        "hfnanochat"
    )
    return Path(root) / "transformers-tests" / transformers.__version__


def _fetch(version: str, dest: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", f"transformers=={version}", "--no-binary", ":all:"]
        cmd += ["--no-deps", "--quiet", "-d", tmp]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise Unavailable(f"pip download of the transformers {version} sdist failed: {e}") from e
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise Unavailable(f"pip download of the transformers {version} sdist failed: {tail[0]}")
        archives = list(Path(tmp).glob("transformers-*.tar.gz"))
        if not archives:
            raise Unavailable(f"pip download gave no transformers {version} sdist")
        staging = Path(tmp) / PACKAGE
        staging.mkdir()
        with tarfile.open(archives[0]) as tar:
            members = {m.name.split("/", 1)[-1]: m for m in tar.getmembers() if m.isfile()}
            for name in COMMON_FILES:
                member = members.get(f"tests/{name}")
                if member is None:
                    raise Unavailable(f"the transformers {version} sdist has no tests/{name}")
                (staging / name).write_bytes(tar.extractfile(member).read())
        (staging / "__init__.py").write_text("")
        for path, mixin in MISSING_MIXINS.items():
            module = staging / path
            module.parent.mkdir(exist_ok=True)
            (module.parent / "__init__.py").write_text("")
            module.write_text(
                f'"""Not in the transformers sdist: an empty {mixin}, so test_modeling_common imports."""\n\n\n'
                f"class {mixin}:\n    pass\n"
            )
        (staging / "utils").mkdir()
        (staging / "utils" / "__init__.py").write_text("")
        (staging / "utils" / "test_configuration_utils.py").write_text(CONFIG_COMMON_KWARGS)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():  # a concurrent fetch finished first
            return
        shutil.move(str(staging), str(dest))


def load():
    """(test_modeling_common, test_configuration_common) of the installed transformers."""
    root = cache_dir()
    if not (root / PACKAGE / COMMON_FILES[0]).exists():
        _fetch(transformers.__version__, root / PACKAGE)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        modeling = importlib.import_module(f"{PACKAGE}.test_modeling_common")
        configuration = importlib.import_module(f"{PACKAGE}.test_configuration_common")
    except ImportError as e:
        raise Unavailable(f"transformers' common tests do not import: {e}") from e
    return modeling, configuration
