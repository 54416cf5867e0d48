"""Causal self-attention (multi-head and grouped-query in one class) and its KV cache.

GPT-2 uses multi-head attention: every query head has its own key/value head. Grouped-query attention
(Ainslie et al. 2023) lets `n_heads / n_kv_heads` query heads share one key/value head, shrinking the KV
cache; MHA is the special case n_kv_heads == n_heads, so one class serves both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llmscratch.model.dispatch import triton_kernels
from llmscratch.model.layers import RMSNorm
from llmscratch.model.options import ModelOptions
from llmscratch.model.rope import apply_rope


def attention_reference(q, k, v, mask: torch.Tensor | None = None, is_causal: bool = False,
                        scale: float | None = None) -> torch.Tensor:
    """softmax(Q Kᵀ / √d) V written out, the book's chapter 3.

    q: (B, nh, Tq, hs); k, v: (B, nh, Tk, hs). `mask` is boolean (Tq, Tk), True where attention is allowed;
    `is_causal` builds the lower-triangular mask for Tq == Tk. `scale` replaces 1/√d where a model sets its own
    (Gemma 3: query_pre_attn_scalar^-1/2).
    """
    scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, nh, Tq, Tk)
    if is_causal:
        mask = torch.ones(q.size(-2), k.size(-2), dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    return weights @ v  # (B, nh, Tq, hs)


@dataclass(frozen=True)
class RowPositions:
    """Where each row of a batch sits in the KV cache when its rows are at different positions: the batched
    decoding of `llmscratch.generate.DecodeBatch`, where prompts of different lengths share one cache and each
    row joins, advances and leaves on its own.

    Row b of the input (B, T) is cache row `rows[b]`; its first `lengths[b]` tokens are real and take positions
    `positions[b]` — their absolute positions, for the position embeddings or RoPE, and their slots in that cache
    row. The rest of the row is padding (rows fed different numbers of tokens in one call): it is never written to
    the cache, and its positions repeat the row's last real one so they stay inside the context. Each query sees
    the keys of its own row up to its own position (`mask`, (B, 1, T, length)): never another row's tokens, nor
    stale entries past its end. Build with `make`.
    """

    positions: torch.Tensor  # (B, T) long
    rows: torch.Tensor  # (B,) long: the cache rows
    first_row: int | None  # rows == first_row + arange(B) when not None: the cache is read as a view, not copied
    length: int  # keys attended over: cache slots [0, length)
    mask: torch.Tensor  # (B, 1, T, length) bool, True where a query may see a key
    real: torch.Tensor | None  # (B, T) bool, True for the real tokens; None when every token is real

    @staticmethod
    def make(starts: list[int], n_tokens: int | list[int], rows: list[int] | None = None,
             device: torch.device | None = None) -> RowPositions:
        """Row b's tokens at positions starts[b], starts[b] + 1, ... in cache row rows[b] (default: b);
        `n_tokens`: how many tokens each row feeds (one number for all, or one per row)."""
        rows = list(range(len(starts))) if rows is None else list(rows)
        lengths = [n_tokens] * len(starts) if isinstance(n_tokens, int) else list(n_tokens)
        width = max(lengths)
        contiguous = rows == list(range(rows[0], rows[0] + len(rows)))
        start = torch.tensor(starts, dtype=torch.long, device=device)[:, None]  # (B, 1)
        count = torch.tensor(lengths, dtype=torch.long, device=device)[:, None]  # (B, 1)
        offsets = torch.arange(width, device=device)  # (T,)
        positions = start + torch.minimum(offsets, count - 1)  # (B, T): padding repeats the last real position
        length = max(s + n for s, n in zip(starts, lengths))
        mask = torch.arange(length, device=device) <= positions[:, :, None]  # (B, T, length)
        real = None if min(lengths) == width else offsets < count  # (B, T)
        return RowPositions(positions, torch.tensor(rows, dtype=torch.long, device=device),
                            rows[0] if contiguous else None, length, mask[:, None], real)


class KVCache(nn.Module):
    """Preallocated keys and values of one attention layer for `max_len` positions.

    `update(pos, k, v)` writes the new entries at [pos, pos + T) and returns the filled prefix, so prefill
    (T = prompt length) and decoding (T = 1) are the same call.
    """

    def __init__(self, batch_size: int, max_len: int, n_kv_heads: int, head_dim: int, dtype, device=None):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def max_len(self) -> int:
        return self.k.size(2)

    def fits(self, batch_size: int, max_len: int, dtype, device: torch.device, at_least: bool = False) -> bool:
        """Whether this cache serves `batch_size` rows of `max_len` positions (or more, with `at_least`) as is."""
        return (self.k.size(0) == batch_size and (self.max_len == max_len or (at_least and self.max_len > max_len))
                and self.k.dtype == dtype and self.k.device == device)

    def resized(self, max_len: int) -> KVCache:
        """A cache of `max_len` positions holding this one's first min(max_len, its length) entries."""
        new = KVCache(self.k.size(0), max_len, self.k.size(1), self.k.size(3), self.k.dtype, self.k.device)
        keep = min(self.max_len, max_len)
        new.k[:, :, :keep] = self.k[:, :, :keep]
        new.v[:, :, :keep] = self.v[:, :, :keep]
        return new

    def move_rows(self, src: int | list[int], dst: int | list[int], length: int) -> None:
        """Copy the first `length` positions of batch row(s) `src` to row(s) `dst`; with lists, every source is read
        before any destination is written, so `move_rows([a, b], [b, a], n)` swaps two rows."""
        self.k[dst, :, :length] = self.k[src, :, :length]
        self.v[dst, :, :length] = self.v[src, :, :length]

    def update(self, pos: int | torch.Tensor | RowPositions, k: torch.Tensor,
               v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, nkv, T, hs) at positions [pos, pos + T).

        With `pos` an int, return the filled prefix (its length varies). With `pos` a 0-dim tensor on the
        cache's device — the static-shape path that `torch.compile` and CUDA graphs need — write with
        `index_copy_` and return the whole buffers; the caller masks the unfilled tail. With `RowPositions`, each
        row at its own positions (batched decoding of rows that joined at different times).
        """
        if isinstance(pos, torch.Tensor):
            idx = pos + torch.arange(k.size(2), device=k.device)
            self.k.index_copy_(2, idx, k)
            self.v.index_copy_(2, idx, v)
            return self.k, self.v
        if isinstance(pos, RowPositions):
            return self._update_rows(pos, k, v)
        end = pos + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; cannot write up to {end}")
        self.k[:, :, pos:end] = k
        self.v[:, :, pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]

    def _update_rows(self, at: RowPositions, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, nkv, T, hs) at each row's own positions; return the rows' keys and values over the first
        `at.length` slots, (B, nkv, length, hs)."""
        if at.length > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; cannot write up to {at.length}")
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, T, nkv, hs)
        rows, positions = at.rows[:, None].expand_as(at.positions), at.positions  # (B, T) each
        if at.real is not None:  # only the real tokens: padding must not overwrite the row's last real entry
            rows, positions, k, v = rows[at.real], positions[at.real], k[at.real], v[at.real]
        # Two index tensors (rows, positions) pick one (nkv, hs) entry each.
        self.k[rows, :, positions] = k
        self.v[rows, :, positions] = v
        if at.first_row is not None:
            rows = slice(at.first_row, at.first_row + at.rows.numel())
            return self.k[rows, :, :at.length], self.v[rows, :, :at.length]
        return self.k[at.rows, :, :at.length], self.v[at.rows, :, :at.length]


