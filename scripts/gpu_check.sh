#!/usr/bin/env bash
# One prepared check for a machine with an NVIDIA GPU: installs what is missing, runs a short real
# fine-tune on CUDA with TrainLogCallback, and asserts that the GPU lines in the logs hold real
# non-zero values (scripts/gpu_check.py). Takes about a minute on a data-centre GPU; exit 0 = pass.
#   bash scripts/gpu_check.sh            # PYTHON=/path/to/python to choose the interpreter
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,driver_version,memory.total,power.draw,temperature.gpu --format=csv || true
for module in torch transformers accelerate loguru pynvml psutil; do
  "$PY" -c "import $module" 2>/dev/null || "$PY" -m pip install -q "$( [ "$module" = pynvml ] && echo nvidia-ml-py || echo "$module" )"
done
"$PY" -c "import seo_trainlog" 2>/dev/null || "$PY" -m pip install -q --no-deps -e . || export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
HF_HUB_OFFLINE=1 timeout 280 "$PY" scripts/gpu_check.py "$@"
