#!/usr/bin/env bash
# Issue 7's next GPU questions, sized for one lent GPU session (~15 minutes of device time, of which this uses at
# most ~8; each script is capped so a hang cannot eat the rest). Measured so far: benchmarks/RESULTS.md, "H100:
# training levers measured" (45.0% MFU, 1.83x compiled transformers at micro-batch 32, a 62.9 ms step).
#   1. gpu_train.py   micro-batch 64 — the optimizer and clipping (2.0–3.3 ms a step) then cost half as much per
#                     token; 1.9x needs 4% — ours (the trainer's path: compiled, bf16 residual) vs transformers
#                     compiled at the same shapes (its eager would need ~88 GiB); with inductor's
#                     coordinate-descent tuning of the Triton kernels (16.5 ms of the step at micro-batch 32 is
#                     Triton elementwise/norm/loss work); and FlashAttention-2 in place of cuDNN's attention
#                     (9.1 ms). Profiles of the plain and the tuned variant, kernel by kernel.
#   2. gpu_decode.py  batch 8 only: the last run stopped before transformers' batch-8 static cache
# (gpu_check.py passed on this code's model and trainer in the last session; run it when they change.)
# Usage, from the repository root on the GPU machine:  bash benchmarks/gpu_session.sh [LOG]
# (LOG: a copy of everything printed, e.g. "$OUT/session.log" on a lent machine)
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1
log=${1:-/dev/null}
{
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
python3 -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__)"
status=0
timeout 330 python3 benchmarks/gpu_train.py --skip-scaling --batch-size 64 --hf-variants compiled \
    --variants compiled+bf16res,compiled+bf16res+coord,compiled+bf16res+flash \
    --profile compiled+bf16res,compiled+bf16res+coord || status=1
timeout 140 python3 benchmarks/gpu_decode.py --batches 8 || status=1
echo "gpu_session status $status"
} 2>&1 | grep --line-buffered -v '^\[transformers\]' | tee "$log"
