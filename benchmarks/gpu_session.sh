#!/usr/bin/env bash
# Issue 7's next GPU questions, sized for one lent GPU session (~15 minutes of device time, of which this uses at
# most ~8; each script is capped so a hang cannot eat the rest). Measured so far: benchmarks/RESULTS.md, "H100:
# the loss as a Triton kernel" (45.1% MFU, 1.84x compiled transformers at micro-batch 32, a 62.8 ms step).
#   1. gpu_train.py   our Triton kernels (model/kernels.py), alone against inductor's kernels and in the
#                     training step (1.9x needs a ~60.6 ms step; 62.8 now):
#                     - the loss kernel since its loads became 16-byte vectors and its autotuner got more settings
#                       (before: 1.67 ms per 16,384-row chunk, 1.97 TB/s; inductor's 2.84 ms); "torchloss" is the
#                       PyTorch expression;
#                     - "gelukernel": fc bias + GELU, whose backward also sums the bias gradient (inductor reads the
#                       GELU gradient back for it: ~1.0 ms a step);
#                     - "qkvkernel": the q/k/v split, whose backward assembles the three gradients and the bias sums
#                       in one pass (inductor: a copy, then a read-back, ~1.8 ms a step together);
#                     - both with CUDA graphs (+0.4%, within noise, last time), and inductor fusion settings aimed
#                       at the same double reads (tilefuse, mixorder).
#   2. gpu_check.py   correctness on CUDA; the trainer with the loss kernel, and again with all three kernels
# Usage, from the repository root on the GPU machine:  bash benchmarks/gpu_session.sh [LOG]
# tests/test_benchmarks.py parses these gpu_train.py arguments and dry-runs gpu_check.py on the CPU, so a
# renamed variant or a broken check fails there rather than here.
# (LOG: a copy of everything printed, e.g. "$OUT/session.log" on a lent machine)
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1
log=${1:-/dev/null}
{
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, '| transformers', transformers.__version__, '| triton', triton.__version__)"
status=0
timeout 360 python3 benchmarks/gpu_train.py --skip-scaling --batch-size 32 --hf-variants compiled \
    --variants compiled+bf16res,compiled+bf16res+torchloss,compiled+bf16res+gelukernel,compiled+bf16res+qkvkernel,compiled+bf16res+gelukernel+qkvkernel+cudagraphs,compiled+bf16res+tilefuse,compiled+bf16res+mixorder \
    --profile compiled+bf16res+gelukernel+qkvkernel+cudagraphs || status=1
timeout 130 python3 benchmarks/gpu_check.py || status=1
echo "gpu_session status $status"
} 2>&1 | grep --line-buffered -v '^\[transformers\]' | tee "$log"
