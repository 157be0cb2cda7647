#!/usr/bin/env bash
# Everything issue 7 asks to be shown on the GPU host, in two device calls of under 10 minutes each.
#   bash benchmark/gpu_checklist.sh correctness   # GPU tests, whole-model accuracy with bf16 and fp8 KV
#   bash benchmark/gpu_checklist.sh performance   # serving workloads (default KV dtype: fp8 for the NVFP4
#                                                 # checkpoint), step profiles, scheduler host time, baseline
#   bash benchmark/gpu_checklist.sh mixed         # serving workloads with and without --enable-mixed-chunk
#   bash benchmark/gpu_checklist.sh moe-tune      # MoE tests + split-K tile sweep for M <= 64 (issue 5);
#                                                 # copy its `tuned ...` lines into configs.py
# Outputs land in $OUT (default .): logs, JSONL records, profile tables. `performance` needs the
# serving stack's wheels in .whl (see gpu_serving.sh).
set -uo pipefail
OUT=${OUT:-.}
export PYTHONPATH=$PWD/python:${PYTHONPATH:-} PYTHONUNBUFFERED=1
MODEL=${MODEL:-nvidia/Gemma-4-26B-A4B-NVFP4}

correctness() {
  timeout 400 python3 -m pytest -q -rf test/srt/test_scheduler.py test/srt/test_moe_triton.py test/srt/test_fused_small_ops.py \
    test/srt/test_cuda_graph_runner.py test/srt/test_swa_pool.py test/srt/test_triton_attention.py \
    test/srt/test_gemma4_nvfp4.py 2>&1 | tail -8
  for kv in bf16 fp8_e4m3; do
    timeout 120 python3 benchmark/check_model_accuracy.py --model-path "$MODEL" --load-format dummy \
      --prompt-len 1000 --decode-len 64 --kv-cache-dtype "$kv" 2>&1 | tail -3
  done
}

performance() {
  timeout 240 bash benchmark/gpu_serving.sh 2>&1 | tee "$OUT/serving_stdout.txt" |
    grep -E "ready after|Successful|Output token throughput|Median TTFT|P99 TTFT|Median ITL|Max ITL"
  for bs in 1 64; do
    timeout 100 python3 benchmark/profile_step.py --model-path "$MODEL" --load-format dummy --input-len 1000 \
      --batch-size "$bs" --cuda-graph-max-bs 64 --top 20 >"$OUT/profile_decode_bs$bs.txt" 2>&1
    grep -A24 "^decode" "$OUT/profile_decode_bs$bs.txt"
  done
  timeout 90 python3 benchmark/bench_scheduler_host.py --device cuda --batch-size 1 64 --gpu-step-us 3400 --steps 150 2>&1 | tail -6
  timeout 60 python3 benchmark/bench_gemv.py 2>&1 | tail -10
  timeout 150 python3 benchmark/bench_transformers_baseline.py 2>&1 | tail -1
}

mixed() {
  for flags in "" "--enable-mixed-chunk"; do
    echo "== serving ${flags:-(defaults)}"
    timeout 280 bash benchmark/gpu_serving.sh $flags 2>&1 |
      grep -E "ready after|Output token throughput|Median TTFT|P99 TTFT|Median ITL|Max ITL"
  done
}

moe_tune() {
  timeout 200 python3 -m pytest -x -q test/srt/test_moe_triton.py 2>&1 | tail -5
  timeout 360 python3 benchmark/bench_moe_nvfp4.py --tune --m 1 4 16 64 --workers 16 --out "$OUT"
}

case "${1:-}" in
  correctness) correctness ;;
  performance) performance ;;
  mixed) mixed ;;
  moe-tune) moe_tune ;;
  *) echo "usage: $0 correctness|performance|mixed|moe-tune" >&2; exit 2 ;;
esac
