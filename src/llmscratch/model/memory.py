"""KV-cache memory of a model configuration, computed from the config alone: what `GPT.setup_kv_cache` allocates
for each attention variant (`llmscratch info`; benchmarks/kv_memory.py; tests/model/test_memory.py checks the
estimates against the cache tensors really allocated).

Per layer and token a cache holds
  * MHA / GQA: a key and a value for each key/value head, 2·n_kv_heads·head_dim numbers;
  * MLA: the compressed latent and the shared rotary key, kv_lora_rank + rope_head_dim numbers (model/mla.py);
and a sliding-window layer keeps at most `sliding_window` positions, so its share stops growing past the window.
"""

from __future__ import annotations

from llmscratch.config import ModelConfig


def values_per_token(cfg: ModelConfig) -> int:
    """Numbers one layer caches per token (the same in every layer; a window only limits how many tokens)."""
    if cfg.attention == "mla":
        return cfg.kv_lora_rank + cfg.rope_head_dim
    return 2 * cfg.n_kv_heads * cfg.head_dim


def cached_positions(cfg: ModelConfig, positions: int) -> list[int]:
    """Per layer, the positions its cache holds for a sequence of `positions` tokens: all of them up to the context
    length (as `GPT.setup_kv_cache`, which never allocates past it), at most the window in a sliding layer."""
    positions = min(positions, cfg.context_length)
    return [min(positions, cfg.sliding_window) if sliding else positions for sliding in cfg.sliding_layers]


def kv_cache_bytes(cfg: ModelConfig, positions: int, bytes_per_value: int = 2, batch_size: int = 1) -> int:
    """Bytes of the KV cache of all layers for `batch_size` sequences of `positions` tokens, each number
    `bytes_per_value` wide (2 for bf16/fp16, 4 for fp32)."""
    return batch_size * bytes_per_value * values_per_token(cfg) * sum(cached_positions(cfg, positions))


def kv_bytes_per_token(cfg: ModelConfig, bytes_per_value: int = 2) -> int:
    """Bytes one more token adds to the cache of all layers while the sequence is shorter than any window: the
    growth per token. Past a window only the full layers grow; `kv_cache_bytes(cfg, n) / n` is the average."""
    return bytes_per_value * values_per_token(cfg) * cfg.n_layers


def attention_variant(cfg: ModelConfig) -> str:
    """A short name of the attention and its cache: "MHA", "GQA 32:8", "MLA latent 512 + rope 64", with
    ", SWA 512 pattern 5:1" (sliding:full layers) when some layers slide."""
    if cfg.attention == "mla":
        name = f"MLA latent {cfg.kv_lora_rank} + rope {cfg.rope_head_dim}"
    elif cfg.n_kv_heads == cfg.n_heads:
        name = "MHA"
    else:
        name = f"GQA {cfg.n_heads}:{cfg.n_kv_heads}"
    sliding = cfg.sliding_layers
    if any(sliding):
        name += f", SWA {cfg.sliding_window} pattern {_layer_pattern(sliding)}"
    return name


def _layer_pattern(sliding: list[bool]) -> str:
    """"k:1" when the layers repeat k sliding then one full (the last period may be cut short), else the counts
    "s:f" of sliding and full layers."""
    if all(sliding):
        return f"{len(sliding)}:0"
    k = sliding.index(False)
    if all(s == ((i + 1) % (k + 1) != 0) for i, s in enumerate(sliding)):
        return f"{k}:1"
    return f"{sum(sliding)}:{len(sliding) - sum(sliding)}"


def format_bytes(n: float) -> str:
    """1536 → "1.5 KiB": binary units, three significant figures or so."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
