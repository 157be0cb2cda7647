#!/usr/bin/env bash
# Start-up time with Triton's cache empty, kernels compiled one at a time vs in parallel
# (model_executor/parallel_compile.py): two server starts on the same machine, each on its own empty
# TRITON_CACHE_DIR, serial first (so it also pays the cold OS file cache). Prints the seconds to
# /health and the scheduler's phase lines (carry the serving wheels: benchmark/serving_env.sh).
#   bash benchmark/startup_compile.sh [extra launch_server flags]
set -uo pipefail
source benchmark/serving_env.sh

FLAGS=("$@")
start() {  # name, one environment assignment for the server
  local name=$1 t
  t=$(date +%s)
  env TRITON_CACHE_DIR="$(mktemp -d)" "$2" python3 -m sglang.launch_server --model-path "$MODEL" \
    --load-format dummy --port "$PORT" "${FLAGS[@]}" >"$OUT/server_$name.log" 2>&1 &
  local server=$!
  python3 benchmark/wait_healthy.py "$PORT"
  echo "$name: ready after $(( $(date +%s) - t )) s"
  head -1 "$OUT/server_$name.log" | cut -c1-30 | sed 's/^/  first log line: /'
  tr '\r' '\n' <"$OUT/server_$name.log" | grep -E "KV cache \(|compiled the Triton|captured CUDA|Warming up prefill kernels: 100%" | cut -c1-150 | sed 's/^/  /'
  kill $server
  wait $server 2>/dev/null
}
start serial SGLANG_DISABLE_PARALLEL_COMPILE=1
start parallel SGLANG_DISABLE_PARALLEL_COMPILE=0
