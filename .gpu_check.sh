set -x
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)"
python3 -c "import zmq, fastapi, uvicorn; print('server deps ok')" || echo "no server deps"
export OMP_NUM_THREADS=4
timeout 300 python3 .gpu_sched_check.py 2>&1 | tail -20
if python3 -c "import zmq, fastapi, uvicorn" 2>/dev/null; then
  PYTHONPATH=python timeout 200 python3 -m sglang.launch_server --model sglang-demo/gemma4-tiny-nvfp4 --device cuda --port 31999 --log-level warning > $OUT/server.log 2>&1 &
  for i in $(seq 1 120); do sleep 1; curl -s 127.0.0.1:31999/health -o /dev/null -w "%{http_code}" | grep -q 200 && break; done
  curl -s 127.0.0.1:31999/v1/chat/completions -H 'Content-Type: application/json' -d '{"messages":[{"role":"user","content":"hi"}],"max_tokens":8,"temperature":0}'; echo
  curl -s 127.0.0.1:31999/get_server_info | head -c 400; echo
  pkill -TERM -f "port 31999"; sleep 3; tail -5 $OUT/server.log
fi
