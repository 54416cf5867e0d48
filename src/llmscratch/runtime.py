"""Where and in which precision to run: device resolution, autocast and inference dtypes, TF32, peak FLOP/s.

The `auto` choices are measured, not assumed (benchmarks/RESULTS.md): bf16 on CUDA; on a CPU, bf16 where a bf16
product of a weight matrix with as many rows as the work multiplies ran at least 10% faster than fp32 there
(`bf16_multiplies_faster`, timed once per CPU and kept with the other per-CPU answers by `cpu_probe` in the cache
folder): many rows for training (arithmetic: fast only with bf16 instructions, AVX512-BF16 or AMX), one row for
decoding (weight streaming: bf16 halves the bytes, and won even where its arithmetic is emulated), a server's
batch for serving. Where bf16 arithmetic is emulated, `bf16_upcast_rows` measures from how many rows a bf16
model's products are better done in fp32 (model/packed.py's `UpcastLinear`).
`cpu_memory_kept_for_reuse` is a CPU training setting of the process's memory allocator, measured there too.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import platform
from collections.abc import Callable, Iterator
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


# The vector extensions that decide which CPU kernels run and how fast (x86, then Arm), as /proc/cpuinfo names them
VECTOR_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "asimd", "sve", "sve2", "bf16", "i8mm")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (/proc/cpuinfo's "flags" on x86, "Features" on Arm); empty where there is none."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_features() -> str:
    """This CPU's `VECTOR_FEATURES`, e.g. "avx2,avx512f,avx512_bf16", or PyTorch's name for the instruction set
    it uses where the flags are unknown. Part of every per-CPU cache key beside `cpu_model`: under virtualisation
    one model name (e.g. "AMD EPYC") covers machines with and without AVX-512."""
    flags = cpu_flags()
    return ",".join(f for f in VECTOR_FEATURES if f in flags) or torch.backends.cpu.get_cpu_capability()


def cpu_has_fast_bf16() -> bool:
    """True on CPUs with bf16 matrix instructions (AVX512-BF16 / AMX)."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


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
    """Whether bf16 matrix products of training's size (many rows) beat fp32 on `device`: always on CUDA; on a
    CPU as measured (`bf16_multiplies_faster` at `TRAIN_PROBE_ROWS` rows), not read from its flags."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and bf16_multiplies_faster(TRAIN_PROBE_ROWS)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for training at `precision` (auto | fp32 | bf16 | fp8), or None for plain fp32. (fp8 runs
    under bf16 autocast: only the linears the trainer converts multiply in float8.)"""
    if precision == "auto":
        return torch.bfloat16 if bf16_is_fast(device) else None
    if precision in ("fp32", "float32"):
        return None
    if precision in ("bf16", "bfloat16", "fp8"):
        return torch.bfloat16
    raise UserError(f"precision {precision!r} is not supported; use auto, fp32, bf16 or fp8")


def inference_dtype(name: str, device: torch.device, rows: int = 1) -> torch.dtype:
    """Weights dtype for generation: `auto` is bf16 where bf16 is fast — on a CPU, where bf16 weights multiply
    faster than fp32 both at one row and at `rows` rows (the most a step multiplies together: a server's
    `--max-batch`), as `bf16_multiplies_faster` measured it on this CPU — else fp32."""
    if name == "auto":
        if device.type == "cpu":
            fast = all(bf16_multiplies_faster(r) for r in sorted({1, probe_rows(rows)}))
        else:
            fast = bf16_is_fast(device)
        return torch.bfloat16 if fast else torch.float32
    check_dtype_name(name)
    return _DTYPES[name]


def check_dtype_name(name: str) -> None:
    """Raise a UserError unless `name` is a `--dtype` value (auto, fp32, bf16, fp16 or their long names)."""
    if name != "auto" and name not in _DTYPES:
        raise UserError(f"--dtype {name}: use auto, fp32, bf16 or fp16")


# ---------------------------------------------------------------------------------------------------------
# measured once per CPU model, PyTorch version and thread count, then remembered in the cache folder

PROBE_CACHE = "cpu-linear-probe.json"  # in llmscratch's cache folder (download.cache_dir)


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux; the platform's processor string elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_probe(what: str, measure: Callable[[], dict]) -> dict:
    """`measure()`'s answer about `what` on this CPU: measured the first time, then read from the cache file,
    keyed by CPU model and vector extensions, PyTorch version and thread count, so that every later command reads
    it."""
    key = "|".join([cpu_model(), cpu_features(), f"torch {torch.__version__}", f"threads {torch.get_num_threads()}",
                    what])
    cache = read_probe_cache()
    if key not in cache:
        cache[key] = measure()
        _write_probe_cache(cache)
    return cache[key]


