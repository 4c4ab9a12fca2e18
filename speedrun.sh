#!/usr/bin/env bash
# The whole pipeline in one command, on small real data, ending with a report card:
#
#   tokenizer (TinyStories) -> pretraining -> SFT (Alpaca subset + identity + arithmetic with calculator calls)
#   -> RL on arithmetic -> evaluation (bpb, OpenBookQA, ARC-Easy, ARC-Challenge validation, arithmetic)
#   -> export (fp32, int8) -> ./run answering a prompt in C -> report.md
#
#   bash speedrun.sh                              # the 2-core CPU preset on the repository's sample (offline)
#   PRESET=ci bash speedrun.sh                    # a few minutes, tiny model (the test suite runs it)
#   bash speedrun.sh --data_dir=download          # the CPU preset on the official datasets (fetches ~22 MB)
#   bash speedrun.sh --data_dir=path/to/copy      # a local copy laid out like prepare/sample
#   PRESET=gpu bash speedrun.sh                   # one GPU (NOT MEASURED), on downloaded data
#
# Every size and step count of a preset is in its config files, config/speedrun/<preset>/, one per command in
# pipeline order (tokenizer.py, tinystories.py, pretrain.py, alpaca.py, arithmetic.py, sft.py, rl.py, eval.py);
# this script only calls the stages. To make your own preset, copy a folder: PRESET=mine reads
# config/speedrun/mine/.
#
# Options (arguments or environment variables):
#   PRESET / first argument     cpu (default) | ci | gpu | any other folder of config/speedrun/
#   DATA_DIR / --data_dir=DIR   where the data comes from: 'sample' (prepare/sample, in the repository: the
#                               default of the cpu and ci presets), 'download' (the official sources, only the
#                               part a preset uses, cached in ~/.cache/nanollama, resumable: the default of the
#                               gpu preset, which needs more text than the sample has) or a local copy laid out
#                               like prepare/sample
#   RUN_DIR / --run_dir=DIR     where everything goes (default runs/<date-time>); report.md is written there
#   PYTHON                      the python to use (default python)
#   LOCK_FILE                   on a machine shared with others: hold this flock(1) lock during each stage,
#                               e.g. LOCK_FILE=/tmp/cpu.lock (the times reported leave out the waits for it)
#
# Each stage prints a banner with its name and the time so far; its output is also kept in RUN_DIR/logs/.
set -euo pipefail
cd "$(dirname "$0")"

PRESET=${PRESET:-cpu}
DATA_DIR=${DATA_DIR:-}
RUN_DIR=${RUN_DIR:-runs/$(date +%Y%m%d-%H%M%S)}
PYTHON=${PYTHON:-python}
LOCK_FILE=${LOCK_FILE:-}
for arg in "$@"; do
    case $arg in
        --data_dir=*) DATA_DIR=${arg#*=} ;;
        --run_dir=*) RUN_DIR=${arg#*=} ;;
        -h|--help) sed -n '2,31p' "$0"; exit 0 ;;
        *)
            if [ -d "config/speedrun/$arg" ] && [ -n "$arg" ]; then
                PRESET=$arg
            else
                echo "error: unknown argument '$arg'; expected a preset (cpu, ci, gpu: the folders of" \
                    "config/speedrun/), --data_dir=sample|download|DIR or --run_dir=DIR" >&2
                exit 1
            fi ;;
    esac
done
CONFIG=config/speedrun/$PRESET  # the preset's config files
if [ ! -d "$CONFIG" ]; then
    echo "error: PRESET=$PRESET: no folder $CONFIG (expected cpu, ci, gpu or another folder of" \
        "config/speedrun/)" >&2
    exit 1
fi
if [ -z "$DATA_DIR" ]; then
    # the gpu preset reads 1 GB of TinyStories: only a download has that much (the sample holds 1.8 MB)
    if [ "$PRESET" = gpu ]; then DATA_DIR=download; else DATA_DIR=sample; fi
fi
if [ "$DATA_DIR" = sample ]; then DATA_DIR=prepare/sample; fi
if [ "$DATA_DIR" != download ] && [ ! -d "$DATA_DIR" ]; then
    echo "error: --data_dir=$DATA_DIR is not a folder (expected 'sample', 'download' or a copy laid out like" \
        "prepare/sample)" >&2
    exit 1
