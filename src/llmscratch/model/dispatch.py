"""Whether a tensor's computation may use the hand-written Triton kernels of model/kernels.py.

The kernels module imports Triton, which PyTorch's CUDA builds ship and its CPU builds do not, so it is imported
lazily, on the first CUDA tensor that asks, and a missing Triton makes every caller keep its PyTorch spelling.
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=1)
def _import_kernels():
    """`llmscratch.model.kernels`, or None when Triton does not import."""
    try:
        from llmscratch.model import kernels
    except ImportError:
        return None
    return kernels


def triton_kernels(t: torch.Tensor):
    """The hand-written Triton kernels (`llmscratch.model.kernels`) when `t` is on an NVIDIA GPU that Triton
    compiles for (compute capability 7.0+; checked in eager mode only, since torch.compile itself needs such a
    GPU) and Triton imports (PyTorch's CUDA builds ship it); None otherwise — on a CPU, without Triton, and on
    ROCm builds, where the kernels' settings are untested. Callers then use their PyTorch spelling."""
    if not t.is_cuda or torch.version.hip is not None:
        return None
    if torch.compiler.is_compiling():
        # Compiling for a GPU needs Triton already. A plain import, which Dynamo runs while tracing; it would warn
        # about the lru_cache wrapper of `_import_kernels`, which eager calls use to remember a failed import.
        from llmscratch.model import kernels

        return kernels
    if torch.cuda.get_device_capability(t.device) < (7, 0):
        return None
    return _import_kernels()
