"""Normalisation and feed-forward layers, each with its hand-written reference beside the fused op.

The model calls the fused PyTorch kernels; the `*_reference` functions spell out the math the book derives
and are tested equal to them (tests/model/test_layers.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from llmscratch.model.dispatch import triton_kernels
from llmscratch.model.options import ModelOptions


def layer_norm_reference(x: torch.Tensor, weight, bias, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm from its definition: normalise each vector to zero mean and unit variance, then scale/shift.

    The variance is the biased one (divide by n, not n-1), as in the LayerNorm paper and `F.layer_norm`.
    """
    mean = x.mean(dim=-1, keepdim=True)
    var = x.var(dim=-1, keepdim=True, unbiased=False)
    y = (x - mean) / torch.sqrt(var + eps)
    y = y * weight
    return y + bias if bias is not None else y


def rms_norm_reference(x: torch.Tensor, weight, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm (Zhang & Sennrich 2019): divide by the root mean square, no centring, no bias; computed in fp32
    and scaled after casting back, as Llama and Qwen do."""
    x32 = x.float()
    y = x32 / torch.sqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


def gelu_reference(x: torch.Tensor) -> torch.Tensor:
    """GELU, tanh approximation used by GPT-2 (Hendrycks & Gimpel 2016, eq. in section 2)."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (GPT-2 has one); calls the fused kernel."""

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    """RMSNorm of Llama and Qwen: x / rms(x) · weight, the statistics in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)


def make_norm(kind: str, dim: int, eps: float, bias: bool) -> nn.Module:
    """The normalisation a config names: "layernorm" (GPT-2) or "rmsnorm" (Llama, Qwen)."""
    return RMSNorm(dim, eps) if kind == "rmsnorm" else LayerNorm(dim, eps, bias)


def _gelu_kernel_wanted(mode: str) -> bool:
    """Whether GELUMLP asks for the Triton bias + GELU kernel under `ModelOptions.gelu_kernel` = `mode`: with
    "compiled", only in training steps traced by torch.compile (gradients on)."""
    if mode == "compiled":
        return torch.is_grad_enabled() and torch.compiler.is_compiling()
    return mode == "always"


class GELUMLP(nn.Module):
    """GPT-2's feed-forward net: expand to d_ff, GELU (tanh form), project back to d_model.

    `options`: the model's `ModelOptions` (its `gelu_kernel` is read on every call), shared with the model that
    builds this layer; the defaults when None."""

    def __init__(self, d_model: int, d_ff: int, bias: bool = True, dropout: float = 0.0,
                 options: ModelOptions | None = None):
        super().__init__()
        self.options = options if options is not None else ModelOptions()
        self.fc = nn.Linear(d_model, d_ff, bias=bias)
        self.proj = nn.Linear(d_ff, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernels = None
        if (_gelu_kernel_wanted(self.options.gelu_kernel) and type(self.fc) is nn.Linear  # not LoRA-wrapped
                and self.fc.bias is not None):
            kernels = triton_kernels(x)
        if kernels is not None:
            h = kernels.gelu_bias(F.linear(x, self.fc.weight), self.fc.bias)
        else:
            h = F.gelu(self.fc(x), approximate="tanh")
        return self.dropout(self.proj(h))


GATE_ACTIVATIONS = ("silu", "gelu_tanh")


class SwiGLUMLP(nn.Module):
    """The gated feed-forward net (Shazeer 2020, "GLU Variants Improve Transformer"): proj(act(gate(x)) · up(x)).

    `activation` "silu" is SwiGLU (Llama, Qwen); "gelu_tanh" is GeGLU with GELU's tanh form (Gemma). The gate is
    the only place the two differ, so one class serves both."""

    def __init__(self, d_model: int, d_ff: int, bias: bool = False, dropout: float = 0.0, activation: str = "silu"):
        super().__init__()
        if activation not in GATE_ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(GATE_ACTIVATIONS)}, got {activation!r}")
        self.activation = activation
        self.gate = nn.Linear(d_model, d_ff, bias=bias)
        self.up = nn.Linear(d_model, d_ff, bias=bias)
        self.proj = nn.Linear(d_ff, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gate(x)
        g = F.silu(g) if self.activation == "silu" else F.gelu(g, approximate="tanh")
        return self.dropout(self.proj(g * self.up(x)))

