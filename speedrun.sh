#!/usr/bin/env bash
# The whole pipeline in one command, on small real data, ending with a report card:
#
#   tokenizer (TinyStories subset) -> pretraining -> SFT (Alpaca subset + identity + arithmetic with calculator
#   calls) -> RL on arithmetic -> evaluation (bpb, OpenBookQA, ARC-Easy, ARC-Challenge validation, arithmetic)
#   -> export (fp32, int8) -> ./run answering a prompt in C -> report.md
#
#   bash speedrun.sh                                  # the 2-core CPU preset (about 15 minutes), downloads the data
#   bash speedrun.sh --data_dir=../shared/data        # the same from a local copy (offline)
#   PRESET=ci bash speedrun.sh --data_dir=../shared/data    # a few minutes, tiny model (the test suite runs it)
#   PRESET=gpu bash speedrun.sh                       # one GPU (NOT MEASURED: see the preset below)
#
# Options (arguments or environment variables):
#   PRESET / first argument     cpu (default) | ci | gpu
#   DATA_DIR / --data_dir=DIR   a local copy laid out like ../shared/data; empty = download from the official
#                               sources (cached in ~/.cache/nanollama, resumable)
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
        cpu|ci|gpu) PRESET=$arg ;;
        --data_dir=*) DATA_DIR=${arg#*=} ;;
        --run_dir=*) RUN_DIR=${arg#*=} ;;
        -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
        *) echo "error: unknown argument '$arg'; expected cpu, ci, gpu, --data_dir=DIR or --run_dir=DIR" >&2; exit 1 ;;
    esac
done

