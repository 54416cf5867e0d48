"""Hand-written Triton kernels for the CUDA training path, each beside the PyTorch spelling it replaces.

On a GPU the steps between matrix products are pure memory traffic, so what matters is how often a kernel
touches device memory. `llmscratch.model.dispatch.triton_kernels(t)` hands this module to callers on NVIDIA GPUs when
Triton imports (PyTorch's CUDA builds ship it); elsewhere they keep their PyTorch spelling. Each kernel is a
`torch.library.triton_op`, so `torch.compile` traces it as a call. On a CPU the kernels run only under Triton's
interpreter (TRITON_INTERPRET=1), which is how tests/model/test_kernels.py checks them without a GPU.

`cross_entropy_rows` — the fused LM-head loss (`model/loss.py`) computes a chunk's logits (c, V) with one
matrix product and then needs, per row, the loss lse(z) − z[y] and the gradient softmax(z) − one_hot(y); for a
GPT-2 micro-batch of 16,384 rows the bf16 logits are 1.65 GB. Each row goes to one program, which walks the
row twice: first a running max and sum of exponentials (the log-sum-exp, rescaled whenever the max grows), then
the gradient, written block by block. A row is 100 KB and only a few rows per multiprocessor are in flight, so
the second walk finds the row in the L2 cache: device memory sees one read of the logits and one write of the
gradient. Columns from `vocab` on are padding (the LM head is padded to a multiple of 64 for aligned products):
they are left out of the sums and get gradient 0.

`gelu_bias` — GPT-2's feed-forward net adds the fc bias and applies GELU (tanh form) to a (rows, 4·d) product
(`model/layers.py`, `GELUMLP`). Inductor computes the backward as two kernels, one writing the gradient of the
pre-activation and one reading it back for the bias gradient's column sums. Here one kernel does both: each
program writes its tile's gradient and the tile's column sums, and a small sum over tiles finishes the bias
gradient. On in compiled training steps (`ModelOptions.gelu_kernel`), where it made the step slightly faster
(benchmarks/RESULTS.md).

`qkv_projection` — attention's fused q/k/v product is split into per-head views; its backward gets three
head-major gradients (B, heads, T, head_dim) from the attention kernel, and inductor copies them into one
row-major gradient in one kernel and reads that back for the bias gradient in another. `heads_to_rows` does both
in one pass, and the products for x and W follow. Off (`ModelOptions.qkv_kernel`): it made no measurable
difference to the step, though it trims peak memory a little (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


def _tuned_or_fixed(tuned, fixed, **fixed_meta):
    """(kernel, settings): the autotuned kernel, or under Triton's interpreter, which has no timer to tune with,
    the plain kernel with fixed settings."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return fixed, fixed_meta
    return tuned, {}


def _run(kernel, grid, first: torch.Tensor, *args, **meta) -> None:
    """Launch `kernel` on the GPU that holds `first` (Triton launches on the current device, which need not be
    the tensors' one)."""
    with torch.cuda.device(first.device) if first.is_cuda else contextlib.nullcontext():
        torch.library.wrap_triton(kernel)[grid](first, *args, **meta)


