"""Next-token cross-entropy fused with the LM head, computed in row chunks.

The plain way — `F.cross_entropy(h @ Wᵀ, y)` — materialises (N, vocab) logits, their softmax and the same-sized
gradient: for GPT-2's 50,257-token vocabulary that is the largest tensor of a training step and, on a CPU, a
large share of its time. Here the rows are processed `chunk_size` at a time: a chunk's logits give its loss
and, right away, its gradients (softmax − one-hot), which are folded into grad_h and grad_W before the next
chunk. Nothing vocab-sized outlives a chunk, and backward only scales the stored gradients by the incoming one.

`lm_head_cross_entropy_reference` is the plain formula; tests check that both give the same loss and grads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lm_head_cross_entropy_reference(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                    ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of logits h @ weightᵀ (h: (N, d), weight: (V, d), targets: (N,))."""
    logits = (h @ weight.t()).float()  # (N, V)
    return F.cross_entropy(logits, targets, ignore_index=ignore_index)


class _ChunkedLMHeadCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, chunk_size: int, ignore_index: int, need_grad: bool):
        dev = h.device.type
        # Under autocast the products run in its dtype (bf16); the weight is cast once per call, not per chunk.
        dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
        with torch.autocast(dev, enabled=False):
            hc, wc = h.to(dt), weight.to(dt)
            valid = targets != ignore_index  # (N,)
            y = targets.masked_fill(~valid, 0)
            n_valid = valid.sum()  # stays on the device: no host sync
            n = h.size(0)
            grad_h = torch.empty(h.shape, dtype=dt, device=h.device) if need_grad else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_grad else None
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            for s in range(0, n, chunk_size):
                e = min(n, s + chunk_size)
                rows = torch.arange(e - s, device=h.device)
                h_c, y_c, ok = hc[s:e], y[s:e], valid[s:e]
                # The only vocab-sized tensor, one chunk at a time; log_softmax accumulates in fp32.
                logp = torch.log_softmax(h_c @ wc.t(), dim=-1, dtype=torch.float32)  # (c, V)
                total -= (logp[rows, y_c] * ok).sum()
                if need_grad:
                    # d(sum of losses)/d(logits) = softmax − one_hot(y); the 1/n_valid is applied in backward.
                    g = logp.exp_()
                    g[rows, y_c] -= 1.0
                    g = g.to(dt)
                    keep = ok[:, None].to(dt)  # ignored rows contribute nothing: mask the narrow (c, d) sides
                    torch.mm(g, wc, out=grad_h[s:e])
                    grad_h[s:e] *= keep
                    grad_w.add_(torch.mm(g.t(), h_c * keep))
        if need_grad:
            ctx.save_for_backward(grad_h, grad_w, n_valid)
            ctx.dtypes = (h.dtype, weight.dtype)
        return total / n_valid  # NaN when every row is ignored, like F.cross_entropy

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, n_valid = ctx.saved_tensors
        scale = grad_out / n_valid
        return (grad_h.to(ctx.dtypes[0]) * scale.to(ctx.dtypes[0]), grad_w.to(ctx.dtypes[1]) * scale.to(ctx.dtypes[1]),
                None, None, None, None)


def lm_head_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int = 1024,
                          ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of h @ weightᵀ against `targets` without materialising the full logits.

    h: (N, d) final hidden states; weight: (V, d) the LM head; targets: (N,) ids, `ignore_index` to skip a row.
    Like `F.cross_entropy`, the mean over zero valid rows is NaN.
    """
    need_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    return _ChunkedLMHeadCE.apply(h, weight, targets, chunk_size, ignore_index, need_grad)
