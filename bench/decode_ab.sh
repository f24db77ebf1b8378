#!/usr/bin/env bash
# Same-call decode A/B: fp16 once, then each DECODE_PICK variant (bench/decode.py's use_pick) twice,
# interleaved, each in its own process (generate's compiled graphs are cached per model).
#   bash bench/decode_ab.sh new 3launch        (on the lent GPU machine, from the repository root)
#   DECODE_BATCHES="32 64" DECODE_ROUNDS=1 bash bench/decode_ab.sh new default
# Logs in $OUT/decode-ab.log; the tokens/s lines are printed last.
set -u
export PYTHONPATH=src
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
LOG="$OUT/decode-ab.log"
ARGS="--layers 32 --batches ${DECODE_BATCHES:-1 8} --new-tokens 64 --time-limit ${DECODE_LIMIT_S:-105}"
echo "== fp16" >> "$LOG"
python3 bench/decode.py $ARGS --kinds fp16 >> "$LOG" 2>&1
for round in $(seq "${DECODE_ROUNDS:-2}"); do
    for v in "$@"; do
        echo "== DECODE_PICK=$v round $round" >> "$LOG"
        DECODE_PICK=$v python3 bench/decode.py $ARGS --kinds w4fused >> "$LOG" 2>&1
    done
done
grep -E "^== |tokens/s|block linears" "$LOG"
