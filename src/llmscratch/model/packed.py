"""CPU inference fast path: linear weights reordered once into oneDNN's blocked layout.

A batch-1 decode step is a chain of matrix-vector products, so its speed is the rate at which the weights
stream from memory. `F.linear` reads the plain (out, in) matrix; oneDNN (the CPU library behind PyTorch's
`mkldnn` ops) can pre-pack a weight into a blocked layout its kernels stream about twice as fast on the
AVX512 CPU of benchmarks/RESULTS.md. `torch.compile`'s CPU "freezing" does the same reorder; this
does it directly, with no compile time. The math is unchanged — y = x Wᵀ + b — and tests check it equals
`nn.Linear`.

Only for inference: a packed model cannot be trained or saved (its `nn.Linear` weights are gone).

Under `torch.compile` (`generate --compile`) the product is the operator `llmscratch::packed_linear`, which
inductor calls as it is while it fuses everything around it. Inductor's own lowering of oneDNN's linear takes
only weights frozen into the graph as constants; as an operator of ours the packed weight stays an input, so
one compiled graph serves every layer and the weights are never copied (generate.py). `lower_to_onednn_call`
then has inductor's generated code call oneDNN's operator itself rather than our operator's Python body.

bf16 weights on a CPU without bf16 instructions (AVX2 only): `--dtype auto` still picks bf16 there, since one row's
product streams half the bytes, but emulated bf16 arithmetic made many-row products (a prompt being read, a
server's batch) 3-6x slower than fp32. `UpcastLinear` keeps the bf16 weights and multiplies inputs of many rows
in fp32, the weights converted for the call; `pack_for_cpu_inference(where_faster=True)` puts it in where
`runtime.bf16_upcast_rows` measured that it pays.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from llmscratch.runtime import cpu_probe, return_freed_cpu_memory, time_calls


def can_pack(model: nn.Module) -> bool:
    """True when the model sits on the CPU in fp32/bf16 and this PyTorch build has oneDNN's linear ops."""
    p = next(model.parameters(), None)
    if p is None or p.device.type != "cpu" or p.dtype not in (torch.float32, torch.bfloat16):
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    ops = torch.ops.mkldnn
    if not (hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise")):
        return False
    # oneDNN's bf16 linear needs AVX-512 (BW, VL, DQ) or AMX; without them the reorder fails, and the plain
    # `F.linear` path is the one that runs.
    return p.dtype != torch.bfloat16 or bool(getattr(ops, "_is_mkldnn_bf16_supported", lambda: False)())


try:  # the overload itself, looked up once: ~3 µs a call less than through `torch.ops.mkldnn._linear_pointwise`
    _ONEDNN_LINEAR = torch.ops.mkldnn._linear_pointwise.default
except (AttributeError, RuntimeError):  # a PyTorch build without oneDNN: `can_pack` says False
    _ONEDNN_LINEAR = None

_LIB = torch.library.Library("llmscratch", "DEF")
_LIB.define("packed_linear(Tensor x, Tensor packed_weight, Tensor? bias, int out_features) -> Tensor")


_NO_POST_OP = ("none", [], "")  # oneDNN's linear with nothing fused after the product: (attr, scalars, algorithm)


def _packed_linear(x, packed_weight, bias, out_features: int):
    return _ONEDNN_LINEAR(x, packed_weight, bias, *_NO_POST_OP)


# "CompositeExplicitAutograd": one kernel for the CPU and oneDNN dispatch keys (a packed weight may be either).
_LIB.impl("packed_linear", _packed_linear, "CompositeExplicitAutograd")


@torch.library.register_fake("llmscratch::packed_linear", lib=_LIB)
def _packed_linear_shape(x, packed_weight, bias, out_features: int):
    """The output's shape and dtype, for tracing (the packed weight's own shape is oneDNN's business)."""
    return x.new_empty(*x.shape[:-1], out_features)


_LOWERED: bool | None = None  # whether `lower_to_onednn_call` took effect (None: not tried yet)


def lower_to_onednn_call() -> bool:
    """Have inductor compile `llmscratch::packed_linear` into a direct call of oneDNN's operator (an extern kernel
    call in the generated code) instead of a call of ours that reaches oneDNN through our Python body: one
    dispatch instead of two and no Python frame, ~5 µs less per product. With inductor's shape checks off too
    (generate.py), a compiled bf16 GPT-2 124M decoding step took 3.4–4.2% less time on a CPU
    (benchmarks/RESULTS.md). Returns whether the lowering is registered.

    It registers a lowering in inductor's table, an internal of PyTorch (`torch._inductor.lowering`, as of
    2.13). Where those names differ, nothing is registered; where the direct call cannot be built, the lowering
    builds the ordinary call of ours. Either way the result is the same, slower by those microseconds. Generated
    code holds no reference to the registration, so a compiled step from inductor's on-disk cache is right in
    any process.
    """
    global _LOWERED
    if _LOWERED is None:
        _LOWERED = _ONEDNN_LINEAR is not None and _register_lowering()  # no oneDNN in this build: nothing packed
    return _LOWERED


def _register_lowering() -> bool:
    try:
        from torch._inductor import lowering

        onednn = lowering.fallback_handler(_ONEDNN_LINEAR, add_to_fallback_set=False)
        ours = lowering.fallback_handler(torch.ops.llmscratch.packed_linear.default, add_to_fallback_set=False)

        def lower(x, packed_weight, bias, out_features):
            try:
                return onednn(x, packed_weight, bias, *_NO_POST_OP)
            except Exception:  # an inductor that lowers differently: our operator, called as it is
                return ours(x, packed_weight, bias, out_features)

        lowering.lowerings[torch.ops.llmscratch.packed_linear.default] = lower
        return True
    except (ImportError, AttributeError, TypeError):
        return False


@contextlib.contextmanager
def onednn_lowering_off() -> Iterator[None]:
    """While inside, inductor compiles `llmscratch::packed_linear` as a call of our operator, as before
    `lower_to_onednn_call`: AOTInductor's C++ code (model/aot.py) can call an operator only with arguments it
    can write out, and oneDNN's takes a list that it cannot."""
    if not _LOWERED:
        yield
        return
    from torch._inductor import lowering

    op = torch.ops.llmscratch.packed_linear.default
    saved = lowering.lowerings.pop(op, None)
    try:
        yield
    finally:
        if saved is not None:
            lowering.lowerings[op] = saved


class PackedLinear(nn.Module):
    """y = x Wᵀ + b with W held in oneDNN's packed layout (inference only)."""

    def __init__(self, linear: nn.Linear, batch_hint: int = 1):
        super().__init__()
        self.in_features, self.out_features, self.batch_hint = linear.in_features, linear.out_features, batch_hint
        weight = linear.weight.detach()
        # batch_hint tells oneDNN the expected number of rows: 1 picks the layout for matrix-vector products.
        self.register_buffer("packed_weight", torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint),
                             persistent=False)
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            # Rows in 2-D (a free view in the compiled graph), which oneDNN's op would otherwise reshape itself.
            y = torch.ops.llmscratch.packed_linear(x.reshape(-1, self.in_features), self.packed_weight, self.bias,
                                                   self.out_features)
            return y.view(*x.shape[:-1], self.out_features)
        # Eager: oneDNN directly, sparing the operator's dispatch through Python (~5 µs a call).
        return _packed_linear(x, self.packed_weight, self.bias, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, packed=oneDNN for "
                f"{self.batch_hint} row{'s' if self.batch_hint > 1 else ''}")


