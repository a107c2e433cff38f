#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py): the default recipe on hymenoptera at 224 px with mixed
# precision, images/s per stage and peak GPU memory; the bundle served with ONNX Runtime's CUDA
# provider (p50 at 1 caller, throughput with 16), fp32 and fp16; fp16's accuracy. About 4 minutes
# on one recent GPU. One table at the end; the runs and logs stay in $OUT (default runs/gpu_check).
#
# Prepare the machine once: `pip install -e '.[train]'` in the Python the script runs (PYTHON,
# default python3), with a CUDA build of torch and onnxruntime-gpu (the project's dependency).
# The data must be on that machine: copy ../shared/data/hymenoptera into an ignored folder of the
# repository (e.g. data/hymenoptera) and give it as DATA.
#
#   bench/gpu_check.sh                                  # DATA=../shared/data/hymenoptera
#   DATA=data/hymenoptera OUT=/tmp/gpu bench/gpu_check.sh
#   bench/gpu_check.sh --cpu --trainer-args "--size 64 --epochs 1 --cycles 1"   # the script itself, no GPU
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DATA=${DATA:-../shared/data/hymenoptera}
OUT=${OUT:-runs/gpu_check}
if [[ " $* " != *" --cpu "* ]]; then
  command -v nvidia-smi >/dev/null || { echo "gpu_check: no nvidia-smi here: this needs an NVIDIA GPU (--cpu tests the script)"; exit 2; }
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
fi
"$PYTHON" -c "import torch, onnxruntime; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| onnxruntime', onnxruntime.__version__, onnxruntime.get_available_providers())"
exec timeout 600 "$PYTHON" bench/gpu_check.py --data "$DATA" --out "$OUT" "$@"