fi
CHAT_PROMPTS=("Who are you?" "Mia has 4 bags with 6 shells in each bag. How many shells does Mia have?")

# ---------------------------------------------------------------------------------------------------------
# helpers: banners with the time so far, each command's output kept in logs/, each stage's time in stages.tsv
# (seconds from the start of its work, and wall-clock seconds including any wait for LOCK_FILE)
export PYTHONUNBUFFERED=1  # stage output appears as it happens, through tee
DATA=$RUN_DIR/data
mkdir -p "$RUN_DIR/logs" "$DATA"
: > "$RUN_DIR/stages.tsv"
T_START=$(date +%s)
STAGE=""
STAGE_START=$T_START
WORK_START=$T_START

elapsed() { local s=$(( $(date +%s) - $1 )); printf '%dm%02ds' $((s / 60)) $((s % 60)); }

stage() {  # stage <name>: close the previous stage, open this one
    end_stage
    STAGE=$1
    STAGE_START=$(date +%s)
    echo
    echo "=== [$STAGE] (run started $(elapsed "$T_START") ago) ==="
    if [ -n "$LOCK_FILE" ]; then
        echo "(waiting for $LOCK_FILE)"
        exec 9>>"$LOCK_FILE"
        flock 9
    fi
    WORK_START=$(date +%s)
}

end_stage() {
    if [ -n "$STAGE" ]; then
        printf '%s\t%d\t%d\n' "$STAGE" $(( $(date +%s) - WORK_START )) $(( $(date +%s) - STAGE_START )) \
            >> "$RUN_DIR/stages.tsv"
        echo "--- $STAGE done in $(elapsed "$WORK_START")"
        if [ -n "$LOCK_FILE" ]; then exec 9>&-; fi  # closing the file releases the lock
    fi
    STAGE=""
}

heavy() {  # heavy <log name> <command...>: run a command, its output to the screen and appended to logs/<name>.log
    local log=$RUN_DIR/logs/$1.log
    shift
    "$@" 2>&1 | tee -a "$log"
}

best_checkpoint() {  # the lowest-val-loss checkpoint of a run folder, else its latest
    if [ -f "$1/best.pt" ]; then echo "$1/best.pt"; else echo "$1/ckpt.pt"; fi
}

source_arg() {  # --source=DIR for the prepare/ scripts reading a folder, else nothing (they download)
    if [ "$DATA_DIR" != download ]; then echo "--source=$DATA_DIR${1:+/$1}"; fi
}

echo "speedrun: preset $PRESET, data from $DATA_DIR, run folder $RUN_DIR"
printf 'preset=%s\ndata_dir=%s\nstarted=%s\n' "$PRESET" "$DATA_DIR" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" > "$RUN_DIR/run.txt"

# ---------------------------------------------------------------------------------------------------------
stage "1 tokenizer"
# on the start of TinyStories train: the folder's file, or the official file (only the start that is read)
TINYSTORIES_TRAIN=tinystories
if [ "$DATA_DIR" != download ]; then TINYSTORIES_TRAIN=$DATA_DIR/tinystories/tiny_stories.txt; fi
heavy tokenizer $PYTHON prepare/tokenizer.py "$CONFIG/tokenizer.py" "$TINYSTORIES_TRAIN" \
    --out="$DATA/tokenizer.json"
TOKENIZER=$DATA/tokenizer.json

stage "2 pretraining"
# shellcheck disable=SC2046
heavy prepare_tinystories $PYTHON prepare/tinystories.py "$CONFIG/tinystories.py" $(source_arg tinystories) \
    --tokenizer="$TOKENIZER" --data_dir="$DATA"
heavy pretrain $PYTHON train.py "$CONFIG/pretrain.py" --data_dir="$DATA" --out_dir="$RUN_DIR/base" \
    --overwrite=True
BASE=$(best_checkpoint "$RUN_DIR/base")

