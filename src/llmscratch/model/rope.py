"""Rotary position embeddings (RoPE, Su et al. 2021), with Llama 3's frequency scaling.

RoPE encodes a token's position by rotating its query and key vectors: the head's dimensions are paired, and
pair i is turned by the angle position · θ_i with θ_i = theta^(-2i/head_dim). A query at position m and a key
at position n then meet in the dot product only through m − n, so attention sees relative positions, and
there is no learned position table. Pairs use the "split halves" layout of Hugging Face's Llama and Qwen code:
dimension i is paired with dimension i + head_dim/2 (not with its neighbour i + 1).

Llama 3 stretches the context it was trained on by slowing down the low frequencies (long wavelengths) by
`factor`, keeping the high ones, and blending in between (the `rope_scaling` block of Llama 3.1/3.2's
config.json).
"""

from __future__ import annotations

import math

import torch


def inverse_frequencies(head_dim: int, theta: float, scaling: dict | None = None,
                        device: torch.device | None = None) -> torch.Tensor:
    """θ_i = theta^(-2i/head_dim) for i < head_dim/2 (fp32), with Llama 3's scaling applied if given."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    if scaling is None:
        return inv
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_ctx = scaling["original_context_length"]
    wavelength = 2 * math.pi / inv
    # Wavelengths longer than old_ctx/low are slowed by `factor`; shorter than old_ctx/high are kept;
    # in between the two are blended linearly in old_ctx / wavelength.
    blend = ((old_ctx / wavelength - low) / (high - low)).clamp(0.0, 1.0)
    return (1 - blend) * inv / factor + blend * inv


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """cos and sin (..., head_dim) of the rotation angles of `positions` (...,) — (T,) or per row (B, T) —
    each half repeated twice."""
    angles = positions.float()[..., None] * inv_freq  # (..., head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)  # (..., head_dim): pair i and i + head_dim/2 share an angle
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, heads, T, head_dim): each pair (a, b) = (x_i, x_{i+h/2}) becomes
    (a·cos − b·sin, b·cos + a·sin)."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # under autocast q and k are bf16: stay in their dtype
    half = x.size(-1) // 2
    a, b = x[..., :half], x[..., half:]
    rotated_half = torch.cat([-b, a], dim=-1)
    return x * cos + rotated_half * sin


def apply_rope_reference(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """The same rotation as complex multiplication: pair (x_i, x_{i+h/2}) is the complex number
    x_i + j·x_{i+h/2}, multiplied by e^{j·position·θ_i}."""
    half = x.size(-1) // 2
    z = torch.complex(x[..., :half].double(), x[..., half:].double())
    turn = torch.polar(torch.ones_like(inv_freq.double()), positions.double()[:, None] * inv_freq.double()[None])
    z = z * turn  # broadcasts over (B, heads)
    return torch.cat([z.real, z.imag], dim=-1).to(x.dtype)
