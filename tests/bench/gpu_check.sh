#!/usr/bin/env bash
# The GPU issue's figures in one run on one CUDA machine (~10 minutes): training throughput of each candidate
# (gpu_throughput.py), then MTCNN alignment, the demo packed and unpacked and the study's grid end to end
# (gpu_sweep.py). Each writes its JSON into OUT (default: the current folder); a stage that fails does not stop
# the next. PYTHON names the interpreter (default .venv/bin/python).
#
#   bash tests/bench/gpu_check.sh [OUT]
set -u
out=${1:-.}
python=${PYTHON:-.venv/bin/python}
export HF_HUB_OFFLINE=1
mkdir -p "$out"
status=0
timeout 300 "$python" tests/bench/gpu_throughput.py --steps 20 --no-next-process \
    --only vit,vit-bf16,vit-bf16-blocks,vit-bf16-blocks-flash,resnet50,resnet50-bf16,resnet50-bf16-compile \
    --json "$out/gpu_throughput.json" || status=$?
"$python" tests/bench/gpu_sweep.py --budget 330 --json "$out/gpu_sweep.json" || status=$?
exit $status
