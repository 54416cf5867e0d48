#!/usr/bin/env bash
# Issue 7's open GPU questions, in order of value, sized for one lent GPU session (~15 minutes of device time,
# of which this uses at most ~9.5; each script is capped so a hang cannot eat the rest):
#   1. gpu_train.py   the training levers not yet measured on a GPU: micro-batch 32, the bf16 residual stream
#                     (GPT.low_precision_residual) and inductor's max-autotune, each against the one-chunk
#                     compiled model and transformers compiled in the same run, plus a per-kernel-group profile
#   2. gpu_check.py   correctness on CUDA, including compiled decoding (CUDA graphs) == eager, GPT-2/Llama/Qwen3
#   3. gpu_decode.py  decoding, ours vs transformers' best, batch 1 and 8
# Usage, from the repository root on the GPU machine:  bash benchmarks/gpu_session.sh [LOG]
# (LOG: a copy of everything printed, e.g. "$OUT/session.log" on a lent machine)
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1
log=${1:-/dev/null}
{
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
python3 -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__)"
status=0
timeout 300 python3 benchmarks/gpu_train.py --skip-scaling --batch-size 32 \
    --variants eager,one-chunk,one-chunk+bf16res,one-chunk+bf16res+autotune --profile one-chunk+bf16res || status=1
timeout 120 python3 benchmarks/gpu_check.py || status=1
timeout 150 python3 benchmarks/gpu_decode.py || status=1
echo "gpu_session status $status"
} 2>&1 | tee "$log"
