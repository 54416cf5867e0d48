"""Where and in which precision to run: device resolution, autocast and inference dtypes, TF32, peak FLOP/s.

The `auto` choices are measured, not assumed (benchmarks/RESULTS.md): bf16 on CUDA, and on CPUs with bf16
matrix instructions (AVX512-BF16 / AMX), where bf16 matrix products run several times faster than fp32.
`cpu_memory_kept_for_reuse` is a CPU training setting of the process's memory allocator, measured there too.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import platform
from collections.abc import Iterator
from pathlib import Path

import torch

from llmscratch.errors import UserError

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16}


def _device_choices() -> str:
    """The --device values this machine accepts, for error messages."""
    choices = ["auto", "cpu"]
    n_cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n_cuda:
        choices += ["cuda"] + [f"cuda:{i}" for i in range(n_cuda)]
    if torch.backends.mps.is_available():
        choices.append("mps")
    return ", ".join(choices)


def resolve_device(name: str) -> torch.device:
    """`auto` → CUDA when present, else Apple's MPS, else the CPU. A name that is not a device, or names one this
    machine lacks (CUDA without a GPU, cuda:N past the last GPU, MPS off a Mac) → UserError listing the valid
    choices."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise UserError(f"--device {name}: not a device name; use one of {_device_choices()}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: CUDA is not available on this machine; use one of "
                            f"{_device_choices()}")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                            f"use one of {_device_choices()}")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise UserError(f"--device {name}: MPS (Apple GPUs) is not available on this machine; use one of "
                            f"{_device_choices()}")
    elif dev.type != "cpu":
        raise UserError(f"--device {name}: {dev.type} devices are not supported; use one of {_device_choices()}")
    return dev


@functools.lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """True on CPUs with bf16 matrix instructions (AVX512-BF16 / AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@contextlib.contextmanager
def tf32_matmuls(enabled: bool = True) -> Iterator[None]:
    """While inside, let CUDA run fp32 matrix products and cuDNN convolutions in TF32 (`enabled`) or not; on
    leaving, restore both settings as they were. Process-wide (PyTorch's `torch.backends` flags); on a machine
    without CUDA they are set and restored all the same and change nothing."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def bf16_is_fast(device: torch.device) -> bool:
    return device.type == "cuda" or (device.type == "cpu" and cpu_has_fast_bf16())


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for training at `precision` (auto | fp32 | bf16), or None for plain fp32."""
    if precision == "auto":
        return torch.bfloat16 if bf16_is_fast(device) else None
    if precision in ("fp32", "float32"):
        return None
    if precision in ("bf16", "bfloat16"):
        return torch.bfloat16
    raise UserError(f"precision {precision!r} is not supported; use auto, fp32 or bf16")


def inference_dtype(name: str, device: torch.device) -> torch.dtype:
    """Weights dtype for generation: `auto` is bf16 where bf16 is fast, else fp32."""
    if name == "auto":
        return torch.bfloat16 if bf16_is_fast(device) else torch.float32
    if name not in _DTYPES:
        raise UserError(f"--dtype {name}: use auto, fp32, bf16 or fp16")
    return _DTYPES[name]


def peak_flops(device: torch.device, override_tflops: float | None = None) -> float | None:
    """Dense bf16 peak FLOP/s for MFU, from vendor datasheets; None when unknown (e.g. CPUs)."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in (("H200", 989), ("H100", 989), ("A100", 312), ("L4", 121), ("A10", 125), ("4090", 165)):
        if key in name:
            return tflops * 1e12
    return None


# glibc's mallopt parameters (malloc.h) and the defaults this restores (malloc.c: DEFAULT_MMAP_MAX,
# DEFAULT_TRIM_THRESHOLD).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULT_MMAP_MAX, _DEFAULT_TRIM_THRESHOLD = 65536, 128 * 1024
_heap_reuse_depth = 0  # nesting depth of cpu_memory_kept_for_reuse in this process


@functools.lru_cache(maxsize=1)
def _glibc():
    """The C library when it is glibc on Linux (with mallopt and malloc_trim), else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 (both must exist)
    except (OSError, AttributeError):
        return None
    return libc


def return_freed_cpu_memory() -> None:
    """Hand the C heap's free pages back to the operating system (glibc's `malloc_trim`; elsewhere nothing).

    Tensors of a few MiB that glibc placed in its heap (its adaptive mmap threshold rises to 32 MiB once large
    blocks have been freed) leave free pages behind when freed, which it keeps until trimmed: after packing
    GPT-2 124M's linears for decoding, ~170 MB of the replaced weights (benchmarks/RESULTS.md)."""
    libc = _glibc()
    if libc is not None and _heap_reuse_depth == 0:  # (inside a training loop the heap is kept on purpose)
        libc.malloc_trim(0)


@contextlib.contextmanager
def cpu_memory_kept_for_reuse() -> Iterator[bool]:
    """While inside, let a CPU training loop reuse the memory its large tensors free instead of faulting in
    new pages; on leaving, give the freed memory back to the operating system.

    PyTorch allocates CPU tensors with malloc. glibc serves every block above its mmap threshold (at most
    32 MiB) straight from the operating system and returns it on free, so each training step maps, zero-fills
    and unmaps its large temporaries again: the chunked LM-head loss's (1,024 × 50,257) buffers, the embedding
    gradient… On the 2-core CPU of benchmarks/RESULTS.md that cost ~1/4 of a GPT-2-vocabulary training step.
    Inside, mmap is off (M_MMAP_MAX = 0) and so is trimming: freed blocks stay in the heap for the next step,
    and the process holds its peak memory. On leaving the outermost `with`, glibc's default limits come back
    and `malloc_trim` returns the heap's free pages. (glibc's own adaptive mmap threshold stays at the value it
    had reached: any mallopt call freezes it.) Yields whether the setting is active: Linux with glibc only,
    elsewhere nothing changes. Process-wide: other threads allocating meanwhile share it. `train` enters it on
    a CPU.
    """
    global _heap_reuse_depth
    libc = _glibc()
    if libc is None:
        yield False
        return
    if _heap_reuse_depth == 0 and not (libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)):
        libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)  # (mallopt refused: leave glibc as it was)
        yield False
        return
    _heap_reuse_depth += 1
    try:
        yield True
    finally:
        _heap_reuse_depth -= 1
        if _heap_reuse_depth == 0:
            libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
            libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
            return_freed_cpu_memory()
