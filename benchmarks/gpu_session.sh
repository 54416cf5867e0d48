#!/usr/bin/env bash
# Issue 7's open GPU questions, in order of value, sized for one lent GPU session (~15 minutes of device time,
# of which this uses ~9; each script is capped so a hang cannot eat the rest):
#   1. gpu_check.py   correctness on CUDA, including compiled decoding (CUDA graphs) == eager, GPT-2/Llama/Qwen3
#   2. gpu_decode.py  decoding since the 2026-11-26 change that skips Dynamo's guards after a generation's first
#                     step (measured on CPU only: 0.40 -> 0.05 ms a call)
#   3. gpu_train.py   the two untried training levers: micro-batch 32 (the finder never ran on a GPU) and
#                     inductor max-autotune, against the one-chunk compiled default and transformers compiled
# Usage, from the repository root on the GPU machine:  bash benchmarks/gpu_session.sh
set -u
export PYTHONPATH=src
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python3 -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__)"
status=0
timeout 150 python3 benchmarks/gpu_check.py || status=1
timeout 150 python3 benchmarks/gpu_decode.py || status=1
timeout 270 python3 benchmarks/gpu_train.py --skip-scaling --batch-size 32 --variants one-chunk,autotune || status=1
exit $status