stage "3 sft"
# shellcheck disable=SC2046
heavy prepare_alpaca $PYTHON prepare/chat.py alpaca "$CONFIG/alpaca.py" $(source_arg) --tokenizer="$TOKENIZER" \
    --data_dir="$DATA"
heavy prepare_identity $PYTHON prepare/chat.py identity --tokenizer="$TOKENIZER" --data_dir="$DATA"
heavy prepare_arith $PYTHON prepare/arithmetic.py "$CONFIG/arithmetic.py" --tokenizer="$TOKENIZER" \
    --out="$DATA/arith"
heavy sft $PYTHON train.py "$CONFIG/sft.py" --init_from="$BASE" --data_dir="$DATA" --out_dir="$RUN_DIR/sft" \
    --overwrite=True
SFT_CKPT=$(best_checkpoint "$RUN_DIR/sft")

stage "4 rl"
heavy rl $PYTHON rl.py "$CONFIG/rl.py" --init_from="$SFT_CKPT" --task_dir="$DATA/arith" \
    --out_dir="$RUN_DIR/rl" --overwrite=True
RL_CKPT=$RUN_DIR/rl/ckpt.pt

stage "5 eval"
# shellcheck disable=SC2046
heavy prepare_tasks $PYTHON prepare/tasks.py --tasks=openbookqa,arc_easy,arc_challenge $(source_arg) \
    --out="$DATA/tasks"
# the arithmetic test problems, where eval.py looks for GSM8K-style problems (<task_dir>/gsm8k/<split>.jsonl)
mkdir -p "$DATA/arith_task/gsm8k"
cp "$DATA/arith/test.jsonl" "$DATA/arith_task/gsm8k/test.jsonl"
mkdir -p "$RUN_DIR/eval"
for name in base sft rl; do
    case $name in base) ckpt=$BASE ;; sft) ckpt=$SFT_CKPT ;; rl) ckpt=$RL_CKPT ;; esac
    # benchmarks: a base model by log-likelihood, a chat model by the letter it answers (eval.py picks the mode)
    heavy "eval_$name" $PYTHON eval.py "$CONFIG/eval.py" --ckpt="$ckpt" \
        --tasks=bpb,openbookqa,arc_easy,arc_challenge --split=val --task_dir="$DATA/tasks" --data_dir="$DATA" \
        --bpb_data=tinystories --results_file="$RUN_DIR/eval/$name.json" --report=False
    # arithmetic, asked as a chat (even of the base model: it shows what SFT taught), calculator on
    heavy "eval_${name}_arith" $PYTHON eval.py "$CONFIG/eval.py" --ckpt="$ckpt" --tasks=gsm8k --split=test \
        --mode=chat --task_dir="$DATA/arith_task" --max_new_tokens=64 \
        --results_file="$RUN_DIR/eval/${name}_arith.json" --report=False
done

stage "6 export"
mkdir -p "$RUN_DIR/export"
heavy export_fp32 $PYTHON export.py --ckpt="$RL_CKPT" --out="$RUN_DIR/export/model.bin" \
    --tokenizer_out="$RUN_DIR/export/tokenizer.bin"
heavy export_int8 $PYTHON export.py --ckpt="$RL_CKPT" --quantize=int8 --out="$RUN_DIR/export/model_int8.bin" \
    --tokenizer_out=""

stage "7 run"
# the flags of the Makefile's `run` target, built into the run folder so that parallel runs do not collide
heavy build_run "${CC:-cc}" -O3 -fopenmp-simd -o "$RUN_DIR/export/run" run.c -lm
for model in model.bin model_int8.bin; do
    for prompt in "${CHAT_PROMPTS[@]}"; do
        echo "## $model: $prompt" | tee -a "$RUN_DIR/logs/run_c.log"
        heavy run_c "$RUN_DIR/export/run" "$RUN_DIR/export/$model" -z "$RUN_DIR/export/tokenizer.bin" -m chat \
            -t 0 -n 64 -i "$prompt" < /dev/null
    done
done
end_stage

# ---------------------------------------------------------------------------------------------------------
$PYTHON report.py "$RUN_DIR"
echo
echo "speedrun done in $(elapsed "$T_START"): $RUN_DIR/report.md"
