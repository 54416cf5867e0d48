"""Mixture-of-experts feed-forward layer (Qwen3-MoE), with its dense reference and the load-balancing loss.

A router scores every token against every expert; the token goes through its top-k experts only and their
outputs are summed, weighted by the router's probabilities (Shazeer et al. 2017, "Outrageously large neural
networks"; Qwen3-MoE renormalises the k chosen probabilities to sum to 1). Each expert is an ordinary SwiGLU
net, so a model holds n_experts times the feed-forward weights but a token costs only k of them.

`MoEFeedForward` groups the (token, expert) pairs by expert and runs each expert once over its own tokens;
`moe_reference` runs every expert over every token and masks — obviously right, n_experts/k times the work —
and the tests hold the two equal.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from llmscratch.config import ModelConfig
from llmscratch.model.layers import SwiGLUMLP

RouterStats = tuple[torch.Tensor, torch.Tensor, int]  # (assignments per expert, summed probabilities, tokens)


def route(logits: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From the router's logits (N, E): its probabilities (N, E) in fp32, and each token's top-k experts (N, k)
    with their weights (N, k) in the logits' dtype.

    The softmax runs in fp32 whatever the model's dtype: in bf16 the small probabilities of 128 experts would
    round to a handful of values and ties would decide the top-k (Qwen3-MoE does the same)."""
    probs = F.softmax(logits.float(), dim=-1)
    weights, chosen = probs.topk(top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return probs, weights.to(logits.dtype), chosen


def dispatch(x: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor, experts: nn.ModuleList) -> torch.Tensor:
    """Σ over each token's k slots of weight · expert(token), computing each expert on its own tokens only.

    x: (N, d_model); weights, chosen: (N, k). The N·k (token, slot) pairs are sorted by expert, so each
    expert's tokens are one contiguous slice; the outputs are put back in (token, slot) order and each token's
    k of them summed. (Summing by un-permuting rather than `index_add_` keeps the order fixed, and on a CPU
    avoids the thread pool that index_add_ starts even for the one row of a decoding step.)"""
    N, k = chosen.shape
    flat = chosen.flatten()  # (N·k,) the expert of each pair, token-major
    order = flat.argsort(stable=True)  # pairs grouped by expert
    # The group sizes on the host (one sync per layer): the slices below need Python ints.
    counts = torch.bincount(flat, minlength=len(experts)).tolist()
    outs = [experts[e](group) for e, group in enumerate(x[order // k].split(counts)) if counts[e]]
    y = torch.cat(outs)[order.argsort()].view(N, k, -1)  # (N, k, d_model): token n's slot j at [n, j]
    return (y * weights[..., None]).to(x.dtype).sum(dim=1)


@functools.cache
def _eager_dispatch():
    """`dispatch` marked to run eagerly between torch.compile's graphs, which cannot trace group sizes that depend
    on the data. Made on first use under compilation: `torch.compiler.disable` imports torch._dynamo (~1.5 s),
    which building or running a model uncompiled should not pay."""
    return torch.compiler.disable(dispatch)


def moe_reference(x: torch.Tensor, router_weight: torch.Tensor, experts, top_k: int, normalize: bool,
                  shared=None) -> torch.Tensor:
    """The MoE layer the slow, plain way: every expert over every token, weighted by a gate matrix that is
    zero outside each token's top-k. x: (N, d_model) → (N, d_model)."""
    probs = torch.softmax(x.float() @ router_weight.float().T, dim=-1)  # (N, E)
    top, idx = probs.topk(top_k, dim=-1)
    if normalize:
        top = top / top.sum(dim=-1, keepdim=True)
    gates = torch.zeros_like(probs).scatter(1, idx, top)  # (N, E): the k chosen weights, zeros elsewhere
    y = sum(gates[:, e:e + 1].to(x.dtype) * expert(x) for e, expert in enumerate(experts))
    return y + shared(x) if shared is not None else y


def router_statistics(probs: torch.Tensor, chosen: torch.Tensor) -> RouterStats:
    """What the load-balancing loss needs from one layer: how many (token, slot) assignments each expert got,
    its summed probability, and the token count. probs: (N, E) fp32; chosen: (N, k).

    Counted with index_add_ rather than bincount, which on a GPU waits for the device to size its output."""
    counts = torch.zeros(probs.size(1), device=probs.device).index_add_(
        0, chosen.flatten(), torch.ones(chosen.numel(), device=probs.device))
    return counts, probs.sum(dim=0), probs.size(0)


def load_balancing_loss(stats: list[RouterStats], n_experts: int) -> torch.Tensor:
    """Switch Transformer's auxiliary loss (Fedus et al. 2021, eq. 4-6) in the form transformers computes for
    Qwen3-MoE (`load_balancing_loss_func`): n_experts · Σ_e f_e · P_e, where, pooled over the tokens of all
    layers, f_e is expert e's (token, slot) assignments per token (the f_e sum to k) and P_e its mean router
    probability. Perfectly even routing gives k; everything on the same k experts gives n_experts."""
    counts = sum(s[0] for s in stats)
    prob_sums = sum(s[1] for s in stats)
    rows = sum(s[2] for s in stats)
    return n_experts * torch.sum((counts / rows) * (prob_sums / rows))


class MoEFeedForward(nn.Module):
    """Router (d_model → n_experts, no bias) + n_experts SwiGLU experts of width `moe_d_ff` (+ an optional
    shared SwiGLU expert that every token goes through). (B, T, d_model) → (B, T, d_model).

    In training mode the layer keeps its `router_stats` of the last forward for the load-balancing loss
    (`GPT.aux_loss`); in eval mode it keeps none."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d_ff = cfg.moe_d_ff or cfg.d_ff
        self.top_k, self.normalize = cfg.n_experts_per_token, cfg.moe_normalize_topk
        self.router = nn.Linear(cfg.d_model, cfg.n_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLUMLP(cfg.d_model, d_ff, cfg.bias) for _ in range(cfg.n_experts))
        self.shared = SwiGLUMLP(cfg.d_model, cfg.shared_expert_d_ff, cfg.bias) if cfg.shared_expert_d_ff else None
        self.dropout = nn.Dropout(cfg.dropout)
        self.router_stats: RouterStats | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.size(-1))  # (B·T, C): routing is per token, positions do not matter
        probs, weights, chosen = route(self.router(flat), self.top_k, self.normalize)
        run = _eager_dispatch() if torch.compiler.is_compiling() else dispatch
        y = run(flat, weights, chosen, self.experts)
        if self.shared is not None:
            y = y + self.shared(flat)
        self.router_stats = router_statistics(probs, chosen) if self.training else None
        return self.dropout(y).reshape(x.shape)

    def expert_params(self) -> int:
        """Parameters of one routed expert."""
        return sum(p.numel() for p in self.experts[0].parameters())