@triton.jit
def _load_row_block(src, cols, n_cols, vocab):
    """One block of a row's logits in fp32, padding columns (≥ vocab) as −∞. The load is masked at the row's
    end, not at `vocab`: n_cols is a multiple of 64 on CUDA, so the mask is uniform over each group of 8 bf16
    values and Triton emits 16-byte loads; masked at vocab (50,257 for GPT-2), it emitted one 2-byte load per
    value (seen in the compiled code)."""
    z = tl.load(src + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
    return tl.where(cols < vocab, z, float("-inf"))


@triton.jit
def _cross_entropy_rows_kernel(logits_ptr, targets_ptr, losses_ptr, grad_ptr, n_cols, vocab, row_stride,
                               BLOCK: tl.constexpr, LANEWISE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    src = logits_ptr + row * row_stride
    dst = grad_ptr + row * row_stride
    offs = tl.arange(0, BLOCK)
    # Walk 1: log-sum-exp over the real vocabulary, as a running max m and sum s of exp(z − m), in one of two
    # ways (the autotuner times both): per block, reducing each block across the program's threads; or
    # LANEWISE, each of the BLOCK lanes keeping its own m and s, with one exponential per element (exp(−|z − m|)
    # serves both cases: a new max rescales the sum, else z adds to it), reduced across lanes once at the end.
    if LANEWISE:
        m_lane = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
        s_lane = tl.zeros((BLOCK,), dtype=tl.float32)
        for start in range(0, vocab, BLOCK):
            cols = start + offs
            z = _load_row_block(src, cols, n_cols, vocab)
            e = tl.where(z == float("-inf"), 0.0, tl.exp(-tl.abs(z - m_lane)))  # −∞ lanes: no −∞ − −∞
            s_lane = tl.where(z > m_lane, s_lane * e + 1.0, s_lane + e)
            m_lane = tl.maximum(m_lane, z)
        m = tl.max(m_lane, axis=0)
        s = tl.sum(s_lane * tl.exp(m_lane - m), axis=0)  # lanes that saw only padding hold s = 0
    else:
        m = tl.full((), float("-inf"), dtype=tl.float32)  # the first block has a real (finite) logit
        s = tl.zeros((), dtype=tl.float32)
        for start in range(0, vocab, BLOCK):
            cols = start + offs
            z = _load_row_block(src, cols, n_cols, vocab)
            m_new = tl.maximum(m, tl.max(z, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
            m = m_new
    lse = m + tl.log(s)
    target = tl.load(targets_ptr + row)
    tl.store(losses_ptr + row, lse - tl.load(src + target).to(tl.float32))
    # Walk 2, last block first (the most recently read, likeliest still in cache): softmax − one-hot.
    n_blocks = tl.cdiv(n_cols, BLOCK)
    for i in range(0, n_blocks):
        cols = (n_blocks - 1 - i) * BLOCK + offs
        z = _load_row_block(src, cols, n_cols, vocab)
        g = tl.exp(z - lse) - tl.where(cols == target, 1.0, 0.0)
        tl.store(dst + cols, g.to(grad_ptr.dtype.element_ty), mask=cols < n_cols)


# Block width, warps per program and the walk-1 scheme, chosen by timing each once per vocabulary width (Triton's
# autotuner). The first five per-block settings were measured well ahead of inductor's kernel for the PyTorch
# expression on a GPT-2 chunk (benchmarks/RESULTS.md); the others were added after that measurement, and the
# autotuner keeps whichever is fastest. The interpreter has no timer: tests pick a setting.
_SETTINGS = ((2048, 8), (4096, 8), (4096, 16), (8192, 16), (8192, 32), (1024, 4), (2048, 4), (4096, 4))
_tuned_kernel = triton.autotune(
    configs=[triton.Config({"BLOCK": b, "LANEWISE": lane}, num_warps=w) for lane in (False, True)
             for b, w in _SETTINGS],
    key=["n_cols"])(_cross_entropy_rows_kernel)


def _launch(logits: torch.Tensor, targets: torch.Tensor, vocab: int, kernel, **meta):
    logits = logits.contiguous()
    rows, n_cols = logits.shape
    losses = torch.empty(rows, dtype=torch.float32, device=logits.device)
    grad = torch.empty_like(logits)
    if rows:
        _run(kernel, (rows,), logits, targets.contiguous(), losses, grad, n_cols, vocab, logits.stride(0), **meta)
    return losses, grad


@torch.library.triton_op("llmscratch::cross_entropy_rows", mutates_args=())
def cross_entropy_rows(logits: torch.Tensor, targets: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(losses (c,) fp32, gradient (c, V) in the logits' dtype) for logits (c, V), targets (c,) in [0, vocab);
    columns ≥ vocab are padding. The gradient is that of the summed (not averaged) losses."""
    kernel, meta = _tuned_or_fixed(_tuned_kernel, _cross_entropy_rows_kernel, BLOCK=1024, LANEWISE=False)
    return _launch(logits, targets, vocab, kernel, **meta)


# --- GELU (tanh form) with the bias added first, and its backward with the bias gradient ------------------------

_GELU_ROWS = 32  # rows per program; the backward's column sums come one row of partials per 32 rows


@triton.jit
def _gelu_and_slope(x):
    """0.5·x·(1 + tanh(u)) with u = √(2/π)·(x + 0.044715·x³), and its derivative in x."""
    u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    t = 1.0 - 2.0 / (1.0 + tl.exp(2.0 * u))  # tanh(u); exp overflowing to inf gives 1, underflowing gives −1
    slope = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * x * x)
    return 0.5 * x * (1.0 + t), slope


@triton.jit
def _tile(pid_m, pid_n, n_rows, n_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
    return cols, offs, (rows < n_rows)[:, None] & (cols < n_cols)[None, :]


@triton.jit
def _gelu_bias_kernel(h_ptr, bias_ptr, out_ptr, n_rows, n_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    cols, offs, mask = _tile(tl.program_id(0), tl.program_id(1), n_rows, n_cols, BLOCK_M, BLOCK_N)
    b = tl.load(bias_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    x = tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32) + b[None, :]
    y, _ = _gelu_and_slope(x)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gelu_bias_backward_kernel(grad_ptr, h_ptr, bias_ptr, grad_h_ptr, partial_ptr, n_rows, n_cols,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    cols, offs, mask = _tile(pid_m, tl.program_id(1), n_rows, n_cols, BLOCK_M, BLOCK_N)
    b = tl.load(bias_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    x = tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32) + b[None, :]
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    _, slope = _gelu_and_slope(x)
    gh = tl.where(mask, g * slope, 0.0)
    tl.store(grad_h_ptr + offs, gh.to(grad_h_ptr.dtype.element_ty), mask=mask)
    tl.store(partial_ptr + pid_m.to(tl.int64) * n_cols + cols, tl.sum(gh, axis=0), mask=cols < n_cols)


_GELU_CONFIGS = [triton.Config({"BLOCK_N": n}, num_warps=w) for n, w in ((128, 4), (256, 4), (256, 8), (512, 8))]
_gelu_bias_tuned = triton.autotune(configs=_GELU_CONFIGS, key=["n_cols"])(_gelu_bias_kernel)
_gelu_bias_backward_tuned = triton.autotune(configs=_GELU_CONFIGS, key=["n_cols"])(_gelu_bias_backward_kernel)


def _gelu_grid(n_rows: int, n_cols: int):
    return lambda meta: (triton.cdiv(n_rows, _GELU_ROWS), triton.cdiv(n_cols, meta["BLOCK_N"]))


@torch.library.triton_op("llmscratch::gelu_bias", mutates_args=())
def gelu_bias(h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """GELU (tanh form) of h + bias, in h's dtype (computed in fp32); h (..., n), bias (n,)."""
    h = h.contiguous()
    out = torch.empty_like(h)
    n_cols = h.size(-1)
    n_rows = h.numel() // n_cols if n_cols else 0
    if n_rows:
        kernel, meta = _tuned_or_fixed(_gelu_bias_tuned, _gelu_bias_kernel, BLOCK_N=128)
        _run(kernel, _gelu_grid(n_rows, n_cols), h, bias, out, n_rows, n_cols, BLOCK_M=_GELU_ROWS, **meta)
    return out


@torch.library.triton_op("llmscratch::gelu_bias_backward", mutates_args=())
def gelu_bias_backward(grad: torch.Tensor, h: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(gradient for h, gradient for bias) of gelu_bias(h, bias) given the output's gradient."""
    grad, h = grad.contiguous(), h.contiguous()
    grad_h = torch.empty_like(h)
    n_cols = h.size(-1)
    n_rows = h.numel() // n_cols if n_cols else 0
    # one row of column sums per program row, every entry written by the kernel
    partial = torch.empty((triton.cdiv(n_rows, _GELU_ROWS), n_cols), dtype=torch.float32, device=h.device)
    if n_rows:
        kernel, meta = _tuned_or_fixed(_gelu_bias_backward_tuned, _gelu_bias_backward_kernel, BLOCK_N=128)
        _run(kernel, _gelu_grid(n_rows, n_cols), grad, h, bias, grad_h, partial, n_rows, n_cols,
             BLOCK_M=_GELU_ROWS, **meta)
    return grad_h, partial.sum(0).to(bias.dtype)


def _gelu_bias_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _gelu_bias_grads(ctx, grad):
    h, bias = ctx.saved_tensors
    return gelu_bias_backward(grad, h, bias)


gelu_bias.register_autograd(_gelu_bias_grads, setup_context=_gelu_bias_setup)


# --- The fused q/k/v projection's backward: three head-major gradients into one row-major one, with bias sums ----

_QKV_ROWS = 64  # rows (tokens) per program


@triton.jit
def _heads_to_rows_kernel(src_ptr, dst_ptr, partial_ptr, n_rows, seq_len, stride_b, stride_h, stride_t,
                          dst_cols, col0, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr):
    """src (B, heads, T, HEAD_DIM) with any strides but a contiguous last dim → dst[b·T + t, col0 + h·HEAD_DIM + d]
    (row-major, dst_cols wide), and each tile's column sums into partial[tile row, col0 + …]."""
    pid_m, h = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, HEAD_DIM)
    b, t = (rows // seq_len).to(tl.int64), (rows % seq_len).to(tl.int64)
    mask = (rows < n_rows)[:, None]
    x = tl.load(src_ptr + (b * stride_b + h * stride_h + t * stride_t)[:, None] + d[None, :], mask=mask, other=0.0)
    cols = col0 + h * HEAD_DIM + d
    tl.store(dst_ptr + rows.to(tl.int64)[:, None] * dst_cols + cols[None, :], x, mask=mask)
    tl.store(partial_ptr + pid_m.to(tl.int64) * dst_cols + cols, tl.sum(x.to(tl.float32), axis=0))


@torch.library.triton_op("llmscratch::heads_to_rows", mutates_args=())
def heads_to_rows(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of q, k, v (each (B, heads, T, head_dim), head_dim a power of two) as the gradient of the
    fused projection's output, (B·T, (q heads + 2·kv heads)·head_dim) in [q | k | v] column order, and its column
    sums in fp32 (the projection bias's gradient)."""
    batch, _, seq_len, head_dim = dq.shape
    n_rows = batch * seq_len
    widths = [t.size(1) * head_dim for t in (dq, dk, dv)]
    dst_cols = sum(widths)
    dst = torch.empty((n_rows, dst_cols), dtype=dq.dtype, device=dq.device)
    partial = torch.empty((triton.cdiv(n_rows, _QKV_ROWS), dst_cols), dtype=torch.float32, device=dq.device)
    col0 = 0
    for src, width in zip((dq, dk, dv), widths):
        if src.stride(-1) != 1:
            src = src.contiguous()
        if n_rows:
            _run(_heads_to_rows_kernel, (triton.cdiv(n_rows, _QKV_ROWS), src.size(1)), src, dst, partial, n_rows,
                 seq_len, src.stride(0), src.stride(1), src.stride(2), dst_cols, col0, BLOCK_M=_QKV_ROWS,
                 HEAD_DIM=head_dim, num_warps=4)
        col0 += width
    return dst, partial.sum(0)


class QKVProjection(torch.autograd.Function):
    """x (B, T, d) @ Wᵀ + b split into q (B, nh, T, hs), k and v (B, nkv, T, hs) — views of the one product — with
    a backward that assembles their gradients and the bias gradient in one pass (`heads_to_rows`) before the two
    products for x and W. Autocast applies inside as it would outside (the products in bf16)."""

    @staticmethod
    def forward(ctx, x, weight, bias, n_heads: int, n_kv_heads: int, head_dim: int):
        batch, seq_len, _ = x.shape
        out = F.linear(x, weight, bias)  # autocast: bf16, bias added in the product's epilogue
        q, k, v = out.split([n_heads * head_dim, n_kv_heads * head_dim, n_kv_heads * head_dim], dim=-1)
        ctx.save_for_backward(x, weight)
        ctx.bias_dtype = bias.dtype
        ctx.compute_dtype = out.dtype
        return tuple(t.view(batch, seq_len, -1, head_dim).transpose(1, 2) for t in (q, k, v))

    @staticmethod
    def backward(ctx, dq, dk, dv):
        x, weight = ctx.saved_tensors
        dt = ctx.compute_dtype
        grad_out, grad_bias = heads_to_rows(dq.to(dt), dk.to(dt), dv.to(dt))  # (B·T, width), (width,)
        x2 = x.reshape(-1, x.size(-1)).to(dt)
        grad_x = (grad_out @ weight.to(dt)).view(x.shape).to(x.dtype)
        grad_w = (grad_out.t() @ x2).to(weight.dtype)
        return grad_x, grad_w, grad_bias.to(ctx.bias_dtype), None, None, None


def qkv_projection(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, n_heads: int, n_kv_heads: int,
                   head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return QKVProjection.apply(x, weight, bias, n_heads, n_kv_heads, head_dim)
