#!/usr/bin/env bash
# Issue 7's end-to-end workloads on the GPU host: serve the real 26B-A4B config with dummy weights
# and run bench_serving at concurrency 1 and 64 (carry the serving wheels: benchmark/serving_env.sh).
#   [RUNS="c1 c64 c1r0 c64r0 ttft"] bash benchmark/gpu_serving.sh [extra launch_server flags]   (results appended to $OUT)
set -euo pipefail
source benchmark/serving_env.sh

start=$(date +%s)
python3 -m sglang.launch_server --model-path "$MODEL" --load-format dummy --port "$PORT" "$@" >"$OUT/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null' EXIT
python3 benchmark/wait_healthy.py "$PORT"
echo "server ready after $(( $(date +%s) - start )) s"

bench() {
  python3 -m sglang.bench_serving --backend sglang --port "$PORT" --dataset-name random \
    --random-input-len 1000 --random-output-len 250 --random-range-ratio 1 --disable-tqdm \
    --output-file "$OUT/bench_serving.jsonl" "$@"
}
for run in ${RUNS:-c1 c64 c1r0 c64r0 ttft}; do
  case $run in
    c1) bench --num-prompts 10 --max-concurrency 1 ;;
    c64) bench --num-prompts 256 --max-concurrency 64 ;;
    # The command as written: SGLang's default --random-range-ratio 0 draws each length from [1, len].
    c1r0) bench --num-prompts 10 --max-concurrency 1 --random-range-ratio 0 ;;
    c64r0) bench --num-prompts 256 --max-concurrency 64 --random-range-ratio 0 ;;
    ttft) bench --num-prompts 5 --max-concurrency 1 --random-output-len 1 ;;  # TTFT of a lone 1000-token prompt
    *) echo "unknown run $run (c1 c64 c1r0 c64r0 ttft)" >&2; exit 2 ;;
  esac
done
# Kernel variants the warm-up missed (model_executor/compile_watch.py): each one stalled a step.
grep -h "after warm-up" "$OUT/server.log" | cut -c1-400 || echo "no kernel variant first met after warm-up"
