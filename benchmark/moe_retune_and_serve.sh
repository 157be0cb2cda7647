#!/usr/bin/env bash
# Retune the fused-MoE tiles on this GPU (tile groups included) and measure what the new tables do
# end to end, on the GPU host (carry the serving wheels: benchmark/serving_env.sh):
#   1. bench_moe_nvfp4.py --tune: NVFP4 at M = 16, 64, 256 (decode batches) and bf16 at 4096, 8192
#      (prefill; NVFP4 experts run the bf16 kernels there), merged into $OUT/moe_configs.json;
#   2. gpu_serving.sh with those tables (SGLANG_MOE_CONFIG_FILE), then with the built-in ones (the
#      baseline, same machine), and both side by side;
#   3. (only when named) the MoE tests with the tuned tables in force, real shapes included
#      (PYTEST_K selects some, TEST_TIMEOUT bounds them).
#   bash benchmark/moe_retune_and_serve.sh [tune] [serve] [test]    (default: tune serve; results under $OUT)
# $OUT gets the logs, the sweeps' JSON, the merged table and one bench_serving file per table (7 files);
# server logs stay under /tmp/moe_retune.
set -uo pipefail
OUT=${OUT:-.}
WORK=/tmp/moe_retune
STAGES=${*:-tune serve}
export PYTHONPATH=$PWD/python PYTHONUNBUFFERED=1
mkdir -p "$OUT" "$WORK"
nvidia-smi --query-gpu=name --format=csv,noheader
has() { [[ " $STAGES " == *" $1 "* ]]; }

tune() {  # format, M list...
  local fmt=$1; shift
  python3 benchmark/bench_moe_nvfp4.py --tune --formats "$fmt" --m "$@" --ref-max-m 0 --workers 16 \
    --out "$WORK/tune_$fmt" >"$OUT/tune_$fmt.txt" 2>&1
  cp "$WORK/tune_$fmt/bench_moe_nvfp4.json" "$OUT/tune_$fmt.json" 2>/dev/null
}
if has tune; then
  tune nvfp4 16 64 256
  tune bf16 4096 8192
  grep -hE "^tuned|^copy|^nvfp4 |^bf16 " "$OUT/tune_nvfp4.txt" "$OUT/tune_bf16.txt"
  python3 - "$WORK" "$OUT/moe_configs.json" <<'PY'
import json, sys
work, path = sys.argv[1:]
entries = []
for fmt in ("nvfp4", "bf16"):
    try:
        entries += json.load(open(f"{work}/tune_{fmt}/moe_configs.json"))
    except OSError:
        print(f"no tuned table for {fmt}")
json.dump(entries, open(path, "w"), indent=1)
print(json.dumps(entries))
PY
fi
CONFIG=${SGLANG_MOE_CONFIG_FILE:-$OUT/moe_configs.json}

if has serve; then
  for tag in ${SERVE_ORDER:-tuned builtin}; do  # the first server runs on a cold Triton cache
    mkdir -p "$WORK/serve_$tag"
    if [ "$tag" = tuned ]; then cfg=$CONFIG; else cfg=; fi
    SGLANG_MOE_CONFIG_FILE=$cfg OUT="$WORK/serve_$tag" timeout 240 bash benchmark/gpu_serving.sh >"$WORK/serve_$tag.txt" 2>&1
    grep -hE "server ready|after warm-up|no kernel variant" "$WORK/serve_$tag.txt"
    cp "$WORK/serve_$tag/bench_serving.jsonl" "$OUT/serve_$tag.jsonl" 2>/dev/null || tail -5 "$WORK/serve_$tag.txt"
  done
  python3 - "$OUT" <<'PY'
import json, os, sys
for tag in ("tuned", "builtin"):
    path = os.path.join(sys.argv[1], f"serve_{tag}.jsonl")
    if not os.path.exists(path):
        print(tag, "no results")
        continue
    for line in open(path):
        d = json.loads(line)
        print(f"{tag:8} conc {d['max_concurrency']:>2} in {d['random_input_len']} range {d['random_range_ratio']}: "
              f"{d['output_throughput']:7.1f} tok/s, TTFT median {d['median_ttft_ms']:.1f} ms, "
              f"ITL median {d['median_itl_ms']:.2f} ms")
PY
fi

if has test; then
  SGLANG_MOE_CONFIG_FILE=$CONFIG timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q test/srt/test_moe_triton.py ${PYTEST_K:+-k "$PYTEST_K"} >"$OUT/tests.txt" 2>&1
  tail -3 "$OUT/tests.txt"
fi