def sliding_window_mask(q_pos: torch.Tensor, key_pos: torch.Tensor, window: int) -> torch.Tensor:
    """Which keys each query may see in a sliding-window layer: a key at position j is seen by the query at
    position i when i - window < j <= i — the query itself and the window - 1 positions before it (the
    convention of transformers' Gemma 3, `sliding_window_overlay`). A negative key position marks an empty slot.

    q_pos (T,) or (B, T); key_pos (L,) or (B, L) → bool (T, L) or (B, T, L)."""
    q, k = q_pos[..., :, None], key_pos[..., None, :]
    return (k >= 0) & (k <= q) & (k > q - window)


class WindowKVCache(nn.Module):
    """The KV cache of a sliding-window layer: only the newest `slots` = min(window, max_len) positions, in a
    ring — position p lives in slot p % slots — so its memory stays flat however long the sequence grows.

    It serves every path `KVCache` does. Decoding one token (an int or 0-dim tensor `pos`) writes the token into
    its slot and returns the whole ring: every key there is within the newest query's window, and the order of
    keys does not matter to attention (their positions are already rotated in by RoPE). A chunk of T > 1 tokens
    (prefill) would overwrite keys its own earlier queries still need, so its keys are returned as the window
    before the chunk, read from the ring in order, followed by the chunk's own; then the chunk's last `slots`
    entries are written. `RowPositions` rows take the second route too, each at its own positions.
    `key_positions` says where the returned keys sit, for the mask (`sliding_window_mask`).

    `max_len` is the number of positions the cache serves (the bound checked on writes), not its size.
    """

    def __init__(self, batch_size: int, max_len: int, window: int, n_kv_heads: int, head_dim: int, dtype,
                 device=None):
        super().__init__()
        self.window, self._max_len = window, max_len
        shape = (batch_size, n_kv_heads, min(window, max_len), head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def max_len(self) -> int:
        return self._max_len

    @property
    def slots(self) -> int:
        return self.k.size(2)

    def fits(self, batch_size: int, max_len: int, dtype, device: torch.device, at_least: bool = False) -> bool:
        """Whether this cache serves `batch_size` rows of `max_len` positions (or more, with `at_least`) as is."""
        return (self.k.size(0) == batch_size and (self.max_len == max_len or (at_least and self.max_len > max_len))
                and self.k.dtype == dtype and self.k.device == device)

    def resized(self, max_len: int) -> WindowKVCache:
        """A cache serving `max_len` positions with this one's entries. Growing keeps them all: while the ring is
        shorter than the window nothing has wrapped, so position p is in slot p in both."""
        B, nkv, _, hs = self.k.shape
        new = WindowKVCache(B, max_len, self.window, nkv, hs, self.k.dtype, self.k.device)
        keep = min(self.slots, new.slots)
        new.k[:, :, :keep] = self.k[:, :, :keep]
        new.v[:, :, :keep] = self.v[:, :, :keep]
        return new

    def move_rows(self, src: int | list[int], dst: int | list[int], length: int) -> None:
        """Copy batch row(s) `src`'s entries for their first `length` positions to row(s) `dst` (the slots they
        occupy), as `KVCache.move_rows`."""
        n = min(length, self.slots)
        self.k[dst, :, :n] = self.k[src, :, :n]
        self.v[dst, :, :n] = self.v[src, :, :n]

    def key_positions(self, pos: int | torch.Tensor | RowPositions, T: int) -> torch.Tensor | None:
        """Absolute positions of the keys `update(pos, ...)` returns for T new tokens, (L,) or per row (B, L);
        negative for an empty slot or a padding token. None: every returned key is visible to every query."""
        S = self.slots
        if isinstance(pos, RowPositions):
            start = pos.positions[:, :1]  # (B, 1)
            old = start - (S - 1) + torch.arange(S - 1, device=start.device)  # (B, S-1)
            new = pos.positions if pos.real is None else pos.positions.masked_fill(~pos.real, -1)
            return torch.cat([old, new], dim=1)
        if isinstance(pos, torch.Tensor):
            if T == 1:  # slot s holds the newest position congruent to s, or nothing yet (negative)
                return pos - (pos - torch.arange(S, device=pos.device)) % S
            return pos - (S - 1) + torch.arange(S - 1 + T, device=pos.device)
        if T == 1:
            return None
        return torch.arange(max(0, pos - S + 1), pos + T, device=self.k.device)

    def update(self, pos: int | torch.Tensor | RowPositions, k: torch.Tensor,
               v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, nkv, T, hs) for positions [pos, pos + T); return the keys and values the new queries
        attend over, (B, nkv, L, hs), laid out as `key_positions` says."""
        T, S = k.size(2), self.slots
        if isinstance(pos, RowPositions):
            return self._update_rows(pos, k, v)
        if isinstance(pos, torch.Tensor):
            new_pos = pos + torch.arange(T, device=k.device)
            if T == 1:
                self.k.index_copy_(2, new_pos % S, k)
                self.v.index_copy_(2, new_pos % S, v)
                return self.k, self.v
            old_slots = (pos - (S - 1) + torch.arange(S - 1, device=k.device)) % S
        else:
            if pos + T > self.max_len:
                raise ValueError(f"KV cache holds {self.max_len} positions; cannot write up to {pos + T}")
            new_pos = torch.arange(pos, pos + T, device=k.device)
            if T == 1:
                self.k[:, :, pos % S] = k[:, :, 0]
                self.v[:, :, pos % S] = v[:, :, 0]
                return self.k[:, :, :min(pos + 1, S)], self.v[:, :, :min(pos + 1, S)]
            old_slots = torch.arange(max(0, pos - S + 1), pos, device=k.device) % S
        # Read the window before the chunk first: writing the chunk may overwrite it.
        keys = torch.cat([self.k.index_select(2, old_slots), k], dim=2)  # (B, nkv, L, hs)
        values = torch.cat([self.v.index_select(2, old_slots), v], dim=2)
        last = slice(max(0, T - S), T)  # only the chunk's newest S entries stay
        self.k.index_copy_(2, new_pos[last] % S, k[:, :, last])
        self.v.index_copy_(2, new_pos[last] % S, v[:, :, last])
        return keys, values

    def _update_rows(self, at: RowPositions, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row b at its own positions, in cache row at.rows[b]: its window before its first new token,
        gathered from its ring, then its new tokens; then its real new tokens written (the newest S of them, so
        no two writes of one call land in the same slot)."""
        S = self.slots
        if at.length > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; cannot write up to {at.length}")
        old = self.key_positions(at, k.size(2))[:, :S - 1] % S  # (B, S-1) slots of the window before the chunk
        rows = at.rows[:, None]  # (B, 1)
        # Indexing dims 0 and 2 with (B, S-1) tensors puts those dims first: (B, S-1, nkv, hs).
        keys = torch.cat([self.k[rows, :, old].transpose(1, 2), k], dim=2)  # (B, nkv, S-1+T, hs)
        values = torch.cat([self.v[rows, :, old].transpose(1, 2), v], dim=2)
        keep = at.positions > at.positions[:, -1:] - S  # (B, T): padding repeats the last real position
        if at.real is not None:
            keep &= at.real
        rows = rows.expand_as(at.positions)[keep]
        slots = at.positions[keep] % S
        self.k[rows, :, slots] = k.transpose(1, 2)[keep]
        self.v[rows, :, slots] = v.transpose(1, 2)[keep]
        return keys, values


class CausalSelfAttention(nn.Module):
    """Multi-head / grouped-query causal self-attention calling `F.scaled_dot_product_attention`.

    `options`: the model's `ModelOptions` (its `qkv_kernel` is read on every call), shared with the model that
    builds this layer; the defaults when None. `window`: a sliding-window layer (Gemma 3's local layers) whose
    query sees only itself and the window - 1 positions before it (`sliding_window_mask`), with a cache that
    keeps only those (`WindowKVCache`); None attends over the whole prefix. `scale`: the softmax scale of
    QKᵀ; None is 1/√head_dim."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, qkv_bias: bool = True,
                 bias: bool = True, dropout: float = 0.0, head_dim: int | None = None, qk_norm: bool = False,
                 norm_eps: float = 1e-6, options: ModelOptions | None = None, *, window: int | None = None,
                 scale: float | None = None):
        super().__init__()
        self.options = options if options is not None else ModelOptions()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = head_dim or d_model // n_heads
        self.window, self.scale = window, scale
        # One matmul for q, k and v together (GPT-2's c_attn); with GQA k and v are narrower.
        self.qkv = nn.Linear(d_model, (n_heads + 2 * n_kv_heads) * self.head_dim, bias=qkv_bias)
        self.proj = nn.Linear(n_heads * self.head_dim, d_model, bias=bias)
        self.dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)
        # Qwen3's QK-norm: an RMSNorm over each head's query and key vectors, before the rotation.
        self.q_norm = RMSNorm(self.head_dim, norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, norm_eps) if qk_norm else None
        self.kv_cache: KVCache | WindowKVCache | None = None

    def setup_cache(self, batch_size: int, max_len: int, dtype, device: torch.device, at_least: bool = False) -> None:
        """Give this layer a cache for `batch_size` rows of `max_len` positions, keeping the one it has when it
        fits (`KVCache.fits`); a sliding-window layer's keeps only its window (`WindowKVCache`)."""
        if self.kv_cache is None or not self.kv_cache.fits(batch_size, max_len, dtype, device, at_least):
            if self.window is not None:
                self.kv_cache = WindowKVCache(batch_size, max_len, self.window, self.n_kv_heads, self.head_dim,
                                              dtype, device)
            else:
                self.kv_cache = KVCache(batch_size, max_len, self.n_kv_heads, self.head_dim, dtype, device)

    def _heads(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None):
        """q (B, nh, T, hs), k and v (B, nkv, T, hs) of x (B, T, d): the fused projection split into heads, with
        QK-norm and the rotation applied where the model has them."""
        B, T, _ = x.shape
        hs, nh, nkv = self.head_dim, self.n_heads, self.n_kv_heads
        kernels = None
        if (self.options.qkv_kernel and torch.is_grad_enabled() and type(self.qkv) is nn.Linear  # not LoRA-wrapped
                and self.qkv.bias is not None and hs & (hs - 1) == 0):
            kernels = triton_kernels(x)
        if kernels is not None:
            q, k, v = kernels.qkv_projection(x, self.qkv.weight, self.qkv.bias, nh, nkv, hs)
        else:
            q, k, v = self.qkv(x).split([nh * hs, nkv * hs, nkv * hs], dim=-1)
            q = q.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
            k = k.view(B, T, nkv, hs).transpose(1, 2)  # (B, nkv, T, hs)
            v = v.view(B, T, nkv, hs).transpose(1, 2)  # (B, nkv, T, hs)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return q, k, v

    @torch.no_grad()
    def attention_weights(self, x: torch.Tensor,
                          rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """The causal attention weights softmax(Q Kᵀ / √d) of x (B, T, d) as this layer computes them: (B, nh, T,
        T), each row summing to 1 — for pictures; the forward pass never materialises them (SDPA)."""
        q, k, _ = self._heads(x, rope)
        k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)  # (B, nh, T, hs)
        scale = self.scale if self.scale is not None else 1.0 / math.sqrt(self.head_dim)
        scores = (q.float() @ k.float().transpose(-2, -1)) * scale  # (B, nh, T, T)
        pos = torch.arange(q.size(-2), device=x.device)
        allowed = sliding_window_mask(pos, pos, self.window or q.size(-2))  # (T, T): causal, within the window
        return torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)

    def forward(self, x: torch.Tensor, input_pos: int | torch.Tensor | RowPositions | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x (B, T, d) → (B, T, d). `input_pos`: absolute position of x[:, 0] when decoding with the KV cache —
        an int, a 0-dim tensor for the static-shape (compilable) path, or `RowPositions` for rows at positions
        of their own. `rope`: (cos, sin) of the T positions
        for rotary embeddings (model/rope.py), None for a model with learned position embeddings."""
        B, T, _ = x.shape
        hs, nh, nkv = self.head_dim, self.n_heads, self.n_kv_heads
        q, k, v = self._heads(x, rope)

        mask, is_causal = None, True
        if self.window is not None:
            k, v, mask, is_causal = self._window_keys(input_pos, k, v, T)
        elif isinstance(input_pos, RowPositions):
            k, v = self.kv_cache.update(input_pos, k, v)  # (B, nkv, length, hs)
            mask, is_causal = input_pos.mask, False
        elif isinstance(input_pos, torch.Tensor):
            # Static shapes: attend over the whole cache, masking keys after each query's own position.
            k, v = self.kv_cache.update(input_pos, k, v)  # (B, nkv, max_len, hs)
            q_pos = input_pos + torch.arange(T, device=x.device)
            mask = torch.arange(k.size(2), device=x.device) <= q_pos[:, None]  # (T, max_len)
            is_causal = False
        elif self.kv_cache is not None and input_pos is not None:
            k, v = self.kv_cache.update(input_pos, k, v)  # (B, nkv, input_pos + T, hs)
            if input_pos > 0:
                # New queries sit at absolute positions input_pos..input_pos+T-1 and may see every cached key
                # up to their own position. SDPA's is_causal aligns the mask top-left, which is only right
                # when Tq == Tk, so past the first chunk the mask is explicit (T = 1 needs none at all).
                is_causal = False
                if T > 1:
                    mask = torch.ones(T, k.size(2), dtype=torch.bool, device=x.device).tril(diagonal=input_pos)
        if T == 1 and not x.is_cuda and not self.training:
            # One query per sequence, the newest position, over the cache (CPU decoding): written out as two
            # matrix products and a softmax, fp32 inside as SDPA computes it. SDPA's CPU kernel is slow for a
            # single query: for GPT-2 124M (12 heads of 64) at batch 1 it took 102 µs against 58 µs over 110
            # cached keys, 440 against 134 µs over 512 (benchmarks/RESULTS.md). Compiled, the steps fuse into
            # one loop (~25 µs a layer). No causal mask is needed: the newest query may see every key, and the
            # static cache's unfilled tail is masked by `mask`. With GQA the query heads that share a key/value
            # head become rows of one product, so the cache is read as it is, not copied per query head.
            q_rows = q.reshape(B, nkv, nh // nkv, hs)  # (B, nkv, group, hs)
            y = attention_reference(q_rows.float(), k.float(), v.float(), mask, scale=self.scale).to(q.dtype)
            y = y.reshape(B, nh, 1, hs)
        else:
            if nkv != nh:
                # Each key/value head serves nh // nkv consecutive query heads.
                k = k.repeat_interleave(nh // nkv, dim=1)  # (B, nh, Tk, hs)
                v = v.repeat_interleave(nh // nkv, dim=1)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                               dropout_p=self.dropout if self.training else 0.0, scale=self.scale)
        y = y.transpose(1, 2).reshape(B, T, nh * hs)  # (B, T, C)
        return self.resid_dropout(self.proj(y))

    def _window_keys(self, input_pos, k: torch.Tensor, v: torch.Tensor, T: int):
        """A sliding-window layer's keys and values for its T new queries, with (mask, is_causal) for SDPA: the
        new ones alone without a cache, else through its `WindowKVCache`. The mask is (T, L), or (B, 1, T, L)
        for `RowPositions`; None with is_causal where the window covers the whole chunk anyway."""
        W = self.window
        if self.kv_cache is None or input_pos is None:
            if T <= W:
                return k, v, None, True
            pos = torch.arange(T, device=k.device)
            return k, v, sliding_window_mask(pos, pos, W), False
        cache = self.kv_cache
        key_pos = cache.key_positions(input_pos, T)
        k, v = cache.update(input_pos, k, v)
        if key_pos is None:
            return k, v, None, False
        if isinstance(input_pos, RowPositions):
            return k, v, sliding_window_mask(input_pos.positions, key_pos, W)[:, None], False
        q_pos = input_pos + torch.arange(T, device=k.device)
        return k, v, sliding_window_mask(q_pos, key_pos, W), False
