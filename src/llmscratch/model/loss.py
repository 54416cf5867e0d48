"""Next-token cross-entropy fused with the LM head, computed in row chunks.

The plain way — `F.cross_entropy(h @ Wᵀ, y)` — materialises (N, vocab) logits, their softmax and the same-sized
gradient: for GPT-2's 50,257-token vocabulary that is the largest tensor of a training step and, on a CPU, a
large share of its time. Here the rows are processed `chunk_size` at a time: a chunk's logits give its loss
and, right away, its gradients (softmax − one-hot), which are folded into grad_h and grad_W before the next
chunk. Nothing vocab-sized outlives a chunk, and backward only scales the stored gradients by the incoming one.

GPU matrix units want the product's dimensions aligned: GPT-2's 50,257-token vocabulary is odd, so with
`pad_vocab_to=m` the LM-head weight is padded inside this function with zero rows up to a multiple of m (50,304
for m=64) and those columns' logits are set to −∞ before the softmax. They add nothing to the loss, get zero
gradient, and exist only here: the model's parameters, its checkpoints and its logits keep the real vocabulary,
so a padding id can never be sampled.

On CUDA, when Triton is installed (PyTorch's CUDA builds ship it) and the caller asks for it (`use_kernel`, the
model's `ModelOptions.loss_kernel`), a chunk's losses and gradient come from a hand-written Triton kernel
(`model/kernels.py`) that reads the logits once from device memory; elsewhere, from the PyTorch expressions
below.

`lm_head_cross_entropy_reference` is the plain formula; tests check that both give the same loss and grads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmscratch.model.dispatch import triton_kernels


def lm_head_cross_entropy_reference(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                    ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of logits h @ weightᵀ (h: (N, d), weight: (V, d), targets: (N,))."""
    logits = (h @ weight.t()).float()  # (N, V)
    return F.cross_entropy(logits, targets, ignore_index=ignore_index)