# ---------------------------------------------------------------------------------------------------------
# presets: every size and step count of the run
case $PRESET in
    ci)  # a few minutes on 2 cores, the size of a test: 512-token vocabulary, dim 64, tens of steps per stage
        TINYSTORIES_TRAIN_BYTES=400000; TINYSTORIES_VAL_BYTES=100000
        VOCAB_SIZE=512; TOKENIZER_CHARS=300000
        MODEL="--dim=64 --n_layers=2 --n_heads=4 --n_kv_heads=2"
        PRETRAIN="--block_size=128 --batch_size=16 --max_iters=60 --learning_rate=3e-3 --min_lr=3e-4 --warmup_iters=10
                  --eval_interval=20 --eval_iters=4 --log_interval=5"
        ALPACA_CONVERSATIONS=200; ARITH_PROBLEMS="--n_train 3000 --n_val 100 --n_test 200"
        SFT="--data=alpaca,identity:2,arith:2 --block_size=128 --batch_size=16 --max_iters=250 --learning_rate=3e-3
             --min_lr=3e-4 --warmup_iters=10 --eval_interval=50 --eval_iters=4 --log_interval=10"
        # a model this small rarely gets an answer right (a few %), so the reward also pays for the format
        # ('#### <number>' at the end): a signal RL can show rising in 30 steps
        RL="--max_iters=30 --num_prompts=16 --num_samples=8 --max_new_tokens=48 --learning_rate=3e-4 --warmup_iters=2
            --format_reward=1.0 --eval_interval=30 --eval_problems=50 --eval_samples=4"
        EVAL_LIMIT=50; ARITH_EVAL_LIMIT=50
        ;;
    cpu)  # the 2-core CPU preset: 14m16s end to end measured, at most 20 minutes (README has the figures)
        TINYSTORIES_TRAIN_BYTES=20000000; TINYSTORIES_VAL_BYTES=1000000
        VOCAB_SIZE=4096; TOKENIZER_CHARS=20000000
        MODEL="--dim=192 --n_layers=4 --n_heads=4"
        PRETRAIN="--block_size=256 --batch_size=16 --max_iters=300 --learning_rate=3e-3 --min_lr=3e-4 --warmup_iters=30
                  --eval_interval=50 --eval_iters=10 --log_interval=10"
        ALPACA_CONVERSATIONS=1000; ARITH_PROBLEMS="--n_train 10000 --n_val 200 --n_test 400"
        # SFT: arithmetic accuracy climbs steeply between 250 steps (~11%) and 1,000 (100%): at 450 it is ~73%,
        # enough right samples for RL to learn from (at 300 steps, ~10%, RL had too few and made it worse)
        SFT="--data=alpaca,identity:4,arith --block_size=256 --batch_size=16 --max_iters=450 --learning_rate=1e-3
             --min_lr=1e-4 --warmup_iters=20 --eval_interval=150 --eval_iters=10 --log_interval=10"
        # RL: learning rate at SFT's final rate (a tenth of its peak); sampling at temperature 0.7 keeps the
        # replies near the greedy ones the evaluation reads: measured from the same SFT model, greedy accuracy
        # 0.73 -> 0.80 in 60 steps at 0.7, but 0.73 -> 0.66 in 100 steps at 1.0 (and 3e-4 at 1.0: 0.61 -> 0.56)
        RL="--max_iters=100 --num_prompts=16 --num_samples=8 --max_new_tokens=64 --learning_rate=1e-4 --temperature=0.7
            --warmup_iters=5 --eval_interval=50 --eval_problems=400 --eval_samples=0"
        EVAL_LIMIT=0; ARITH_EVAL_LIMIT=400  # all 400 test problems: standard error ~2 points
        ;;
    gpu)  # one GPU. NOT MEASURED: no GPU was available when this preset was written. Expected: about 30 minutes
          # on one H100 for a 27M-parameter model on 200M TinyStories tokens (3,000 steps x 65K tokens), of which
          # the download (2.2 GB), tokenizer training and tokenizing take a good part.
        TINYSTORIES_TRAIN_BYTES=1000000000; TINYSTORIES_VAL_BYTES=22000000
        VOCAB_SIZE=8192; TOKENIZER_CHARS=100000000
        MODEL="--dim=512 --n_layers=8 --n_heads=8 --n_kv_heads=4 --compile=True"
        PRETRAIN="--block_size=512 --batch_size=64 --gradient_accumulation_steps=2 --max_iters=3000 --learning_rate=1e-3
                  --min_lr=1e-4 --warmup_iters=200 --eval_interval=500 --eval_iters=50 --log_interval=50"
        ALPACA_CONVERSATIONS=52000; ARITH_PROBLEMS="--n_train 20000 --n_val 500 --n_test 1000"
        SFT="--data=alpaca,identity:8,arith --block_size=512 --batch_size=32 --num_epochs=1 --learning_rate=3e-4
             --min_lr=3e-5 --warmup_iters=50 --eval_interval=200 --eval_iters=20 --log_interval=20"
        # RL at a tenth of SFT's learning rate, sampling at temperature 0.7 as the CPU preset (measured there)
        RL="--max_iters=300 --num_prompts=16 --num_samples=16 --max_new_tokens=64 --learning_rate=3e-5 --temperature=0.7
            --warmup_iters=10 --eval_interval=100 --eval_problems=1000 --eval_samples=8"
        EVAL_LIMIT=0; ARITH_EVAL_LIMIT=1000
        ;;
    *) echo "error: PRESET=$PRESET: expected cpu, ci or gpu" >&2; exit 1 ;;
esac
CHAT_PROMPTS=("Who are you?" "Mia has 4 bags with 6 shells in each bag. How many shells does Mia have?")

# ---------------------------------------------------------------------------------------------------------
# helpers: banners with the time so far, each command's output kept in logs/, each stage's time in stages.tsv
# (seconds from the start of its work, and wall-clock seconds including any wait for LOCK_FILE)
if [ -n "$DATA_DIR" ] && [ ! -d "$DATA_DIR" ]; then
    echo "error: --data_dir=$DATA_DIR is not a folder (expected a copy laid out like ../shared/data)" >&2
    exit 1
fi
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

source_arg() {  # --source DIR for the prepare/ scripts when a local copy is given, else nothing (download)
    if [ -n "$DATA_DIR" ]; then echo "--source $DATA_DIR${1:+/$1}"; fi
}

echo "speedrun: preset $PRESET, data from ${DATA_DIR:-the official sources (download)}, run folder $RUN_DIR"
printf 'preset=%s\ndata_dir=%s\nstarted=%s\n' "$PRESET" "${DATA_DIR:-download}" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" > "$RUN_DIR/run.txt"

