"""Helpers shared by the benchmark scripts: environment header, timing, tables, optional imports.

Not part of the package; the scripts put this folder on sys.path by being run as files
(`.venv/bin/python benchmarks/decode.py`), so `import _common` finds it.
"""

from __future__ import annotations

import datetime
import importlib
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import torch

from llmscratch.runtime import cpu_features, cpu_model


def require(module: str, hint: str):
    """Import `module` or exit with a message saying how to get it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        sys.exit(f"error: this benchmark needs `{module}` ({exc}); {hint}")


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def set_threads(threads: int | None) -> int:
    """torch.set_num_threads(threads or every core this process may run on); returns the count used."""
    n = threads or available_cores()
    torch.set_num_threads(n)
    return torch.get_num_threads()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({available_cores()} cores, {cpu_features()})"


def load_average() -> str:
    try:
        return "/".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def header(title: str, device: torch.device, extra: str = "") -> str:
    """One line naming what ran where: device, torch version, date, threads, load average."""
    parts = [title, f"device: {device_name(device)}", f"torch {torch.__version__}",
             f"python {platform.python_version()}",
             datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
             f"threads: {torch.get_num_threads()}"]
    if device.type == "cpu":
        parts.append(f"load avg (1/5/15 min) at start: {load_average()}")
    if extra:
        parts.append(extra)
    return " | ".join(parts)


def contention_note(threads: int) -> str | None:
    """A warning when other processes were competing for the cores during the run."""
    try:
        one_minute = os.getloadavg()[0]
    except OSError:
        return None
    if one_minute > available_cores() + 0.5:
        return (f"warning: 1-minute load average {one_minute:.2f} exceeds the {available_cores()} cores "
                f"({threads} threads used): other processes competed for the CPU, so absolute numbers are "
                f"low; the contenders are interleaved, so the ratios are fairer than the absolute rates")
    return None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of `fn` takes, with the device drained before and after."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]], align: str | None = None) -> str:
    """A GitHub-markdown table; `align` has one letter per column, 'l' or 'r' (default: first l, rest r)."""
    align = align or "l" + "r" * (len(headers) - 1)
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) if cells else len(str(h))
              for i, h in enumerate(headers)]

    def fmt(row):
        return "| " + " | ".join(c.ljust(w) if a == "l" else c.rjust(w)
                                 for c, w, a in zip(row, widths, align)) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if a == "r" else ("-" * (w + 2))
                          for w, a in zip(widths, align)) + "|"
    return "\n".join([fmt([str(h) for h in headers]), rule, *(fmt(r) for r in cells)])


def ours_default_precision(device: torch.device, kind: str) -> str:
    """'bf16' or 'fp32': what llmscratch picks by itself on `device` for `kind` ('train': autocast dtype,
    'generate': weights dtype), read from llmscratch.runtime; fp32 (bf16 on CUDA) if that module is missing."""
    try:
        from llmscratch import runtime
    except ImportError:
        return "bf16" if device.type == "cuda" else "fp32"
    if kind == "train":
        dtype = runtime.autocast_dtype("auto", device)
    else:
        dtype = runtime.inference_dtype("auto", device)
    return "bf16" if dtype == torch.bfloat16 else "fp32"


def verdict(value: float, target: float) -> str:
    return f"{'meets' if value >= target else 'MISSES'} target ≥ {target:g}"