def _losses_and_logit_grads(logits: torch.Tensor, y: torch.Tensor, vocab: int, need_grad: bool,
                            one_pass: bool, use_kernel: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row cross-entropy of one chunk's logits (c, V [+ padding columns]) and, with `need_grad`, its
    gradient d(sum of losses)/d(logits) = softmax − one_hot(y), both from fp32 softmax statistics; columns from
    `vocab` on are padding (probability 0, gradient 0). The 1/n_valid is applied in backward.

    Two spellings of the same arithmetic. Eager (`one_pass=False`): log-softmax once, exponentiate it in place
    and subtract the one-hot with a scatter — the fewest temporaries, the fastest on a CPU. Under torch.compile
    (`one_pass=True`): the gradient is one elementwise expression of the logits and the row's log-sum-exp, with
    no scatter, which inductor fuses with the log-sum-exp into one kernel that reads the bf16 logits and writes
    the bf16 gradient. The eager spelling made it write fp32 log-probabilities and convert them in a second
    kernel; the one-pass spelling made a compiled GPT-2 training step on CUDA ~5% faster (benchmarks/RESULTS.md).
    In eager mode the one-pass spelling is 1.3x slower on a CPU (more vocab-sized temporaries). With a gradient
    on CUDA and `use_kernel`, both give way to the Triton kernel of kernels.py (the same arithmetic, one read of
    the logits).
    """
    kernels = triton_kernels(logits) if need_grad and use_kernel else None
    if kernels is not None:
        return kernels.cross_entropy_rows(logits, y, vocab)
    rows = torch.arange(logits.size(0), device=logits.device)
    if one_pass:
        z = logits.float()
        cols = torch.arange(z.size(1), device=z.device)
        if z.size(1) > vocab:
            z = z.masked_fill(cols >= vocab, float("-inf"))
        lse = torch.logsumexp(z, dim=-1)
        losses = lse - z[rows, y]
        g = torch.exp(z - lse[:, None]) - (cols == y[:, None]).float() if need_grad else None
        return losses, g
    if logits.size(1) > vocab:
        logits[:, vocab:] = float("-inf")
    logp = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
    losses = -logp[rows, y]
    if not need_grad:
        return losses, None
    g = logp.exp_()
    g[rows, y] -= 1.0
    return losses, g


class _ChunkedLMHeadCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, chunk_size: int, ignore_index: int, need_grad: bool, pad_vocab_to: int,
                use_kernel: bool):
        dev = h.device.type
        # Under autocast the products run in its dtype (bf16); the weight is cast once per call, not per chunk.
        dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
        vocab = weight.size(0)
        pad = -vocab % pad_vocab_to if pad_vocab_to > 1 else 0
        with torch.autocast(dev, enabled=False):
            hc, wc = h.to(dt), weight.to(dt)
            if pad:
                wc = F.pad(wc, (0, 0, 0, pad))  # (vocab + pad, d); the extra rows are zeros
            valid = targets != ignore_index  # (N,)
            y = targets.masked_fill(~valid, 0)
            n_valid = valid.sum()  # stays on the device: no host sync
            n = h.size(0)
            grad_h = torch.empty(h.shape, dtype=dt, device=h.device) if need_grad else None
            grad_w = torch.zeros(wc.shape, dtype=torch.float32, device=h.device) if need_grad else None
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            one_pass = torch.compiler.is_compiling()
            for s in range(0, n, chunk_size):
                e = min(n, s + chunk_size)
                h_c, y_c, ok = hc[s:e], y[s:e], valid[s:e]
                # The only vocab-sized tensors, one chunk at a time.
                losses, g = _losses_and_logit_grads(h_c @ wc.t(), y_c, vocab, need_grad, one_pass, use_kernel)
                total += (losses * ok).sum()
                if need_grad:
                    g = g.to(dt)
                    keep = ok[:, None].to(dt)  # ignored rows contribute nothing: mask the narrow (c, d) sides
                    torch.mm(g, wc, out=grad_h[s:e])
                    grad_h[s:e] *= keep
                    grad_w.add_(torch.mm(g.t(), h_c * keep))
        if need_grad:
            if pad:
                grad_w = grad_w[:vocab]
            ctx.save_for_backward(grad_h, grad_w, n_valid)
            ctx.dtypes = (h.dtype, weight.dtype)
        return total / n_valid  # NaN when every row is ignored, like F.cross_entropy

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, n_valid = ctx.saved_tensors
        scale = grad_out / n_valid
        return (grad_h.to(ctx.dtypes[0]) * scale.to(ctx.dtypes[0]), grad_w.to(ctx.dtypes[1]) * scale.to(ctx.dtypes[1]),
                None, None, None, None, None, None)


def lm_head_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          chunk_size: int | None = None, ignore_index: int = -100,
                          pad_vocab_to: int | None = None, use_kernel: bool = True) -> torch.Tensor:
    """Mean cross-entropy of h @ weightᵀ against `targets` without materialising the full logits.

    h: (N, d) final hidden states; weight: (V, d) the LM head; targets: (N,) ids, `ignore_index` to skip a row.
    Like `F.cross_entropy`, the mean over zero valid rows is NaN. `pad_vocab_to` (default: 64 on CUDA, none
    elsewhere) pads the vocabulary inside the computation for aligned matrix products (see the module notes).
    `chunk_size` rows per step (default: 1,024 on a CPU, where the small chunks stay in cache; 16,384 on CUDA,
    where one chunk per GPT-2 micro-batch measured 3.5% faster under torch.compile — benchmarks/RESULTS.md).
    `use_kernel`: with a gradient on CUDA, a chunk's losses and logit gradients from the Triton kernel where it
    is available (the model passes its `ModelOptions.loss_kernel`); False keeps the PyTorch expressions.
    """
    if pad_vocab_to is None:
        pad_vocab_to = 64 if h.is_cuda else 1
    if chunk_size is None:
        chunk_size = 16384 if h.is_cuda else 1024
    need_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    return _ChunkedLMHeadCE.apply(h, weight, targets, chunk_size, ignore_index, need_grad, pad_vocab_to,
                                  use_kernel)
