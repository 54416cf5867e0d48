"""Multi-head latent attention (MLA; DeepSeek-V2, Liu et al. 2024, §2.1) and its latent KV cache.

Standard attention caches every key/value head: 2·n_kv_heads·head_dim numbers per token and layer. MLA caches
one compressed latent per token instead, c_kv = RMSNorm(W_dkv x) of width kv_lora_rank, and each head
up-projects its key and value from it: k_h = W_uk_h c_kv, v_h = W_uv_h c_kv. RoPE cannot act inside that
compression — a rotation between W_uk and the query depends on the key's position, so W_uk could no longer be
folded into the query (below) — and position enters through a separate "decoupled" rotary key
k_rope = RoPE(W_kr x) of width rope_head_dim, one for all heads, cached beside the latent:

    q_h = [q_nope_h ; RoPE(q_rope_h)],   k_h = [W_uk_h c_kv ; k_rope],   v_h = W_uv_h c_kv,
    softmax scale 1/√(head_dim + rope_head_dim)

Queries may go through a low-rank latent of their own (q_lora_rank > 0: d → q_lora_rank → RMSNorm → heads),
which saves activations in training, not cache. The cache holds kv_lora_rank + rope_head_dim numbers per token
and layer: DeepSeek-V2's 512 + 64 against 2·128·128 = 32,768 for MHA over its 128 heads of 128.

Decoding one token can skip the up-projection of the whole cache: q_nope_h · (W_uk_h c) = (W_uk_hᵀ q_nope_h) · c,
so the query moves into the latent space and attends over the cached latents directly; the output Σ p·c is
up-projected by W_uv_h once per query (`_attend_latent`, the paper's "absorbed" form).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from llmscratch.config import ModelConfig
from llmscratch.model.attention import RowPositions
from llmscratch.model.layers import RMSNorm
from llmscratch.model.options import ModelOptions
from llmscratch.model.rope import apply_rope


class LatentKVCache(nn.Module):
    """MLA's cache of one layer for `max_len` positions: per token the latent c_kv (kv_lora_rank) and the rotated
    shared key k_rope (rope_head_dim), buffers (B, max_len, width). The same contract as `KVCache`
    (model/attention.py): `update(pos, latent, k_rope)` writes at [pos, pos + T) and returns what attention reads.
    """

    def __init__(self, batch_size: int, max_len: int, latent_dim: int, rope_dim: int, dtype, device=None):
        super().__init__()
        self.register_buffer("latent", torch.zeros(batch_size, max_len, latent_dim, dtype=dtype, device=device),
                             persistent=False)
        self.register_buffer("k_rope", torch.zeros(batch_size, max_len, rope_dim, dtype=dtype, device=device),
                             persistent=False)

    @property
    def max_len(self) -> int:
        return self.latent.size(1)

    def fits(self, batch_size: int, max_len: int, dtype, device: torch.device, at_least: bool = False) -> bool:
        """Whether this cache serves `batch_size` rows of `max_len` positions (or more, with `at_least`) as is."""
        return (self.latent.size(0) == batch_size
                and (self.max_len == max_len or (at_least and self.max_len > max_len))
                and self.latent.dtype == dtype and self.latent.device == device)

    def resized(self, max_len: int) -> LatentKVCache:
        """A cache of `max_len` positions holding this one's first min(max_len, its length) entries."""
        new = LatentKVCache(self.latent.size(0), max_len, self.latent.size(2), self.k_rope.size(2),
                            self.latent.dtype, self.latent.device)
        keep = min(self.max_len, max_len)
        new.latent[:, :keep] = self.latent[:, :keep]
        new.k_rope[:, :keep] = self.k_rope[:, :keep]
        return new

    def move_rows(self, src: int | list[int], dst: int | list[int], length: int) -> None:
        """Copy the first `length` positions of batch row(s) `src` to row(s) `dst`, as `KVCache.move_rows`."""
        self.latent[dst, :length] = self.latent[src, :length]
        self.k_rope[dst, :length] = self.k_rope[src, :length]

    def update(self, pos: int | torch.Tensor | RowPositions, latent: torch.Tensor,
               k_rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write latent (B, T, kv_lora_rank) and k_rope (B, T, rope_head_dim) at positions [pos, pos + T).

        As `KVCache.update`: an int returns the filled prefix; a 0-dim tensor (static shapes) writes with
        `index_copy_` and returns the whole buffers; `RowPositions` writes each row's real tokens at its own
        positions and returns the rows' first `length` slots."""
        if isinstance(pos, torch.Tensor):
            idx = pos + torch.arange(latent.size(1), device=latent.device)
            self.latent.index_copy_(1, idx, latent)
            self.k_rope.index_copy_(1, idx, k_rope)
            return self.latent, self.k_rope
        if isinstance(pos, RowPositions):
            return self._update_rows(pos, latent, k_rope)
        end = pos + latent.size(1)
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; cannot write up to {end}")
        self.latent[:, pos:end] = latent
        self.k_rope[:, pos:end] = k_rope
        return self.latent[:, :end], self.k_rope[:, :end]

    def _update_rows(self, at: RowPositions, latent: torch.Tensor,
                     k_rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if at.length > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; cannot write up to {at.length}")
        rows, positions = at.rows[:, None].expand_as(at.positions), at.positions  # (B, T) each
        if at.real is not None:  # padding must not overwrite the row's last real entry
            rows, positions, latent, k_rope = rows[at.real], positions[at.real], latent[at.real], k_rope[at.real]
        self.latent[rows, positions] = latent
        self.k_rope[rows, positions] = k_rope
        picked = slice(at.first_row, at.first_row + at.rows.numel()) if at.first_row is not None else at.rows
        return self.latent[picked, :at.length], self.k_rope[picked, :at.length]


def _cache_mask(input_pos, T: int, Tk: int, device) -> tuple[torch.Tensor | None, bool]:
    """(mask, is_causal) for T queries over Tk keys after a cache update, as `CausalSelfAttention.forward` builds
    them: the mask (broadcastable to (B, 1, T, Tk)) is True where a query may see a key."""
    if isinstance(input_pos, RowPositions):
        return input_pos.mask, False
    if isinstance(input_pos, torch.Tensor):  # static shapes: every cache slot, masked past each query's position
        q_pos = input_pos + torch.arange(T, device=device)
        return torch.arange(Tk, device=device) <= q_pos[:, None], False
    if input_pos:  # queries at input_pos.. see every cached key up to their own position
        return (torch.ones(T, Tk, dtype=torch.bool, device=device).tril(diagonal=input_pos) if T > 1 else None), False
    return None, True


class LatentAttention(nn.Module):
    """Multi-head latent attention with the call of `CausalSelfAttention`: `forward(x, input_pos, rope)`,
    x (B, T, d_model) → (B, T, d_model), and the same cache methods (`setup_cache`, `kv_cache`).

    Widths from the config: n_heads heads, each with a query/key part of head_dim (no rotation) + rope_head_dim
    (rotated), and values of head_dim; `rope` holds cos/sin of width rope_head_dim (GPT builds them so for MLA).
    """

    def __init__(self, cfg: ModelConfig, options: ModelOptions | None = None):
        super().__init__()
        self.options = options if options is not None else ModelOptions()
        d, nh, hd, dr, r = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.rope_head_dim, cfg.kv_lora_rank
        self.n_heads, self.head_dim, self.rope_head_dim, self.kv_lora_rank = nh, hd, dr, r
        q_out = nh * (hd + dr)
        if cfg.q_lora_rank:
            self.q_down = nn.Linear(d, cfg.q_lora_rank, bias=cfg.qkv_bias)
            self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps)
            self.q_proj = nn.Linear(cfg.q_lora_rank, q_out, bias=False)
        else:
            self.q_down, self.q_norm = None, None
            self.q_proj = nn.Linear(d, q_out, bias=cfg.qkv_bias)
        # W_dkv and W_kr in one matmul: the latent and the shared rotary key, both read from x.
        self.kv_down = nn.Linear(d, r + dr, bias=cfg.qkv_bias)
        self.kv_norm = RMSNorm(r, cfg.norm_eps)
        # W_uk and W_uv together, per head [key part (head_dim) ; value (head_dim)]. No bias: the absorbed
        # decoding path folds this weight into the query and the output.
        self.kv_up = nn.Linear(r, nh * 2 * hd, bias=False)
        self.proj = nn.Linear(nh * hd, d, bias=cfg.bias)
        self.scale = cfg.attn_scale if cfg.attn_scale is not None else 1.0 / math.sqrt(hd + dr)
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.kv_cache: LatentKVCache | None = None

    def setup_cache(self, batch_size: int, max_len: int, dtype, device: torch.device, at_least: bool = False) -> None:
        """Give this layer a latent cache for `batch_size` rows of `max_len` positions, keeping the one it has when
        it fits."""
        if self.kv_cache is None or not self.kv_cache.fits(batch_size, max_len, dtype, device, at_least):
            self.kv_cache = LatentKVCache(batch_size, max_len, self.kv_lora_rank, self.rope_head_dim, dtype, device)

    def _queries(self, x: torch.Tensor, rope) -> tuple[torch.Tensor, torch.Tensor]:
        """q_nope (B, nh, T, head_dim) and the rotated q_rope (B, nh, T, rope_head_dim) of x (B, T, d)."""
        B, T, _ = x.shape
        h = x if self.q_down is None else self.q_norm(self.q_down(x))
        q = self.q_proj(h).view(B, T, self.n_heads, self.head_dim + self.rope_head_dim).transpose(1, 2)
        q_nope, q_rope = q.split([self.head_dim, self.rope_head_dim], dim=-1)
        return q_nope, apply_rope(q_rope, *rope)

    def _latents(self, x: torch.Tensor, rope) -> tuple[torch.Tensor, torch.Tensor]:
        """What the cache holds for x (B, T, d): the normed latent (B, T, r) and the rotated k_rope (B, T, dr)."""
        latent, k_rope = self.kv_down(x).split([self.kv_lora_rank, self.rope_head_dim], dim=-1)
        return self.kv_norm(latent), apply_rope(k_rope[:, None], *rope)[:, 0]

    def _attend_heads(self, q_nope, q_rope, latent, k_rope, mask, is_causal: bool) -> torch.Tensor:
        """Attention with every cached latent up-projected to per-head keys and values (training, prefill):
        q_* (B, nh, T, ·), latent (B, Tk, r), k_rope (B, Tk, dr) → (B, nh, T, head_dim)."""
        B, Tk, _ = latent.shape
        nh, hd = self.n_heads, self.head_dim
        k_nope, v = self.kv_up(latent).view(B, Tk, nh, 2 * hd).transpose(1, 2).split(hd, dim=-1)  # (B, nh, Tk, hd)
        k = torch.cat([k_nope, k_rope[:, None].expand(B, nh, Tk, self.rope_head_dim)], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)  # (B, nh, T, hd + dr)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=self.scale,
                                              dropout_p=self.dropout if self.training else 0.0)

    def _attend_latent(self, q_nope, q_rope, latent, k_rope, mask, is_causal: bool) -> torch.Tensor:
        """The same attention in the latent space (W_uk absorbed into the query, W_uv applied after), written out
        in fp32: the cache is read as it is, never up-projected. Shapes as `_attend_heads`."""
        T, Tk = q_nope.size(2), latent.size(1)
        w = self.kv_up.weight.view(self.n_heads, 2 * self.head_dim, self.kv_lora_rank).float()
        w_uk, w_uv = w[:, :self.head_dim], w[:, self.head_dim:]  # (nh, hd, r) each
        q_latent = torch.einsum("bhtd,hdr->bhtr", q_nope.float(), w_uk)  # (B, nh, T, r)
        scores = (q_latent @ latent.float()[:, None].transpose(-2, -1)
                  + q_rope.float() @ k_rope.float()[:, None].transpose(-2, -1)) * self.scale  # (B, nh, T, Tk)
        if is_causal:
            mask = torch.ones(T, Tk, dtype=torch.bool, device=latent.device).tril(diagonal=Tk - T)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        y_latent = torch.softmax(scores, dim=-1) @ latent.float()[:, None]  # (B, nh, T, r)
        return torch.einsum("bhtr,hdr->bhtd", y_latent, w_uv).to(q_nope.dtype)

    @torch.no_grad()
    def attention_weights(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """The causal attention weights (B, nh, T, T) of x (B, T, d), each row summing to 1 — for pictures."""
        q_nope, q_rope = self._queries(x, rope)
        latent, k_rope = self._latents(x, rope)
        k_nope = self.kv_up(latent).view(*latent.shape[:2], self.n_heads, 2 * self.head_dim)[..., :self.head_dim]
        scores = (q_nope.float() @ k_nope.float().permute(0, 2, 3, 1)
                  + q_rope.float() @ k_rope.float()[:, None].transpose(-2, -1)) * self.scale
        causal = torch.ones(x.size(1), x.size(1), dtype=torch.bool, device=x.device).tril()
        return torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)

    def forward(self, x: torch.Tensor, input_pos: int | torch.Tensor | RowPositions | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x (B, T, d) → (B, T, d); `input_pos` as for `CausalSelfAttention.forward` (an int, a 0-dim tensor, or
        `RowPositions`, the last two with a cache set up); `rope`: cos/sin (T or (B, 1, T), rope_head_dim)."""
        if rope is None:
            raise ValueError("multi-head latent attention needs the rotary cos/sin of its positions (position=rope)")
        B, T, _ = x.shape
        q_nope, q_rope = self._queries(x, rope)
        latent, k_rope = self._latents(x, rope)
        if self.kv_cache is not None and input_pos is not None:
            latent, k_rope = self.kv_cache.update(input_pos, latent, k_rope)
        elif isinstance(input_pos, (torch.Tensor, RowPositions)):
            raise ValueError("input_pos as a tensor or RowPositions reads the KV cache: call setup_kv_cache first")
        mask, is_causal = _cache_mask(input_pos if self.kv_cache is not None else None, T, latent.size(1), x.device)
        # One new query per row (decoding): attending in the latent space reads the cache as it is. For many
        # queries (prefill, training) up-projecting the keys once is cheaper than moving every query.
        if T == 1 and not self.training and type(self.kv_up) is nn.Linear:  # (a LoRA-wrapped kv_up: the plain way)
            y = self._attend_latent(q_nope, q_rope, latent, k_rope, mask, is_causal)
        else:
            y = self._attend_heads(q_nope, q_rope, latent, k_rope, mask, is_causal)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, nh·hd)
        return self.resid_dropout(self.proj(y))
