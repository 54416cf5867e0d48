#!/usr/bin/env bash
# Issue 7's GPU measurements in one run, sized for one lent GPU session (~15 minutes of device time, of which this
# uses ~8; each script is capped so a hang cannot eat the rest). Last run: benchmarks/RESULTS.md, "H200: the GELU
# and q/k/v kernels measured" (2026-11-26; 49.3% MFU, 1.59x compiled transformers at micro-batch 32).
#   1. gpu_train.py   GPT-2 124M training at micro-batch 32 against compiled transformers: the trainer's CUDA path
#                     (compiled, bf16 residual, the loss and GELU Triton kernels), the same with each kernel
#                     replaced by its PyTorch expression (torchloss, torchgelu), with the opt-in q/k/v kernel
#                     (qkvkernel) and with CUDA graphs; the kernels alone against inductor's (GPU time per call).
#   2. gpu_check.py   correctness on CUDA, the trainer with its default kernels and with the q/k/v kernel too.
#   3. gpu_decode.py  batch-1 and batch-8 decoding against transformers' best configuration.
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
timeout 300 python3 benchmarks/gpu_train.py --skip-scaling --batch-size 32 --hf-variants compiled \
    --variants compiled+bf16res,compiled+bf16res+torchgelu,compiled+bf16res+torchloss,compiled+bf16res+qkvkernel,compiled+bf16res+cudagraphs \
    --profile compiled+bf16res || status=1
timeout 130 python3 benchmarks/gpu_check.py || status=1
timeout 180 python3 benchmarks/gpu_decode.py || status=1
echo "gpu_session status $status"
} 2>&1 | grep --line-buffered -v '^\[transformers\]' | tee "$log"
