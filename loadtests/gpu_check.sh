#!/usr/bin/env bash
# The GPU check (loadtests/gpu_check.py) as one bounded run on a GPU host: ResNet-50 at 224x224 in bf16,
# 64 clients, about 10 s per row; the report goes to ${OUT:-out}/gpu_check.json. Extra arguments pass through.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-out}"
mkdir -p "$out"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
timeout 480 python -m loadtests.gpu_check --device cuda --model resnet50 --size 224 --dtype bf16 --clients 64 \
    --seconds 10 --json "$out/gpu_check.json" "$@"
