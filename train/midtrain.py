"""Mid-training: `train/sft.py --mixture mid` (one script, two mixtures, as in nanochat). Same flags."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from sft import main  # noqa: E402

from hfnanochat.cli import run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run(main, ["--mixture", "mid", *sys.argv[1:]]))
