"""Write the local files that the lm-eval tasks in eval/tasks/ read, so lm_eval runs offline afterwards.

    python eval/lm_eval_data.py                    # from the Hub, into data/lm_eval/
    python eval/lm_eval_data.py --data-dir data    # from local copies (the layout of eval/chat_eval.py --data-dir)

Writes data/lm_eval/{arc_easy,arc_challenge}/{train,test}.jsonl, mmlu/{dev,test}.jsonl, gsm8k/{train,test}.jsonl:
the Hub rows unchanged, one JSON object a line. The task YAMLs name these paths relative to the directory lm_eval
runs in (the repository root).
"""

import argparse
import sys
from pathlib import Path

from hfnanochat.tasks import load_split

# folder under --out: (Hub id, config, name under --data-dir, splits)
SETS = {
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy", "ai2_arc", ("train", "test")),
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge", "ai2_arc", ("train", "test")),
    "mmlu": ("cais/mmlu", "all", "mmlu", ("dev", "test")),
    "gsm8k": ("openai/gsm8k", "main", "gsm8k", ("train", "test")),
}

p = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
)
p.add_argument("--out", default="data/lm_eval", help="where the task YAMLs look (relative to the repository root)")
p.add_argument("--data-dir", default=None, help="read local copies from here instead of the Hub")
p.add_argument("--only", default=",".join(SETS), help="comma-separated, among: " + ", ".join(SETS))
args = p.parse_args()

names = [n.strip() for n in args.only.split(",") if n.strip()]
unknown = [n for n in names if n not in SETS]
if unknown:
    sys.stderr.write(f"error: unknown data set(s) {unknown} (known: {', '.join(SETS)})\n")
    sys.exit(2)
failed = False
for name in names:
    hub_id, config, local_name, splits = SETS[name]
    source = str(Path(args.data_dir) / local_name) if args.data_dir else hub_id
    for split in splits:
        try:
            rows = load_split(source, split, config)
        except (ValueError, OSError) as e:
            sys.stderr.write(f"error: {name}/{split}: {e}\n")
            failed = True
            continue
        path = Path(args.out) / name / f"{split}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        rows.to_json(path, lines=True, force_ascii=False)
        print(f"{path}: {len(rows):,} rows")
sys.exit(2 if failed else 0)
