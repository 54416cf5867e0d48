#!/usr/bin/env bash
# Issue 7's GPU checks, sized for one lent GPU session (~15 minutes of device time, of which this uses at most
# ~7.5; each script is capped so a hang cannot eat the rest):
#   1. gpu_train.py   ours (bf16 residual stream, one-pass loss under compile) vs transformers eager and compiled
#                     at micro-batch 32, with ours eager, the trainer's own compiled path and a per-kernel-group
#                     profile
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
timeout 200 python3 benchmarks/gpu_train.py --skip-scaling --batch-size 32 \
    --variants eager,one-chunk+bf16res,compiled+bf16res --profile one-chunk+bf16res || status=1
timeout 100 python3 benchmarks/gpu_check.py || status=1
timeout 130 python3 benchmarks/gpu_decode.py || status=1
echo "gpu_session status $status"
} 2>&1 | grep --line-buffered -v '^\[transformers\]' | tee "$log"
