#!/usr/bin/env bash
# The batch-1 GEMVs with more K steps in flight, on the GPU host (carry the serving wheels:
# benchmark/serving_env.sh). Before 2026-12-08 the NVFP4 MoE GEMV loaded one step ahead and the dense
# GEMV none; both now take the depth from their tiles' num_stages (1-3), untimed so far:
#   1. bench_moe_nvfp4.py --tune-gemv: NVFP4 GEMV tiles at M = 1 2 4 8, stages 1-3 in the sweep;
#   2. bench_gemv.py --tune: each dense shape of the batch-1 step, stages 1-3 in the sweep;
#   3. bench_gemv_step.py: the batch-1 decode step (graph replayed) with stages 2 and 3 on the built-in
#      tiles and with both sweeps' winners, against the built-in tiles before and after;
#   4. the MoE GEMV and dense GEMV GPU tests.
#   OUT=dir bash benchmark/gpu_gemv_stages.sh [moe] [dense] [step] [test]   (default: all four)
set -uo pipefail
source benchmark/serving_env.sh
STEPS=${*:-moe dense step test}
has() { [[ " $STEPS " == *" $1 "* ]]; }
mkdir -p "$OUT"
nvidia-smi --query-gpu=name --format=csv,noheader
if has moe; then
  python3 benchmark/bench_moe_nvfp4.py --tune-gemv --formats nvfp4 --m 1 2 4 8 --ref-max-m 0 --workers 16 \
    --out "$OUT/moe_gemv" >"$OUT/moe_gemv.txt" 2>&1
  grep -E "^copy|gemv:|^tuned gemv" "$OUT/moe_gemv.txt"
fi
if has dense; then
  timeout 400 python3 benchmark/bench_gemv.py --tune --json "$OUT/gemv.json" >"$OUT/gemv.txt" 2>&1
  grep -vE "config .* failed" "$OUT/gemv.txt" | tail -14
fi
if has step; then
  sweeps=()
  [ -f "$OUT/moe_gemv/bench_moe_nvfp4.json" ] && sweeps+=(--moe-sweep "$OUT/moe_gemv/bench_moe_nvfp4.json")
  [ -f "$OUT/gemv.json" ] && sweeps+=(--dense-sweep "$OUT/gemv.json")
  python3 benchmark/bench_gemv_step.py ${sweeps[@]+"${sweeps[@]}"} >"$OUT/step.txt" 2>&1
  grep -E "^batch|dummy weights" "$OUT/step.txt" || tail -5 "$OUT/step.txt"
fi
if has test; then
  timeout 300 python3 -m pytest -q test/srt/test_moe_triton.py test/srt/test_fused_small_ops.py -k "gemv or real_shapes" \
    >"$OUT/tests.txt" 2>&1
  tail -3 "$OUT/tests.txt"
fi
