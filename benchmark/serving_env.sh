# Sourced by the GPU serving scripts: $OUT, $MODEL and $PORT defaults, and the serving stack on the
# path. The GPU image lacks it, so carry its wheels: `../shared/tools/offline-wheels.sh .whl` here,
# then name `.whl` in the run's carry list.
OUT=${OUT:-.}
MODEL=${MODEL:-nvidia/Gemma-4-26B-A4B-NVFP4}
PORT=${PORT:-30000}
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD/python PYTHONUNBUFFERED=1
