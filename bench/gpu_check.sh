#!/usr/bin/env bash
# The checks that need a CUDA GPU, as one script: the CUDA tests (tests/test_gpu.py, the Ray one included) and
# `python -m bench.paper_cost` on the GPU in float32 and bf16, the clients sharing the GPU through Ray.
# What comes back is small and flat (a device line, two logs, one JSON per precision), so the script also suits
# machines that return only a few files.
#
# Usage: bash bench/gpu_check.sh OUT_DIR   (PYTHON=... picks the interpreter; default: python)
# It ends within about 9 minutes (each step has its own time limit), so it fits one 10-minute machine call.
set -u
out=${1:?usage: bash bench/gpu_check.sh OUT_DIR}
python=${PYTHON:-python}
work=$(mktemp -d)
mkdir -p "$out"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    nproc
    $python -c "import torch, flwr, ray; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'flwr', flwr.__version__, 'ray', ray.__version__)"
} 2>&1 | tee "$out/device.txt"

timeout 150 $python -m pytest tests/test_gpu.py -v -p no:cacheprovider 2>&1 | tee "$out/gpu-tests.log"

for amp in off bf16; do
    timeout 200 $python -m bench.paper_cost --paths memory --rounds 3 --data-root "$work/data" \
        --run-config "device=cuda amp=$amp" --federation-config "client-resources-num-gpus=0.125" \
        --out "$work/paper-cost-$amp" 2>&1 | tee -a "$out/paper-cost.log"
    cp "$work/paper-cost-$amp/paper-cost.json" "$out/paper-cost-$amp.json" 2>/dev/null
    tail -n 40 "$work"/paper-cost-$amp/memory/launch.log >> "$out/paper-cost.log" 2>/dev/null
done
