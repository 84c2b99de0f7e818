#!/usr/bin/env bash
# Every GPU check and GPU benchmark of the project in one run, results under $OUT (default
# /tmp/gpu-checks): for a GPU machine that is lent for minutes (docs/PERFORMANCE.md).
#
#   OUT=/tmp/gpu bash bench/gpu_checks.sh [SECONDS_FOR_THE_BENCHMARK]
#
# Runs, each under its own time limit so that one slow step cannot take the others' time:
#   1. nvidia-smi and the Python stack seen there            -> machine.txt
#   2. the GPU tests (tests/test_gpu.py, tests/test_dali_loader.py -m gpu)  -> gpu-tests.log
#   3. ResNet-50 at 224x224: in-memory (dense, masked, masked compiled) vs the trainer with
#      its automatic speed settings (compile, channels_last, cudnn.benchmark on a GPU)
#                                                             -> resnet50.log
#   4. the 2:4 ViT export (prune.structure=2:4): each semi-structured Linear layer and the
#      whole vit_cifar in fp16, dense vs torch.sparse semi-structured at batch 1024
#                                                             -> n_m.log, n_m.json
# A machine without the project's pure-Python dependencies gets them from ./.whl when that
# folder holds wheels (see the device notes in docs/PERFORMANCE.md); DALI's wheels are too
# large to carry, so its GPU tests skip there with that reason.
set -u
OUT=${OUT:-/tmp/gpu-checks}
BENCH_SECONDS=${1:-300}
PYTHON=${PYTHON:-python3}  # the device image's python3 holds torch
mkdir -p "$OUT"
cd "$(dirname "$0")/.."

if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD} PYTHONUNBUFFERED=1 WANDB_MODE=disabled
export APP_DIST_BENCH_DIR=${APP_DIST_BENCH_DIR:-/tmp/app-dist-bench}
if [ -d .devdata/imagenet-sample-restricted ]; then
    export APP_DIST_IMAGENET_SAMPLE=$PWD/.devdata/imagenet-sample-restricted
fi

{
    nvidia-smi
    "$PYTHON" -c "import torch, sys; print(sys.version); print('torch', torch.__version__, \
torch.version.cuda, torch.cuda.get_device_name())"
    nproc
} > "$OUT/machine.txt" 2>&1

timeout 200 "$PYTHON" -m pytest -q -rs -p no:cacheprovider --durations=10 \
    tests/test_gpu.py tests/test_dali_loader.py -m gpu > "$OUT/gpu-tests.log" 2>&1
echo "gpu tests: exit $?" >> "$OUT/gpu-tests.log"

timeout "$BENCH_SECONDS" "$PYTHON" bench/gpu_resnet50.py --copies 80 --ours auto --compiled \
    --no-write > "$OUT/resnet50.log" 2>&1
echo "resnet50 bench: exit $?" >> "$OUT/resnet50.log"

timeout 240 "$PYTHON" bench/n_m_inference.py --batch 1024 --rounds 5 --no-write \
    --json "$OUT/n_m.json" > "$OUT/n_m.log" 2>&1
echo "n:m bench: exit $?" >> "$OUT/n_m.log"