# ---------------------------------------------------------------------------------------------------------
stage "1 tokenizer"
# a TinyStories subset: the first bytes of the train and val files, cut at a line break
heavy subset $PYTHON - "$DATA/raw" "${DATA_DIR:+$DATA_DIR/tinystories}" "$TINYSTORIES_TRAIN_BYTES" "$TINYSTORIES_VAL_BYTES" <<'EOF'
import os, sys
from prepare.tinystories import find_split_files
out, source, limits = sys.argv[1], sys.argv[2] or None, {"train": int(sys.argv[3]), "val": int(sys.argv[4])}
files = find_split_files(source)  # downloads the official files when source is None
os.makedirs(out, exist_ok=True)
for split, name in (("train", "train.txt"), ("val", "valid.txt")):
    if split not in files:
        continue
    with open(files[split][0], "rb") as f:
        data = f.read(limits[split])
    if len(data) == limits[split]:
        data = data[:data.rfind(b"\n") + 1]  # whole lines only
    with open(os.path.join(out, name), "wb") as f:
        f.write(data)
    print(f"{split}: {len(data):,} bytes of {files[split][0]} -> {out}/{name}")
EOF
heavy tokenizer $PYTHON prepare/tokenizer.py --source "$DATA/raw/train.txt" --vocab_size "$VOCAB_SIZE" \
    --max_chars "$TOKENIZER_CHARS" --out "$DATA/tokenizer.json"
TOKENIZER=$DATA/tokenizer.json

stage "2 pretraining"
heavy prepare_tinystories $PYTHON prepare/tinystories.py --source "$DATA/raw" --tokenizer "$TOKENIZER" --data_dir "$DATA"
# shellcheck disable=SC2086
heavy pretrain $PYTHON train.py --data_dir="$DATA" --data=tinystories --out_dir="$RUN_DIR/base" --overwrite=True \
    $MODEL $PRETRAIN
BASE=$(best_checkpoint "$RUN_DIR/base")

stage "3 sft"
# shellcheck disable=SC2046
heavy prepare_alpaca $PYTHON prepare/chat.py alpaca $(source_arg) --max_conversations "$ALPACA_CONVERSATIONS" \
    --tokenizer "$TOKENIZER" --data_dir "$DATA"
heavy prepare_identity $PYTHON prepare/chat.py identity --tokenizer "$TOKENIZER" --data_dir "$DATA"
# shellcheck disable=SC2086
heavy prepare_arith $PYTHON prepare/arithmetic.py --tokenizer "$TOKENIZER" --out "$DATA/arith" $ARITH_PROBLEMS
# shellcheck disable=SC2086
heavy sft $PYTHON train.py --init_from="$BASE" --data_dir="$DATA" --out_dir="$RUN_DIR/sft" --overwrite=True $SFT
SFT_CKPT=$(best_checkpoint "$RUN_DIR/sft")

stage "4 rl"
# shellcheck disable=SC2086
heavy rl $PYTHON rl.py --init_from="$SFT_CKPT" --task_dir="$DATA/arith" --out_dir="$RUN_DIR/rl" --overwrite=True $RL
RL_CKPT=$RUN_DIR/rl/ckpt.pt

stage "5 eval"
# shellcheck disable=SC2046
heavy prepare_tasks $PYTHON prepare/tasks.py --tasks openbookqa,arc_easy,arc_challenge $(source_arg) --out "$DATA/tasks"
# the arithmetic test problems, where eval.py looks for GSM8K-style problems (<task_dir>/gsm8k/<split>.jsonl)
mkdir -p "$DATA/arith_task/gsm8k"
cp "$DATA/arith/test.jsonl" "$DATA/arith_task/gsm8k/test.jsonl"
mkdir -p "$RUN_DIR/eval"
for name in base sft rl; do
    case $name in base) ckpt=$BASE ;; sft) ckpt=$SFT_CKPT ;; rl) ckpt=$RL_CKPT ;; esac
    # benchmarks: a base model by log-likelihood, a chat model by the letter it answers (eval.py picks the mode)
    heavy "eval_$name" $PYTHON eval.py --ckpt="$ckpt" --tasks=bpb,openbookqa,arc_easy,arc_challenge --split=val \
        --limit="$EVAL_LIMIT" --task_dir="$DATA/tasks" --data_dir="$DATA" --bpb_data=tinystories \
        --results_file="$RUN_DIR/eval/$name.json" --report=False
    # arithmetic, asked as a chat (even of the base model: it shows what SFT taught), calculator on
    heavy "eval_${name}_arith" $PYTHON eval.py --ckpt="$ckpt" --tasks=gsm8k --split=test --mode=chat \
        --limit="$ARITH_EVAL_LIMIT" --task_dir="$DATA/arith_task" --max_new_tokens=64 \
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
