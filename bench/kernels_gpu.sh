#!/usr/bin/env bash
# One device call: the GPU kernel tests, `lowbit tune-kernels` (writes this GPU's kernel table), then the kernel
# table (ours with that table in force vs the default table vs fp16 cuBLAS vs tinygemm) on the ANCHORS shapes.
# Then, where asked (PROFILE_S, DECODE_S > 0): Nsight Compute on the decode-size launches (bench/profile_kernel.py)
# and decode through `generate` (bench/decode.py). Logs, the tuned table and the JSON land in $OUT; the speedup
# table is printed last.
#   bash bench/kernels_gpu.sh            (on the lent GPU machine, from the repository root)
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export LOWBIT_HOME=${LOWBIT_HOME:-/tmp/lowbit-home}  # the tuned table goes to $LOWBIT_HOME/kernels/<gpu>.json
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
if [ "${TEST_S:=150}" != 0 ]; then
  timeout "$TEST_S" python3 -m pytest -q -p no:cacheprovider tests/unit/kernels/test_kernel_table.py \
      tests/unit/kernels/test_triton_kernels.py -k "${TEST_K:-table or unpack4 or swap_ab or gemv or stream_k or cuda_graph or split_k or slabs or small}" \
      > "$OUT/gpu-tests.log" 2>&1
  echo "gpu tests: exit $? $(tail -1 "$OUT/gpu-tests.log")"
fi
if [ "${TUNE_S:=330}" != 0 ]; then
  timeout "$TUNE_S" python3 -m lowbit.kernels.tune ${TUNE_ARGS:-} > "$OUT/tune.log" 2>&1
  echo "tune: exit $?"; cp "$LOWBIT_HOME"/kernels/*.json "$OUT/" 2>/dev/null
  grep -E "M=|dropped|wrote" "$OUT/tune.log" | cut -c1-150 | tail -100
fi
if [ "${PROFILE_S:-0}" != 0 ]; then
  timeout "$PROFILE_S" ncu --profile-from-start off --clock-control none --section SpeedOfLight --section Occupancy \
      --section WarpStateStats --section SchedulerStats --section LaunchStats python3 bench/profile_kernel.py > "$OUT/profile.log" 2>&1
  echo "profile: exit $?"
  grep -E "^== |^  [a-z_0-9]+.*\(|Duration|DRAM Throughput|Memory Throughput|Compute \(SM\) Throughput|Registers Per|Achieved Occupancy|Issued Warp|No Eligible|Active Warps Per|Eligible Warps|Grid Size|Block Size" "$OUT/profile.log" | cut -c1-120
fi
if [ "${DECODE_S:-0}" != 0 ]; then
  timeout "$DECODE_S" python3 bench/decode.py --layers 32 --batches 1 8 --new-tokens 64 --kinds fp16 w4fused --time-limit $((DECODE_S - 15)) \
      > "$OUT/decode.log" 2>&1
  echo "decode: exit $?"; tail -6 "$OUT/decode.log"
fi
if [ "${TABLE_S:=200}" != 0 ]; then
  timeout "$TABLE_S" python3 bench/kernel_speed.py --shapes ${SHAPES:-4096x4096 4096x14336 8192x8192 8192x28672 28672x8192} \
      --ms ${MS:-1 4 16 64 256 1024 4096} > "$OUT/table.log" 2>&1
  echo "table: exit $?"; grep -A60 "speedup over fp16" "$OUT/table.log" || tail -30 "$OUT/table.log"
fi
