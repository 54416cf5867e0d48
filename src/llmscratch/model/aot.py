"""A CPU decoding step compiled ahead of time (AOTInductor), kept on disk and reused by every later command.

Eager decoding pays PyTorch's per-operator cost a few hundred times a step: on the 2-core CPUs of
benchmarks/RESULTS.md it reached 65-80% of the weight-streaming bound for GPT-2 124M. `torch.compile` removes
most of that, but compiles in every process (~5 s warm, ~18 s cold): a wait a single `generate` rarely repays.
Here the step is compiled once per machine and model shape with AOTInductor (`torch.export` → C++ → a shared
library in a `.pt2` package) into the cache folder; loading it takes milliseconds and does not import the
compiler, so every later `generate` or `chat` of that shape decodes through it with no wait.

What one package serves:
- **every checkpoint of the shape**: weights and KV caches are the step's inputs, never baked in;
- **every generation length**: the KV cache's length is a dynamic dimension of the compiled code.
Its key (`step_key`) is everything the compiled code depends on: the config, the dtype, which linear layers are
packed (model/packed.py), the batch size, the PyTorch version, the CPU model and the source of this package
(the graph is that code, compiled).

When no package exists yet, `generate`/`chat` decode eagerly as before and start one building in a background
process at the lowest priority (`start_background_build`); the next command finds it. `LLMSCRATCH_COMPILED_STEPS`
chooses: `auto` (default: use, and build in the background when missing), `load` (use, never build), `off`.
The packed linears enter the compiled code as calls of our operator `llmscratch::packed_linear` (inductor's own
oneDNN node needs weights frozen into the graph, and oneDNN's operator cannot be written into AOTInductor's
calls with its argument list), which reaches oneDNN through model/packed.py.

Two kinds of step: "decode", one token for each of `batch_size` sequences at one position (`generate_ids`), and
"rows", one token for each of 1..`batch_size` rows at positions of their own (`RowPositions`: the server's
`DecodeBatch`, whose `batch_size` is its cache's rows, spare rows included), whose number of rows and of keys are
dynamic and whose cache length is fixed (a package per length the batch's cache grows to).

Not served (eager, as before): mixture-of-experts models (routing changes the shapes), sliding-window and latent
attention (caches of other shapes), training-mode models, GPUs (they have CUDA graphs: `generate --compile`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from llmscratch.model.attention import RowPositions

MODES = ("auto", "load", "off")
KINDS = ("decode", "rows")
ENV = "LLMSCRATCH_COMPILED_STEPS"
FOLDER = "compiled-steps"  # in llmscratch's cache folder (download.cache_dir)
_STALE_BUILD_S = 30 * 60  # a build marker older than this is from a build that died: try again
_MIN_CACHE = 16  # the compiled code's smallest KV-cache length (caches are made at least this long)


def mode() -> str:
    """`LLMSCRATCH_COMPILED_STEPS` (auto | load | off); an unknown value is taken as off."""
    value = os.environ.get(ENV, "auto").strip().lower()
    return value if value in MODES else "off"


def unsupported(model: nn.Module, batch_size: int = 1) -> str | None:
    """Why `model` cannot decode through a compiled-ahead step (a short reason), or None when it can."""
    cfg = getattr(model, "config", None)
    p = next(model.parameters(), None)
    if cfg is None or p is None:
        return "not a llmscratch GPT"
    if p.device.type != "cpu":
        return "not on the CPU"
    if p.dtype not in (torch.float32, torch.bfloat16):
        return f"dtype {p.dtype} (fp32 and bf16 only)"
    if model.training:
        return "in training mode"
    if cfg.n_experts or cfg.attention != "standard" or any(cfg.sliding_layers) or cfg.n_classes:
        return "a mixture-of-experts, latent-attention, sliding-window or classifier model"
    if not hasattr(getattr(torch._C, "_aoti", None), "AOTIModelPackageLoader"):
        return "this PyTorch build has no AOTInductor"
    return None


def _cache_tensor(name: str) -> bool:
    return ".kv_cache." in name


def step_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The step's tensor inputs by name, in a fixed order: the parameters (a tied one once), then the buffers —
    the packed weights and the KV caches among them."""
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    return tensors


@functools.cache
def _source_digest() -> str:
    """A digest of this package's source files: the compiled graph is their code."""
    h = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()[:16]


