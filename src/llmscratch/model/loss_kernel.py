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
# autotuner). On an H100 (RESULTS.md) the first five per-block settings gave 1.67 ms for a 16,384 × 50,304 bf16
# chunk, against 2.84 ms for inductor's kernel of the PyTorch expression; the others were added after that
# measurement, and the autotuner keeps whichever is fastest. The interpreter has no timer: tests pick a setting.
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
        torch.library.wrap_triton(kernel)[(rows,)](logits, targets.contiguous(), losses, grad, n_cols, vocab,
                                                   logits.stride(0), **meta)
    return losses, grad


@torch.library.triton_op("llmscratch::cross_entropy_rows", mutates_args=())
def cross_entropy_rows(logits: torch.Tensor, targets: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(losses (c,) fp32, gradient (c, V) in the logits' dtype) for logits (c, V), targets (c,) in [0, vocab);
    columns ≥ vocab are padding. The gradient is that of the summed (not averaged) losses."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return _launch(logits, targets, vocab, _cross_entropy_rows_kernel, BLOCK=1024, LANEWISE=False)
    return _launch(logits, targets, vocab, _tuned_kernel)
