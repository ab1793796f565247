#!/usr/bin/env bash
# The whole loop that exists so far: tokenizer, then pretraining.
#  - with CUDA GPUs and Hub access: the seed's d20 recipe on FineWeb-EDU on all local GPUs (the $100 run on 8xH100)
#  - otherwise (a laptop, CI, an offline machine): the `tiny` preset on a corpus built from Python's docstrings
# Override the output folder with OUT=..., the depth preset with PRESET=d26 etc.
set -euo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-out}
PRESET=${PRESET:-d20}
mkdir -p "$OUT"

have_gpu=$(python -c "import torch; print(torch.cuda.device_count())")
have_hub=$(python - <<'PY'
import os
if os.environ.get("HF_HUB_OFFLINE") == "1":
    print(0)
else:
    try:
        from huggingface_hub import HfApi
        HfApi().dataset_info("HuggingFaceFW/fineweb-edu", timeout=10)
        print(1)
    except Exception:
        print(0)
PY
)

if [ "$have_gpu" -gt 0 ] && [ "$have_hub" = 1 ]; then
    echo "== $have_gpu GPU(s) and the Hub are reachable: preset $PRESET on FineWeb-EDU"
    # ~2B characters of FineWeb-EDU for the 65,536-token tokenizer, as the seed's speedrun does
    python train/tokenizer.py --data HuggingFaceFW/fineweb-edu --data-config sample-10BT \
        --max-chars 2000000000 --vocab-size 65536 --out "$OUT/tokenizer"
    multi=""; [ "$have_gpu" -gt 1 ] && multi="--multi_gpu"
    accelerate launch $multi --num_processes "$have_gpu" --mixed_precision bf16 train/pretrain.py \
        --preset "$PRESET" --tokenizer "$OUT/tokenizer" --out "$OUT/pretrain"
else
    echo "== no GPU or no Hub access: offline tiny preset (a smoke run, not a useful model)"
    export HF_HUB_OFFLINE=1
    python -m hfnanochat.training.offline_data "$OUT/offline_corpus.txt"
    python train/tokenizer.py --data "$OUT/offline_corpus.txt" --vocab-size 4096 --out "$OUT/tokenizer"
    accelerate launch --cpu --num_processes 1 --mixed_precision no train/pretrain.py \
        --preset tiny --data "$OUT/offline_corpus.txt" --tokenizer "$OUT/tokenizer" --out "$OUT/pretrain"
fi
echo "== done: the base model is in $OUT/pretrain/final (metrics in $OUT/pretrain/metrics.jsonl)"