def _probe_file() -> Path:
    from llmscratch.download import cache_dir

    return cache_dir() / PROBE_CACHE


def read_probe_cache() -> dict:
    """Every answer `cpu_probe` has kept, by key ({} when none are, or the file is unreadable)."""
    import json

    try:
        data = json.loads(_probe_file().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):  # none yet, or unreadable: measure again
        return {}


def _write_probe_cache(cache: dict) -> None:
    """Best effort: a read-only or full cache folder only means measuring again next time."""
    import json

    from llmscratch.fileio import atomic_write_text

    try:
        _probe_file().parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(_probe_file(), json.dumps(cache, indent=1, sort_keys=True) + "\n")
    except (OSError, UserError):
        pass


def time_calls(ways: dict[str, Callable[[], object]], rounds: int = 5) -> dict[str, float]:
    """{name: µs per call}: the median over `rounds` interleaved rounds (so that a burst of load from elsewhere
    hits every way), each round long enough (~1 ms) to time, after a first call of each (allocation, a library's
    one-time setup)."""
    import time

    with torch.inference_mode():
        for call in ways.values():
            call()
        start = time.perf_counter()
        for call in ways.values():
            call()
        one = max((time.perf_counter() - start) / len(ways), 1e-6)
        n = max(1, min(1000, int(1e-3 / one)))
        times: dict[str, list[float]] = {name: [] for name in ways}
        for _ in range(rounds):
            for name, call in ways.items():
                start = time.perf_counter()
                for _ in range(n):
                    call()
                times[name].append((time.perf_counter() - start) / n * 1e6)
    return {name: round(sorted(t)[len(t) // 2], 2) for name, t in times.items()}


_DTYPE_PROBE_SHAPE = (3072, 768)  # GPT-2 124M's MLP expansion: a mid-sized matrix of a small model
_DTYPE_PROBE_BYTES = 64 << 20  # fp32 weights cycled through: past a CPU's last-level cache, as a model's are


_DTYPE_PROBE_MAX_ROWS = 64  # past a few rows a product's cost grows linearly in rows; more only slows the probe
TRAIN_PROBE_ROWS = _DTYPE_PROBE_MAX_ROWS  # training multiplies thousands of rows: arithmetic, as 64 rows already are


def probe_rows(rows: int) -> int:
    """The row count the dtype probe measures for a caller multiplying up to `rows` rows (1 to 64)."""
    return max(1, min(int(rows), _DTYPE_PROBE_MAX_ROWS))


@functools.cache
def bf16_multiplies_faster(rows: int = 1) -> bool:
    """Whether a product of `rows` rows by a weight matrix runs at least 10% faster with bf16 weights than with
    fp32 on this CPU, each the faster of `F.linear` and oneDNN's packed product where this CPU has it. One row is
    what a decoding step is made of; more rows are a server's batched step, or training (`TRAIN_PROBE_ROWS`).
    Measured once per CPU and row count (`cpu_probe`, well under a second) and remembered.

    One row streams the weights, and bf16 halves their bytes: on both EPYC VMs of benchmarks/RESULTS.md it was
    faster, even on the AVX2-only one, where bf16 arithmetic is emulated. At 32 rows the product is arithmetic,
    and there the AVX2-only CPU multiplied bf16 at 1/6 of fp32's rate (19 against 111 GFLOP/s), so a server's
    `--dtype auto` and `--train.precision auto` are fp32 there. The CPU flags alone (`cpu_has_fast_bf16`) do
    not say whether the build's kernels use them."""
    timing = dtype_probe(rows)
    return timing["bf16_us"] < 0.9 * timing["fp32_us"]


def dtype_probe(rows: int = 1) -> dict[str, float]:
    """This CPU's {"fp32_us", "bf16_us"} at `rows` rows (`measure_dtypes`), measured once per CPU, then read back."""
    rows = probe_rows(rows)
    return cpu_probe(f"dtype choice {_DTYPE_PROBE_SHAPE[0]}x{_DTYPE_PROBE_SHAPE[1]} rows {rows}",
                     lambda: measure_dtypes(rows=rows))


def measure_dtypes(rounds: int = 5, rows: int = 1) -> dict[str, float]:
    """{"fp32_us", "bf16_us"}: one product of a (3072, 768) weight with `rows` rows at each dtype, the faster way
    for each, cycling through copies that fill 64 MiB at fp32 (the same number of weights at bf16), so that each
    weight comes from memory as in a decoding step."""
    import torch.nn.functional as F

    out_features, in_features = _DTYPE_PROBE_SHAPE
    copies = max(1, _DTYPE_PROBE_BYTES // (out_features * in_features * 4))
    ways: dict[str, Callable[[], object]] = {}
    for label, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        weights = [torch.randn(out_features, in_features, dtype=dtype) * 0.02 for _ in range(copies)]
        x = torch.randn(rows, in_features, dtype=dtype)
        turn = iter(range(1 << 62))
        ways[f"{label} plain"] = lambda w=weights, x=x, t=turn: F.linear(x, w[next(t) % copies])
        try:  # oneDNN's packed product, where this build and CPU have it at this dtype
            packed = [torch.ops.mkldnn._reorder_linear_weight(w, rows) for w in weights]
            op = torch.ops.mkldnn._linear_pointwise.default
            op(x, packed[0], None, "none", [], "")
            ways[f"{label} packed"] = lambda p=packed, x=x, t=turn, op=op: op(x, p[next(t) % copies], None, "none",
                                                                          [], "")
        except (AttributeError, RuntimeError):
            pass
    timing = time_calls(ways, rounds)
    return {f"{label}_us": min(us for way, us in timing.items() if way.startswith(label)) for label in ("fp32", "bf16")}


UPCAST_LADDER = (2, 4, 8, 16, 32, 64)  # the row counts `bf16_upcast_rows` tries, fewest first


@functools.cache
def bf16_upcast_rows() -> int | None:
    """The fewest rows (of `UPCAST_LADDER`) from which a product with bf16 weights runs at least 10% faster when
    the weights are converted to fp32 for the call and multiplied in fp32, on this CPU; None where the bf16
    product stays faster up to 64 rows. Measured once per CPU (`cpu_probe`) and remembered.

    Why: on a CPU without bf16 instructions (AVX2 only) `--dtype auto` decodes in bf16, which streams one row's
    weights faster, but bf16 arithmetic there is emulated. On the AVX2-only EPYC of benchmarks/RESULTS.md a
    3072x768 bf16 product took 2,441 µs at 8 rows against 762 in fp32, and an 800-token prompt took 7.0 s to
    read in bf16 against 1.2 s in fp32. `model.packed.UpcastLinear` multiplies such wide inputs in fp32 (the
    conversion costs one pass over the weight's bytes). A CPU whose bf16 product at 64 rows is no slower than
    fp32's (`dtype_probe`: AVX512-BF16, AMX) answers None without trying the ladder: converting can only add."""
    wide = dtype_probe(_DTYPE_PROBE_MAX_ROWS)
    if wide["bf16_us"] <= wide["fp32_us"]:
        return None
    shape = f"{_DTYPE_PROBE_SHAPE[0]}x{_DTYPE_PROBE_SHAPE[1]}"
    for rows in UPCAST_LADDER:
        timing = cpu_probe(f"bf16 upcast {shape} rows {rows}", lambda rows=rows: measure_upcast(rows))
        if timing["upcast_us"] < 0.9 * timing["bf16_us"]:
            return rows
    return None


def measure_upcast(rows: int, rounds: int = 5) -> dict[str, float]:
    """{"bf16_us", "upcast_us"}: one product of a bf16 (3072, 768) weight with `rows` rows, in bf16 (the faster
    of `F.linear` and oneDNN's packed product where this CPU has it) and converted to fp32 first, cycling through
    copies as `measure_dtypes` does so that each weight comes from memory."""
    import torch.nn.functional as F

    out_features, in_features = _DTYPE_PROBE_SHAPE
    copies = max(1, _DTYPE_PROBE_BYTES // (out_features * in_features * 4))
    weights = [torch.randn(out_features, in_features, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
    x = torch.randn(rows, in_features, dtype=torch.bfloat16)
    turn = iter(range(1 << 62))
    ways: dict[str, Callable[[], object]] = {
        "bf16 plain": lambda: F.linear(x, weights[next(turn) % copies]),
        "upcast": lambda: F.linear(x.float(), weights[next(turn) % copies].float()).to(torch.bfloat16),
    }
    try:
        packed = [torch.ops.mkldnn._reorder_linear_weight(w, rows) for w in weights]
        op = torch.ops.mkldnn._linear_pointwise.default
        op(x, packed[0], None, "none", [], "")
        ways["bf16 packed"] = lambda: op(x, packed[next(turn) % copies], None, "none", [], "")
    except (AttributeError, RuntimeError):  # no oneDNN bf16 on this CPU (AVX2 only)
        pass
    timing = time_calls(ways, rounds)
    return {"bf16_us": min(us for way, us in timing.items() if way.startswith("bf16")),
            "upcast_us": timing["upcast"]}


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
