"""A Triton kernel for the fused LM-head loss: per-row cross-entropy and its gradient from one chunk's logits.

`model/loss.py` computes a chunk's logits (c, V) with one matrix product and then needs, per row, the loss
lse(z) − z[y] and the gradient softmax(z) − one_hot(y). On a GPU that step is pure memory traffic — for a
GPT-2 micro-batch of 16,384 rows the bf16 logits are 1.65 GB — so what matters is how often it touches device
memory. This kernel gives each row to one program, which walks the row twice: first a running max and sum of
exponentials (the log-sum-exp, rescaled whenever the max grows), then the gradient, written block by block.
A row is 100 KB, and only about one row per multiprocessor is in flight, so the second walk finds the row in
the L2 cache: device memory sees one read of the logits and one write of the gradient.

Columns from `vocab` on are padding (the LM head is padded to a multiple of 64 for aligned products): they are
left out of the sums and get gradient 0. The op is registered with `torch.library.triton_op`, so
`torch.compile` traces it as one call; `loss.py` uses it on CUDA when Triton is installed (it ships with
PyTorch's CUDA builds), and keeps its PyTorch spellings elsewhere. On a CPU the kernel runs only under Triton's
interpreter (TRITON_INTERPRET=1), which is how the tests check it without a GPU.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _cross_entropy_rows_kernel(logits_ptr, targets_ptr, losses_ptr, grad_ptr, n_cols, vocab, row_stride,
                               BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    src = logits_ptr + row * row_stride
    dst = grad_ptr + row * row_stride
    offs = tl.arange(0, BLOCK)
    # Walk 1: log-sum-exp over the real vocabulary, as a running max m and sum s of exp(z − m).
    m = tl.full((), float("-inf"), dtype=tl.float32)  # the first block has a real (finite) logit: no −∞ − −∞
    s = tl.zeros((), dtype=tl.float32)
    for start in range(0, vocab, BLOCK):
        cols = start + offs
        z = tl.load(src + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
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
        z = tl.load(src + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
        g = tl.exp(z - lse) - tl.where(cols == target, 1.0, 0.0)
        tl.store(dst + cols, g.to(grad_ptr.dtype.element_ty), mask=cols < n_cols)


# Block width and warps per program, chosen by timing each once per vocabulary width (Triton's autotuner). The
# interpreter has no timer: there the kernel runs with one small block.
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
_tuned_kernel = triton.autotune(
    configs=[triton.Config({"BLOCK": b}, num_warps=w) for b, w in ((2048, 8), (4096, 8), (4096, 16), (8192, 16),
                                                                    (8192, 32))],
    key=["n_cols"])(_cross_entropy_rows_kernel)


@torch.library.triton_op("llmscratch::cross_entropy_rows", mutates_args=())
def cross_entropy_rows(logits: torch.Tensor, targets: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(losses (c,) fp32, gradient (c, V) in the logits' dtype) for logits (c, V), targets (c,) in [0, vocab);
    columns ≥ vocab are padding. The gradient is that of the summed (not averaged) losses."""
    logits = logits.contiguous()
    rows, n_cols = logits.shape
    losses = torch.empty(rows, dtype=torch.float32, device=logits.device)
    grad = torch.empty_like(logits)
    if rows:
        args = (logits, targets.contiguous(), losses, grad, n_cols, vocab, logits.stride(0))
        if _INTERPRETED:
            torch.library.wrap_triton(_cross_entropy_rows_kernel)[(rows,)](*args, BLOCK=1024)
        else:
            torch.library.wrap_triton(_tuned_kernel)[(rows,)](*args)
    return losses, grad
