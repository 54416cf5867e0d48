#!/usr/bin/env bash
# Issue 27's open GPU questions in one run, sized for one lent GPU session (~15 minutes of device time, of which
# this uses at most 10: each script is capped so a hang cannot eat the rest). Issue 7's session (training against
# compiled transformers, the kernels, decoding) last ran 2026-11-26: benchmarks/RESULTS.md, "H200: the GELU and
# q/k/v kernels measured" (49.3% MFU, 1.59x compiled transformers at micro-batch 32).
#   1. gpu_train.py   GPT-2 124M training at micro-batch 32 against compiled transformers: the trainer's CUDA path
#                     (compiled, bf16 residual, the loss and GELU Triton kernels), the same in fp8 (torchao's
#                     Float8Linear, `--train.precision fp8`; profiled), and the scaling table: 355M and 774M at
#                     context 1024, 124M at 4096, 774M in fp8 too (each point ~40 s: compile, 3 + 4 steps).
#   2. gpu_fp8.py     loss parity of fp8 against bf16 over 300 steps of `llmscratch pretrain` on real text, and
#                     the trainer's own tokens/s and MFU for both.
#   3. gpu_check.py   correctness on CUDA, the trainer with its default kernels and with the q/k/v kernel too.
# (gpu_decode.py, decoding against transformers, answered its questions on 2026-11-26 and is not rerun here.)
# Needs torchao on the GPU machine. The lent machines' image has none and no network (torch 2.11, Python 3.12):
# carry torchao 0.18.0's wheel (it loads its C++ parts on torch >= 2.11). Here, in the repository's root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .whl torchao==0.18.0
# and run with carry [".whl"] and the command
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site;
#   bash benchmarks/gpu_session.sh $OUT/session.log
# (this script appends src to that PYTHONPATH). Without torchao the fp8 rows fail in one line each and the rest
# still runs.
# Usage, from the repository root on the GPU machine:  bash benchmarks/gpu_session.sh [LOG]
# tests/test_benchmarks.py parses these arguments and dry-runs each script on the CPU, so a renamed variant or a
# broken check fails there rather than here.
# (LOG: a copy of everything printed, e.g. "$OUT/session.log" on a lent machine)
set -u
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
log=${1:-/dev/null}
{
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, '| transformers', transformers.__version__, '| triton', triton.__version__)"
python3 -c "import torchao; print('torchao', torchao.__version__)" 2>/dev/null || echo "torchao: not installed (fp8 rows will fail)"
status=0
timeout 320 python3 benchmarks/gpu_train.py --batch-size 32 --hf-variants compiled --steps 8 --warmup 3 \
    --variants compiled+bf16res,compiled+bf16res+fp8 --profile compiled+bf16res+fp8 \
    --scaling 355m:1024:32,774m:1024:16,774m:1024:16+fp8,124m:4096:8 || status=1
timeout 180 python3 benchmarks/gpu_fp8.py --steps 300 --batch-size 16 || status=1
timeout 100 python3 benchmarks/gpu_check.py || status=1
echo "gpu_session status $status"
} 2>&1 | grep --line-buffered -v '^\[transformers\]' | tee "$log"
