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
        n = h.size(0)
        valid = targets != ignore_index
        n_valid = int(valid.sum())
        grad_h = torch.empty_like(h) if need_grad else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_grad else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        scale = 1.0 / max(n_valid, 1)
        for start in range(0, n, chunk_size):
            end = min(n, start + chunk_size)
            h_c, y_c, ok = h[start:end], targets[start:end], valid[start:end]
            logits = (h_c @ weight.t()).float()  # (c, V): the only vocab-sized tensor, one chunk at a time
            lse = torch.logsumexp(logits, dim=-1)  # (c,)
            y_safe = torch.where(ok, y_c, torch.zeros_like(y_c))
            picked = logits.gather(1, y_safe[:, None]).squeeze(1)  # (c,) logit of the target
            total += ((lse - picked) * ok).sum()
            if need_grad:
                # d(mean CE)/d logits = (softmax − one_hot(y)) / n_valid for the valid rows, 0 for ignored ones
                g = torch.exp(logits - lse[:, None])
                g[torch.arange(end - start, device=h.device), y_safe] -= 1.0
                g *= (ok.float() * scale)[:, None]
                g = g.to(weight.dtype if not torch.is_autocast_enabled(h.device.type) else h_c.dtype)
                grad_h[start:end] = (g @ weight.to(g.dtype)).to(h.dtype)  # (c, d)
                grad_w += (g.t() @ h_c.to(g.dtype)).float()  # (V, d)
        if need_grad:
            ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        return total * scale if n_valid else total * float("nan")

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out.to(grad_h.dtype), grad_w * grad_out.to(grad_w.dtype), None, None, None, None


def lm_head_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int = 1024,
                          ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of h @ weightᵀ against `targets` without materialising the full logits.

    h: (N, d) final hidden states; weight: (V, d) the LM head; targets: (N,) ids, `ignore_index` to skip a row.
    Like `F.cross_entropy`, the mean over zero valid rows is NaN.
    """
    need_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    return _ChunkedLMHeadCE.apply(h, weight, targets, chunk_size, ignore_index, need_grad)
