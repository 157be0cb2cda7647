#!/usr/bin/env bash
# Retune the fused-MoE tiles on this GPU (tile groups included) and measure what the new tables do
# end to end, in one run on the GPU host (carry the serving wheels: benchmark/serving_env.sh):
#   1. bench_moe_nvfp4.py --tune: NVFP4 at M = 16, 64, 256 (decode batches) and bf16 at 4096, 8192
#      (prefill; NVFP4 experts run the bf16 kernels there), each writing a moe_configs.json;
#   2. the MoE tests with those tables in force (SGLANG_MOE_CONFIG_FILE), real shapes included;
#   3. gpu_serving.sh with the tuned tables, then with the built-in ones (the baseline, same machine).
#   bash benchmark/moe_retune_and_serve.sh        (results under $OUT)
set -uo pipefail
OUT=${OUT:-.}
export PYTHONPATH=$PWD/python
mkdir -p "$OUT/tune_nvfp4" "$OUT/tune_bf16" "$OUT/serve_tuned" "$OUT/serve_builtin"
nvidia-smi --query-gpu=name --format=csv,noheader

python3 benchmark/bench_moe_nvfp4.py --tune --formats nvfp4 --m 16 64 256 --ref-max-m 0 --workers 16 \
  --out "$OUT/tune_nvfp4" >"$OUT/tune_nvfp4.txt" 2>&1
python3 benchmark/bench_moe_nvfp4.py --tune --formats bf16 --m 4096 8192 --ref-max-m 0 --workers 16 \
  --out "$OUT/tune_bf16" >"$OUT/tune_bf16.txt" 2>&1
grep -hE "^tuned|^copy" "$OUT/tune_nvfp4.txt" "$OUT/tune_bf16.txt"
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
entries = []
for fmt in ("nvfp4", "bf16"):
    try:
        entries += json.load(open(f"{out}/tune_{fmt}/moe_configs.json"))
    except OSError:
        print(f"no tuned table for {fmt}")
json.dump(entries, open(f"{out}/moe_configs.json", "w"), indent=1)
PY

SGLANG_MOE_CONFIG_FILE="$OUT/moe_configs.json" python3 -m pytest -q test/srt/test_moe_triton.py >"$OUT/tests.txt" 2>&1
tail -1 "$OUT/tests.txt"

SGLANG_MOE_CONFIG_FILE="$OUT/moe_configs.json" OUT="$OUT/serve_tuned" bash benchmark/gpu_serving.sh >"$OUT/serve_tuned.txt" 2>&1
OUT="$OUT/serve_builtin" bash benchmark/gpu_serving.sh >"$OUT/serve_builtin.txt" 2>&1
python3 - "$OUT" <<'PY'
import json, os, sys
for tag in ("serve_tuned", "serve_builtin"):
    path = os.path.join(sys.argv[1], tag, "bench_serving.jsonl")
    if not os.path.exists(path):
        print(tag, "no results")
        continue
    for line in open(path):
        d = json.loads(line)
        print(f"{tag:13} conc {d['max_concurrency']:>2} range {d['random_range_ratio']}: {d['output_throughput']:7.1f} tok/s, "
              f"TTFT median {d['median_ttft_ms']:.1f} ms, ITL median {d['median_itl_ms']:.2f} ms")
PY