class UpcastLinear(nn.Linear):
    """An `nn.Linear` with bf16 weights whose products of `from_rows` rows or more run in fp32: the weights (and
    bias) converted for the call, the result cast back to bf16. Fewer rows multiply in bf16 as before. The same
    parameters stay in place (a tied LM head stays tied, the model saves as usual).

    Compiled with the number of rows a dynamic dimension (the server's compiled-ahead step, model/aot.py), both
    ways go into the graph and `torch.cond` picks one per call. Eagerly, a weight over `_UPCAST_CHUNK` elements
    (an LM head) is converted a block of output features at a time, so that the fp32 copy never holds all of
    it."""

    def __init__(self, linear: nn.Linear, from_rows: int):
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate a weight only to drop it
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias  # the same Parameter objects
        self.from_rows = from_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if isinstance(rows, int):  # eager, or compiled for a fixed number of rows
            return self._in_fp32(x) if rows >= self.from_rows else self._in_bf16(x)
        return torch.cond(rows >= self.from_rows, self._in_fp32, self._in_bf16, (x,))

    def _in_bf16(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def _in_fp32(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        step = self.out_features if torch.compiler.is_compiling() else max(1, _UPCAST_CHUNK // self.in_features)
        parts = []
        for start in range(0, self.out_features, step):
            w = self.weight[start:start + step].float()
            b = None if self.bias is None else self.bias[start:start + step].float()
            parts.append(F.linear(x32, w, b).to(x.dtype))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fp32 from {self.from_rows} rows"


_UPCAST_CHUNK = 1 << 24  # weight elements converted at once: a 64 MiB fp32 copy at most


def upcast_wide_products(model: nn.Module) -> int:
    """Swap each plain `nn.Linear` of a bf16 model on the CPU for an `UpcastLinear`, where this CPU multiplies
    many rows faster in fp32 (`runtime.bf16_upcast_rows`, measured once per CPU); returns how many were swapped
    (0 elsewhere: fp32 models, GPUs, CPUs with bf16 instructions)."""
    from llmscratch.runtime import bf16_upcast_rows

    p = next(model.parameters(), None)
    if p is None or p.device.type != "cpu" or p.dtype != torch.bfloat16:
        return 0
    from_rows = bf16_upcast_rows()
    if from_rows is None:
        return 0
    names = [name for name, mod in model.named_modules() if type(mod) is nn.Linear]
    model.eval().requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, UpcastLinear(getattr(parent, child), from_rows))
    return len(names)


def is_packed(model: nn.Module) -> bool:
    """True when some linear layer of `model` was packed for CPU inference (it can then be neither trained nor
    saved)."""
    return any(isinstance(m, PackedLinear) for m in model.modules())


def pack_for_cpu_inference(model: nn.Module, batch_hint: int = 1, where_faster: bool = False) -> int:
    """Swap every `nn.Linear` of `model` for a `PackedLinear`; returns how many were packed (0 if unsupported).

    `batch_hint`: the rows a call usually multiplies — 1 for one sequence decoded at a time; a server decoding
    up to N requests together passes N (for GPT-2 124M at 32 rows the layout for 32 made the linears ~18% faster
    than the one for 1, on the 2-core CPU of benchmarks/RESULTS.md).

    `where_faster` (what the CLI and the server ask for): pack only the layers whose shape multiplies faster
    packed on this CPU, as `packing_pays` measured it once per CPU model — so the default path is never slower
    than the plain one. On the AVX-512 EPYC of RESULTS.md packing doubled GPT-2's decoding speed; on an AVX2-only
    one it lost on small shapes, and on a Xeon with AMX the packed fp32 chain was slower than `F.linear`. With
    it, a bf16 model's linears left plain become `UpcastLinear`s where this CPU multiplies many rows faster in
    fp32 (`upcast_wide_products`)."""
    if not can_pack(model):
        if where_faster:
            upcast_wide_products(model)
        return 0
    model.eval().requires_grad_(False)
    names = [name for name, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    if where_faster:
        weights = {id(model.get_submodule(n).weight): model.get_submodule(n).weight for n in names}
        streamed = sum(w.numel() * w.element_size() for w in weights.values())  # what one step reads
        names = [n for n in names if packing_pays(model.get_submodule(n), batch_hint, streamed)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, PackedLinear(getattr(parent, child), batch_hint))
    if where_faster:
        upcast_wide_products(model)  # the bf16 linears left plain, on a CPU where that pays
    return_freed_cpu_memory()  # the replaced weights' pages
    return len(names)


# ---------------------------------------------------------------------------------------------------------
# whether packing pays on this CPU: measured once per CPU model, shape, dtype and thread count, then remembered

def packing_pays(linear: nn.Linear, batch_hint: int = 1, streamed: int = 0) -> bool:
    """Whether oneDNN's packed product of `linear`'s shape beats `F.linear` on this CPU, for `batch_hint` rows,
    in a model whose linears hold `streamed` bytes — all read once per decoding step, so that a weight comes from
    the cache when the model is small and from memory when it is not, which changes the answer: alone and
    cache-hot, GPT-2's 768×768 product ran faster plain (112 vs 145 µs on the AVX2 EPYC), streamed with the
    rest of the model faster packed.

    Measured (`measure_linear`) the first time a shape is seen on a CPU model — well under a second for GPT-2
    124M's five shapes — and kept by `runtime.cpu_probe`, keyed by CPU model, PyTorch version, thread count,
    dtype, shape, rows and the streamed size (rounded to a power of two), so every later command reads the
    answer. Packing has to be at least 3% faster to be chosen: a tie keeps the plain path."""
    working_set = _working_set(linear, streamed)
    what = "|".join([str(linear.weight.dtype).removeprefix("torch."), f"{linear.out_features}x{linear.in_features}",
                     f"rows {batch_hint}", f"streamed {working_set >> 20} MiB"])
    timing = cpu_probe(what, lambda: measure_linear(linear, batch_hint, working_set=working_set))
    return timing["packed_us"] < 0.97 * timing["plain_us"]


_MAX_WORKING_SET = 128 << 20  # far past any CPU's last-level cache: beyond it every weight comes from memory


def _working_set(linear: nn.Linear, streamed: int) -> int:
    """The bytes a measurement cycles through: the model's (at least this weight's), a power of two, capped."""
    own = linear.weight.numel() * linear.weight.element_size()
    size = min(max(streamed, own), _MAX_WORKING_SET)
    return 1 << max(0, size - 1).bit_length()


def measure_linear(linear: nn.Linear, batch_hint: int = 1, rounds: int = 5,
                   working_set: int = 0) -> dict[str, float]:
    """{"plain_us", "packed_us"}: the median time of one product of `linear` on `batch_hint` rows each way, over
    `rounds` interleaved rounds (`runtime.time_calls`). The product cycles through copies of the weight filling
    `working_set` bytes, so that, as in a decoding step of a model that size, a weight is read from the cache or
    from memory."""
    weight, bias = linear.weight.detach(), linear.bias.detach() if linear.bias is not None else None
    x = torch.randn(batch_hint, linear.in_features, dtype=weight.dtype)
    copies = max(1, working_set // (weight.numel() * weight.element_size()))
    plain = [weight.clone() for _ in range(copies)] if copies > 1 else [weight]
    packed = [torch.ops.mkldnn._reorder_linear_weight(w, batch_hint) for w in plain]
    turn = {"plain_us": 0, "packed_us": 0}

    def plain_call():
        turn["plain_us"] += 1
        return F.linear(x, plain[turn["plain_us"] % copies], bias)

    def packed_call():
        turn["packed_us"] += 1
        return _packed_linear(x, packed[turn["packed_us"] % copies], bias, linear.out_features)

    return time_calls({"plain_us": plain_call, "packed_us": packed_call}, rounds)