def step_key(model: nn.Module, batch_size: int = 1, kind: str = "decode", cache_len: int | None = None) -> str:
    """What a compiled step of `model` depends on, as a hex digest (see the module's docstring). `cache_len`: the
    KV cache's length, fixed for the "rows" kind only."""
    from llmscratch.runtime import cpu_features, cpu_model

    # The KV caches are left out: their shapes follow from the config, dtype and batch, and whether the model
    # holds one at the moment must not change the key.
    tensors = [(name, list(t.shape), str(t.dtype), str(t.layout))
               for name, t in step_tensors(model).items() if not _cache_tensor(name)]
    what = {
        "config": model.config.to_dict(),
        "batch": batch_size,
        "kind": kind,
        "cache_len": cache_len if kind == "rows" else None,
        "modules": [(name, type(m).__name__, getattr(m, "batch_hint", None), getattr(m, "from_rows", None))
                    for name, m in model.named_modules() if not name.endswith("kv_cache")],
        "tensors": tensors,
        "torch": torch.__version__,
        "cpu": [cpu_model(), cpu_features()],  # the generated code uses the vector instructions it was built for
        "source": _source_digest(),
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _folder() -> Path:
    from llmscratch.download import cache_dir

    return cache_dir() / FOLDER


def _files(key: str) -> dict[str, Path]:
    base = _folder() / key
    return {"package": base.with_suffix(".pt2"), "meta": base.with_suffix(".json"),
            "building": base.with_suffix(".building"), "failed": base.with_suffix(".failed"),
            "log": base.with_suffix(".log")}


class CompiledAheadStep:
    """`step(idx (B, 1), pos 0-dim tensor) -> logits (B, vocab)`: one decoding step through a loaded package,
    on the model's own weights and KV cache (set up before the first call, at least `_MIN_CACHE` long); the
    same call as `generate.CompiledDecodeStep`. `same_shapes`: the model's tensors are the ones of the previous
    call (one generation's steps), so the list of inputs is not gathered again."""

    on_gpu = False

    def __init__(self, model: nn.Module, loader, names: list[str]):
        self.model, self._loader, self._names = model, loader, names
        self._inputs: list[torch.Tensor] | None = None

    def __call__(self, idx: torch.Tensor, pos: torch.Tensor, same_shapes: bool = False) -> torch.Tensor:
        return self._loader.run([idx, pos, *self._tensors(same_shapes)])[0]

    def _tensors(self, same: bool) -> list[torch.Tensor]:
        if not same or self._inputs is None:  # the KV cache is made per generation: gather it again
            tensors = step_tensors(self.model)
            self._inputs = [tensors[name] for name in self._names]
        return self._inputs


class CompiledRowsStep(CompiledAheadStep):
    """`step(idx (n, 1), at: RowPositions) -> logits (n, vocab)`: one token for each of n rows of the model's KV
    cache, each at its own position, as `model(idx, input_pos=at)[:, -1]` computes it; for 1 <= n <= the batch
    size and fewer keys than the cache holds (`fits`). The model's tensors are gathered once: a `DecodeBatch`
    keeps its cache (a grown cache is another package)."""

    def fits(self, n: int, at: RowPositions, cache_len: int) -> bool:
        return 1 <= n <= self.batch_size and at.length < cache_len == self.cache_len and at.real is None

    def __call__(self, idx: torch.Tensor, at: RowPositions, same_shapes: bool = True) -> torch.Tensor:
        return self._loader.run([idx, at.positions, at.rows, at.mask, *self._tensors(same_shapes)])[0]


def load_step(model: nn.Module, batch_size: int = 1, kind: str = "decode",
              cache_len: int | None = None) -> CompiledAheadStep | None:
    """The compiled-ahead step for `model` from the cache folder, or None: none built yet for its key, the mode
    is off, or the model is not one this serves (`unsupported`). A package that fails to load is marked failed
    (not tried again) and None is returned: decoding then runs eagerly, as without one."""
    if mode() == "off" or unsupported(model, batch_size):
        return None
    key = step_key(model, batch_size, kind, cache_len)
    files = _files(key)
    if not files["package"].is_file() or files["failed"].exists():
        return None
    try:
        names = json.loads(files["meta"].read_text())["inputs"]
        if [n for n in step_tensors(model) if not _cache_tensor(n)] != [n for n in names if not _cache_tensor(n)]:
            return None
        loader = torch._C._aoti.AOTIModelPackageLoader(str(files["package"]), "model", False, 1, -1)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        _mark_failed(files, f"loading: {type(exc).__name__}: {exc}")
        return None
    step = (CompiledRowsStep if kind == "rows" else CompiledAheadStep)(model, loader, names)
    step.batch_size, step.cache_len = batch_size, cache_len
    return step


def _mark_failed(files: dict[str, Path], why: str) -> None:
    try:
        files["failed"].write_text(why.strip() + "\n")
    except OSError:
        pass


class _Step(nn.Module):
    """The step as a function of its tensors, for `torch.export`: the model's weights and caches are inputs."""

    def __init__(self, model: nn.Module, names: list[str]):
        super().__init__()
        # Not a submodule: its tensors would then be the exported program's state as well as its inputs.
        self._model, self.names = [model], names

    def forward(self, idx: torch.Tensor, pos: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
        state = dict(zip(self.names, tensors))
        return torch.func.functional_call(self._model[0], state, (idx,), {"input_pos": pos, "last_only": True})[:, -1]


class _RowsStep(_Step):
    """The "rows" step: each row at its own position (`RowPositions` rebuilt from its tensors)."""

    def forward(self, idx, positions, rows, mask, *tensors: torch.Tensor) -> torch.Tensor:
        at = RowPositions(positions, rows, None, mask.size(-1), mask, None)
        state = dict(zip(self.names, tensors))
        return torch.func.functional_call(self._model[0], state, (idx,), {"input_pos": at})[:, -1]


def build(model: nn.Module, batch_size: int = 1, kind: str = "decode", cache_len: int | None = None) -> Path:
    """Compile `model`'s step of `kind` for `batch_size` rows (a "rows" step: up to that many, with a KV cache of
    `cache_len`) into the cache folder (tens of seconds) and return the package's path. The model's KV cache is
    replaced by one for tracing, then cleared."""
    from llmscratch.fileio import atomic_write_text
    from llmscratch.model.packed import onednn_lowering_off

    why = unsupported(model, batch_size)
    if why:
        raise ValueError(f"no compiled step for this model: {why}")
    if kind not in KINDS or (kind == "rows" and (batch_size < 2 or not cache_len or cache_len < 8)):
        raise ValueError(f"a {kind!r} step for batch {batch_size}, cache {cache_len}: no such step")
    key = step_key(model, batch_size, kind, cache_len)
    files = _files(key)
    files["package"].parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    ctx = model.config.context_length
    model.setup_kv_cache(batch_size, cache_len if kind == "rows" else min(ctx, 2 * _MIN_CACHE))
    if model.config.position == "rope":  # computed and kept now, or tracing would keep fake tensors in the model
        for local in {False, model.config.rope_local_theta is not None}:
            model.inverse_frequencies(torch.device("cpu"), local)
    try:
        tensors = step_tensors(model)
        names = list(tensors)
        if kind == "rows":
            # n rows at 1..batch_size, over 2..cache_len - 1 keys (at the cache's full length the traced code
            # takes another branch, so that step runs eagerly)
            n = torch.export.Dim("rows", min=1, max=batch_size)
            keys = torch.export.Dim("keys", min=2, max=cache_len - 1)
            rows = min(3, batch_size)
            example = RowPositions.make([4] * rows, 1)  # 5 keys
            args = (torch.zeros(rows, 1, dtype=torch.long), example.positions, example.rows, example.mask)
            shapes = ({0: n}, {0: n}, {0: n}, {0: n, 3: keys}, tuple(None for _ in names))
            step = _RowsStep(model, names)
        else:
            length = torch.export.Dim("cache_length", min=min(_MIN_CACHE, ctx), max=ctx)
            shapes = (None, None, tuple({2: length} if _cache_tensor(n) else None for n in names))
            args = (torch.zeros(batch_size, 1, dtype=torch.long), torch.tensor(min(ctx, 2 * _MIN_CACHE) - 1))
            step = _Step(model, names)
        with torch.inference_mode():
            program = torch.export.export(step, (*args, *tensors.values()), dynamic_shapes=shapes, strict=False)
        from torch._inductor import aoti_compile_and_package

        tmp = files["package"].with_name(f".tmp-{os.getpid()}-{files['package'].name}")  # ends in .pt2, as it must
        try:
            with onednn_lowering_off(), torch.inference_mode():  # (with autograd on, it fails on the packed weights)
                aoti_compile_and_package(program, package_path=str(tmp))
            os.replace(tmp, files["package"])
        finally:
            tmp.unlink(missing_ok=True)
    finally:
        model.clear_kv_cache()
    atomic_write_text(files["meta"], json.dumps({"inputs": names, "batch": batch_size, "kind": kind,
                                                 "cache_len": cache_len,
                                                 "built_s": round(time.perf_counter() - start, 1),
                                                 "torch": torch.__version__}, indent=1) + "\n")
    return files["package"]


def start_background_build(model: nn.Module, batch_size: int = 1, kind: str = "decode",
                           cache_len: int | None = None) -> bool:
    """Start compiling `model`'s step for `batch_size` rows in a detached process at the lowest priority, unless
    the mode is not auto, one is built or being built, an earlier build failed, or the model is not served.
    Returns whether a build was started. The builder makes a model of the same config with random weights (the
    weights are inputs, so any will do), swaps its linears as `model`'s are (packed, upcast), and writes the
    package; its output goes to a `.log` beside it, a failure to a `.failed` marker that stops later tries."""
    if mode() != "auto" or unsupported(model, batch_size):
        return False
    key = step_key(model, batch_size, kind, cache_len)
    files = _files(key)
    if files["package"].exists() or files["failed"].exists():
        return False
    try:
        files["building"].parent.mkdir(parents=True, exist_ok=True)
        if files["building"].exists() and time.time() - files["building"].stat().st_mtime < _STALE_BUILD_S:
            return False
        files["building"].unlink(missing_ok=True)
        spec = {"key": key, "config": model.config.to_dict(), "batch": batch_size, "kind": kind,
                "cache_len": cache_len, "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                "linears": {name: [type(m).__name__, getattr(m, "batch_hint", None), getattr(m, "from_rows", None)]
                            for name, m in model.named_modules() if type(m).__name__ in _SWAPPED_LINEARS}}
        with open(files["building"], "x") as f:  # one builder per key, however many commands start at once
            json.dump(spec, f)
        with open(files["log"], "w") as log:
            subprocess.Popen([sys.executable, "-m", "llmscratch.model.aot", str(files["building"])],
                             stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    except OSError:  # a read-only cache folder, a race with another command: decode eagerly, build later
        return False
    return True


_SWAPPED_LINEARS = ("PackedLinear", "UpcastLinear")  # model/packed.py's stand-ins for nn.Linear, rebuilt by a builder


def _build_from_spec(spec_path: Path) -> int:
    """The background builder's body (`python -m llmscratch.model.aot SPEC`)."""
    from llmscratch.config import ModelConfig
    from llmscratch.model.packed import PackedLinear, UpcastLinear
    from llmscratch.model.transformer import GPT

    spec = json.loads(spec_path.read_text())
    files = _files(spec["key"])
    try:
        os.nice(19)  # (POSIX only)
    except (OSError, AttributeError):
        pass
    try:
        model = GPT(ModelConfig.from_dict(spec["config"])).to(getattr(torch, spec["dtype"])).eval()
        for name, (kind, batch_hint, from_rows) in spec["linears"].items():
            parent, _, child = name.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            linear = getattr(owner, child)
            swapped = (PackedLinear(linear, batch_hint) if kind == "PackedLinear"
                       else UpcastLinear(linear, from_rows))
            setattr(owner, child, swapped)
        model.requires_grad_(False)
        if step_key(model, spec["batch"], spec["kind"], spec["cache_len"]) != spec["key"]:
            raise ValueError("the rebuilt model's key differs from the command's (a different llmscratch or torch)")
        path = build(model, spec["batch"], spec["kind"], spec["cache_len"])
        print(f"built {path}")
        return 0
    except Exception as exc:  # recorded so that later commands do not try again with the same key
        _mark_failed(files, f"building: {type(exc).__name__}: {exc}")
        raise
    finally:
        spec_path.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(_build_from_spec(Path(sys.argv[1])))
