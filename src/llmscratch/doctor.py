"""`llmscratch doctor`: what this machine offers llmscratch, and for each problem the step that fixes it.

Each check is a small function returning a `Check`; `run_checks` runs them all. They only look: nothing is
downloaded, installed or created (the writability of a folder is read from its permissions), and the one check
that could reach the network — whether GPT-2's BPE loads — runs in a child process whose proxy settings point at
a closed local port, under a timeout, so it answers "needs a download" at once instead of downloading or hanging.

PyTorch is imported inside the checks, not at the top: a missing or broken PyTorch is itself a finding to
report, not a reason for the doctor to crash.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

OK, WARN, FAIL = "OK", "WARN", "FAIL"

MIN_PYTHON = (3, 10)  # pyproject.toml's requires-python
MIN_TORCH = (2, 4)  # pyproject.toml's torch requirement
TORCH_PIN = "torch==2.13.0"  # the Makefile's TORCH_SPEC
WARN_FREE_BYTES = 2 * 10**9  # a GPT-2 124M download plus a few checkpoints of it
FAIL_FREE_BYTES = 200 * 10**6  # less than one GPT-2 124M checkpoint (~0.5 GB in fp32): a save would fail
GPT2_TIMEOUT_S = 5.0

# Where GPT-2's two BPE files can be fetched by hand (tiktoken's own source of them).
GPT2_FILES_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"


@dataclass(frozen=True)
class Check:
    """One finding: `status` is OK, WARN or FAIL; `found` says what was found; `fix` (for WARN and FAIL) the exact
    command or step that fixes it."""

    name: str
    status: str
    found: str
    fix: str = ""


@dataclass(frozen=True)
class Extra:
    """An optional part of the install: `modules` it provides, the `pip` line that installs them, what needs them
    (`used_by`), and whether llmscratch itself ever needs them (`needed`: False when only tests use them)."""

    name: str
    modules: tuple[str, ...]
    pip: str
    used_by: str
    needed: bool = True


# pyproject.toml's optional dependencies, as a user meets them. transformers comes with the bench extra; peft is
# only in the test extra (which also pulls TensorFlow), so its own line is the lighter install.
EXTRAS = (
    Extra("serve", ("fastapi", "uvicorn"), "pip install 'llmscratch[serve]'", "`llmscratch serve`"),
    Extra("notebooks", ("nbclient", "ipykernel", "nbformat"), "pip install 'llmscratch[notebooks]'",
          "running notebooks/ headlessly (`make notebooks`)"),
    Extra("transformers", ("transformers",), "pip install 'llmscratch[bench]'",
          "loading `convert to-hf` folders in transformers, and benchmarks/"),
    Extra("peft", ("peft",), "pip install 'peft>=0.13'", "loading `lora export-peft` adapters with Hugging Face PEFT"),
    Extra("datasets", ("datasets",), "pip install 'llmscratch[datasets]'",
          "`--data hf:NAME`: Hugging Face data sets streamed from the hub"),
    Extra("fp8", ("torchao",), "pip install 'llmscratch[fp8]'",
          "`--train.precision fp8`: float8 training on H100/H200-class GPUs (emulated on a CPU)"),
    Extra("tensorflow", ("tensorflow",), "pip install 'llmscratch[tf]'",
          "the test suite only, to write OpenAI-format checkpoints (`convert from-openai` and `download --source "
          "openai` read OpenAI's TensorFlow checkpoints without it)", needed=False),
)


def run_checks(out: Path) -> list[Check]:
    """Every check, in the order `llmscratch doctor` prints them; `out` is where the user means to write runs."""
    checks = [check_python(), check_torch()]
    if checks[-1].status != FAIL:  # the device checks need a working PyTorch
        checks += [check_devices(), check_precision(), check_triton()]
    checks += [check_cache(), check_out(out), check_gpt2_bpe()]
    checks += [check_extra(extra) for extra in EXTRAS]
    return checks


# --- Python and PyTorch ------------------------------------------------------------------------------------
def check_python() -> Check:
    from llmscratch import __version__

    version = ".".join(map(str, sys.version_info[:3]))
    found = f"{version} at {sys.executable}; llmscratch {__version__}"
    if sys.version_info[:2] < MIN_PYTHON:
        return Check("python", FAIL, found, f"use Python >= {'.'.join(map(str, MIN_PYTHON))}: rm -rf .venv && make "
                                            "quickstart PYTHON=python3.12")
    return Check("python", OK, found)


def _nvidia_gpu_present() -> bool:
    """Whether the NVIDIA driver is loaded with a GPU, seen without PyTorch (Linux's /proc entry, or
    nvidia-smi elsewhere)."""
    gpus = Path("/proc/driver/nvidia/gpus")
    try:
        if gpus.is_dir() and any(gpus.iterdir()):
            return True
    except OSError:
        pass
    return shutil.which("nvidia-smi") is not None


def check_torch() -> Check:
    try:
        import torch
    except Exception as exc:  # noqa: BLE001 (any failure to import is the finding)
        return Check("pytorch", FAIL, f"cannot import torch ({type(exc).__name__}: {exc})",
                     f"pip install '{TORCH_PIN}'")
    if torch.version.cuda:
        build = f"CUDA {torch.version.cuda} build"
    elif getattr(torch.version, "hip", None):
        build = f"ROCm {torch.version.hip} build"
    else:
        build = "CPU-only build"
    found = f"{torch.__version__}, {build}"
    numbers = re.match(r"(\d+)\.(\d+)", torch.__version__)
    if numbers and tuple(map(int, numbers.groups())) < MIN_TORCH:
        return Check("pytorch", FAIL, found + f"; llmscratch needs >= {'.'.join(map(str, MIN_TORCH))}",
                     f"pip install '{TORCH_PIN}'")
    if build == "CPU-only build" and _nvidia_gpu_present():
        return Check("pytorch", WARN, found + ", but this machine has an NVIDIA GPU",
                     f"pip install --force-reinstall '{TORCH_PIN}' --index-url https://download.pytorch.org/whl/cu126 "
                     "(pick the CUDA version your driver supports at https://pytorch.org/get-started)")
    return Check("pytorch", OK, found)


# --- devices and precision ---------------------------------------------------------------------------------
def check_devices() -> Check:
    """What `--device auto` picks (runtime.resolve_device) and every device PyTorch sees."""
    import torch

    from llmscratch.runtime import resolve_device

    auto = resolve_device("auto")
    n_cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    gpus = []
    for i in range(n_cuda):
        props = torch.cuda.get_device_properties(i)
        gpus.append(f"cuda:{i} {props.name} ({props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor})")
    mps = torch.backends.mps.is_available()
    found = (f"--device auto → {auto.type}; CUDA: {'; '.join(gpus) if gpus else 'none visible'}; "
             f"MPS: {'available (--device mps; auto does not pick it)' if mps else 'no'}")
    if torch.version.cuda and not n_cuda and _nvidia_gpu_present():
        return Check("device", WARN, found + " although an NVIDIA GPU is installed",
                     "run `nvidia-smi`: update the driver to one that supports CUDA "
                     f"{torch.version.cuda}, and check that CUDA_VISIBLE_DEVICES is unset or lists the GPU")
    return Check("device", OK, found)


SERVE_ROWS = 32  # the batch the doctor's line reports the served dtype for


def check_precision() -> Check:
    """bf16 on the device `--device auto` picks, and what `--train.precision auto` and `--dtype auto` use there
    (runtime's own choice, as training and generation make it)."""
    import torch

    from llmscratch.runtime import autocast_dtype, inference_dtype, resolve_device

    device = resolve_device("auto")
    train = "bf16 autocast" if autocast_dtype("auto", device) == torch.bfloat16 else "fp32"
    names = {torch.bfloat16: "bf16", torch.float16: "fp16"}
    infer = names.get(inference_dtype("auto", device), "fp32")
    chosen = f"--train.precision auto trains in {train}, --dtype auto runs models in {infer}"
    if device.type == "cpu":
        from llmscratch.runtime import bf16_upcast_rows, cpu_has_fast_bf16, dtype_probe

        kind = ("with bf16 matrix instructions (AVX512-BF16/AMX)" if cpu_has_fast_bf16()
                else "without bf16 matrix instructions (AVX512-BF16/AMX)")
        from llmscratch.runtime import TRAIN_PROBE_ROWS

        timed = ", ".join(f"{r} row{'s' if r > 1 else ''} {t['bf16_us']:.0f} / {t['fp32_us']:.0f} µs"
                          for r, t in ((r, dtype_probe(r)) for r in (1, SERVE_ROWS, TRAIN_PROBE_ROWS)))
        served = names.get(inference_dtype("auto", device, rows=SERVE_ROWS), "fp32")
        from_rows = bf16_upcast_rows()
        upcast = ("" if from_rows is None else
                  f"; bf16 weights multiply {from_rows} rows or more in fp32 here (a prompt read, a batch)")
        return Check("bf16", OK, f"CPU {kind}; a 3072x768 weight times {timed} in bf16 / fp32: {chosen} "
                                 f"(`serve --max-batch {SERVE_ROWS}`: {served}){upcast}")
    if device.type == "cuda":
        try:
            native = torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # PyTorch before 2.3 has no including_emulation
            native = torch.cuda.is_bf16_supported()
        if not native and train != "fp32":
            return Check("bf16", WARN, f"this GPU has no native bf16 (it is emulated, slowly): {chosen}",
                         "pass --train.precision fp32 to the training verbs and --dtype fp16 to generate/chat/serve")
        return Check("bf16", OK, f"{'native' if native else 'no'} bf16 on the GPU: {chosen}")
    return Check("bf16", OK, f"{device.type}: {chosen}")


def check_triton() -> Check:
    """Triton on CUDA (torch.compile and llmscratch's hand-written kernels compile with it); elsewhere not needed."""
    import torch

    from llmscratch.runtime import resolve_device

    device = resolve_device("auto")
    if device.type != "cuda":
        version = _version_of("triton")
        note = f" (triton {version} is installed: the kernel tests run it under its interpreter)" if version else ""
        return Check("triton", OK, f"not needed on {device.type}{note}")
    if getattr(torch.version, "hip", None):
        return Check("triton", OK, "ROCm: llmscratch's Triton kernels are not used there (PyTorch's ops run)")
    try:
        import triton
    except Exception as exc:  # noqa: BLE001
        return Check("triton", WARN, f"cannot import triton ({type(exc).__name__}: {exc}): torch.compile and "
                                     "llmscratch's GPU kernels are off",
                     "pip install triton (PyTorch's Linux CUDA wheels ship the matching version), or pass "
                     "--train.compile false")
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (7, 0):
        return Check("triton", WARN, f"triton {triton.__version__}, but the GPU is sm_{major}{minor}: Triton "
                                     "compiles for sm_70 and newer, so llmscratch's kernels are off",
                     "pass --train.compile false to the training verbs")
    return Check("triton", OK, f"triton {triton.__version__} (torch.compile and llmscratch's GPU kernels use it)")


# --- disk --------------------------------------------------------------------------------------------------
def free_bytes(folder: Path) -> int:
    """Bytes free to this user on the file system holding the existing folder `folder`."""
    return shutil.disk_usage(folder).free


def _size(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    return next((p for p in (path, *path.parents) if p.exists()), Path(path.anchor))


def _folder_check(name: str, path: Path, where: str, move: str) -> Check:
    """Free space and writability of the folder `path` (or, before it exists, of its nearest existing parent,
    which is where it would be made). `where` describes the path; `move` is how to put it on another disk."""
    existing = _nearest_existing(path)
    found = where if existing == path.absolute() else f"{where} (not created yet; checked {existing})"
    if not existing.is_dir():
        return Check(name, FAIL, f"{found}: {existing} is a file, not a folder", f"{move} (a folder path)")
    if not os.access(existing, os.W_OK | os.X_OK):
        return Check(name, FAIL, f"{found}: not writable (permission denied)",
                     f"chmod u+w {existing}, or {move}")
    free = free_bytes(existing)
    found = f"{found}: {_size(free)} free, writable"
    if free < FAIL_FREE_BYTES:
        return Check(name, FAIL, f"{found}; under {_size(FAIL_FREE_BYTES)}, a checkpoint save would fail",
                     f"free space on that disk, or {move}")
    if free < WARN_FREE_BYTES:
        return Check(name, WARN, f"{found}; under {_size(WARN_FREE_BYTES)}, too little for GPT-2 124M's "
                                 "download and checkpoints", f"free space on that disk, or {move}")
    return Check(name, OK, found)


def check_cache() -> Check:
    """llmscratch's cache (downloads, built corpora): `download.cache_dir()`."""
    from llmscratch.download import cache_dir

    folder = cache_dir()
    source = " (LLMSCRATCH_CACHE)" if os.environ.get("LLMSCRATCH_CACHE") else ""
    return _folder_check("cache", folder, f"{folder}{source}", "set LLMSCRATCH_CACHE to a folder on a larger disk")


def check_out(out: Path) -> Check:
    """The folder the user means to write runs and checkpoints into (`--out`)."""
    return _folder_check("out", Path(out), str(Path(out).absolute()), "choose an --out folder on another disk")


# --- GPT-2's BPE -------------------------------------------------------------------------------------------
_PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")
_NO_NETWORK = "http://127.0.0.1:1"  # a closed local port: every request through it fails at once
_CHILD = "from llmscratch.doctor import load_gpt2_offline; load_gpt2_offline()"


def _tiktoken_cache() -> str:
    """The folder tiktoken caches its downloads in (its lookup order: TIKTOKEN_CACHE_DIR, DATA_GYM_CACHE_DIR,
    then data-gym-cache in the temp folder)."""
    for variable in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if variable in os.environ:
            return os.environ[variable]
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def _downloaded_gpt2_folder() -> Path | None:
    """A folder of the cache where `llmscratch download gpt2-*` left GPT-2's two BPE files, or None."""
    from llmscratch.tokenizer.gpt2 import gpt2_files_in
    from llmscratch.weights.hub import MODELS, SOURCES, cache_folder

    for name, model in MODELS.items():
        for source in SOURCES if model.family == "gpt2" else ():
            if gpt2_files_in(folder := cache_folder(name, source)) is not None:
                return folder
    return None


def load_gpt2_offline() -> None:
    """What `check_gpt2_bpe`'s child process runs: load GPT-2's BPE as `load_tokenizer("gpt2")` does, and exit
    with a one-line reason when it cannot (0 when it can)."""
    from llmscratch.errors import UserError
    from llmscratch.tokenizer.gpt2 import gpt2_tokenizer

    try:
        gpt2_tokenizer()
    except UserError as exc:
        cause = exc.__context__  # what tiktoken raised (the UserError hides it with `from None`)
        if cause is None:
            sys.exit(str(exc))
        if type(cause).__module__.startswith(("requests", "urllib3")):  # it asked the (closed) network
            sys.exit("tiktoken's cache lacks the files, so loading them needs a download")
        sys.exit(f"tiktoken failed: {type(cause).__name__}: {cause}".splitlines()[0])


def check_gpt2_bpe(timeout: float = GPT2_TIMEOUT_S) -> Check:
    """Whether `load_tokenizer("gpt2")` (that is, `gpt2_tokenizer()`) works offline: run in a child process with
    the network closed to it, so a load that would need a download fails at once instead of downloading."""
    from llmscratch.tokenizer.gpt2 import ENV_VAR

    env = dict(os.environ, **{v: _NO_NETWORK for v in _PROXY_VARIABLES})
    env.pop("NO_PROXY", None)
    env.pop("no_proxy", None)
    folder = os.environ.get(ENV_VAR)
    source = f"the folder {ENV_VAR}={folder}" if folder else f"tiktoken's cache {_tiktoken_cache()}"
    try:
        child = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True,
                               timeout=timeout)
    except subprocess.TimeoutExpired:
        return Check("gpt2-bpe", WARN, f"loading GPT-2's BPE from {source} took over {timeout:.0f} s",
                     _gpt2_fix(folder))
    if child.returncode == 0:
        note = ""
        if not folder and Path(_tiktoken_cache()).is_relative_to(tempfile.gettempdir()):
            note = " (a temp folder a reboot may empty: set TIKTOKEN_CACHE_DIR to keep the files)"
        return Check("gpt2-bpe", OK, f"GPT-2's BPE loads offline from {source}{note}")
    lines = child.stderr.strip().splitlines()
    reason = lines[-1] if lines else f"exit code {child.returncode}"
    return Check("gpt2-bpe", WARN, f"GPT-2's BPE does not load offline from {source}: {reason}", _gpt2_fix(folder))


def _gpt2_fix(env_folder: str | None) -> str:
    """How to get GPT-2's encoder.json + vocab.bpe where `gpt2_tokenizer()` finds them without a network."""
    from llmscratch.tokenizer.gpt2 import ENV_VAR

    if env_folder:
        return (f"put encoder.json and vocab.bpe (from {GPT2_FILES_URL}) into {env_folder}, or unset {ENV_VAR} to "
                "use tiktoken's cache")
    downloaded = _downloaded_gpt2_folder()
    if downloaded is not None:
        return f"export {ENV_VAR}={downloaded} (a GPT-2 download already left the two files there)"
    return ("online, run `python -c \"import tiktoken; tiktoken.get_encoding('gpt2')\"` once (tiktoken caches "
            f"the files in {_tiktoken_cache()}); or copy encoder.json and vocab.bpe from {GPT2_FILES_URL} into a "
            f"folder and export {ENV_VAR}=that folder")


# --- optional extras ---------------------------------------------------------------------------------------
def installed(module: str) -> bool:
    """Whether `module` can be imported (found on the path; not imported, which for some takes seconds)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _version_of(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_extra(extra: Extra) -> Check:
    missing = [m for m in extra.modules if not installed(m)]
    if not missing:
        versions = ", ".join(f"{m} {_version_of(m) or ''}".strip() for m in extra.modules)
        return Check(f"extra {extra.name}", OK, f"installed: {versions}")
    found = f"{', '.join(missing)} not installed; used by {extra.used_by}"
    if not extra.needed:
        return Check(f"extra {extra.name}", OK, found)
    return Check(f"extra {extra.name}", WARN, found, extra.pip)
