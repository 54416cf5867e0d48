"""KV-cache estimates (model/memory.py) equal the bytes of the cache tensors `GPT.setup_kv_cache` really allocates,
for every attention variant: MHA, GQA, MLA and sliding-window layers, below, at and past the window."""

import pytest
import torch
from clitools import run

from llmscratch.config import ModelConfig
from llmscratch.model import GPT
from llmscratch.model.memory import (
    attention_variant,
    format_bytes,
    kv_bytes_per_token,
    kv_cache_bytes,
    values_per_token,
)


def _allocated(cfg: ModelConfig, batch_size: int, positions: int, dtype=torch.bfloat16, device="meta") -> int:
    """Bytes of every layer's cache buffers after `setup_kv_cache` (the model's weights on the meta device: only
    shapes, so even a 1B model at its full context costs nothing)."""
    with torch.device("meta"):
        model = GPT(cfg)
    model.setup_kv_cache(batch_size, positions, dtype=dtype, device=device)
    caches = [block.attn.kv_cache for block in model.blocks]
    assert all(c is not None for c in caches)
    return sum(t.nbytes for c in caches for t in c.buffers())


def _sliding(layer_types: tuple[str, ...] = ("sliding",) * 4 + ("full",)) -> ModelConfig:
    """A small GQA model with 5 layers, by default a 4:1 local:global pattern, and a 6-position window."""
    return ModelConfig.from_preset("llama-micro", n_layers=5, layer_types=list(layer_types), sliding_window=6)


CONFIGS = {
    "gpt2-124m": lambda: ModelConfig.from_preset("gpt2-124m"),
    "llama-micro": lambda: ModelConfig.from_preset("llama-micro"),
    "llama3.2-1b": lambda: ModelConfig.from_preset("llama3.2-1b"),
    "qwen3-micro": lambda: ModelConfig.from_preset("qwen3-micro"),
    "qwen3-moe-micro": lambda: ModelConfig.from_preset("qwen3-moe-micro"),
    "mla-micro": lambda: ModelConfig.from_preset("mla-micro"),
    "mla-q-lora": lambda: ModelConfig.from_preset("mla-micro", q_lora_rank=24, kv_lora_rank=40, rope_head_dim=6),
    "gemma3-micro": lambda: ModelConfig.from_preset("gemma3-micro"),
    "gemma3-270m": lambda: ModelConfig.from_preset("gemma3-270m"),
    "gemma3-1b": lambda: ModelConfig.from_preset("gemma3-1b"),
    "swa-4:1": _sliding,
    "swa-all-sliding": lambda: _sliding(layer_types=["sliding"] * 5),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_estimate_equals_the_allocated_cache(name):
    cfg = CONFIGS[name]()
    window = cfg.sliding_window or 8
    lengths = {1, 5, window - 1, window, window + 1, cfg.context_length, 2 * cfg.context_length}
    for positions in sorted(n for n in lengths if n > 0):
        for batch_size in (1, 3):
            assert kv_cache_bytes(cfg, positions, 2, batch_size) == _allocated(cfg, batch_size, positions), \
                (positions, batch_size)


@pytest.mark.parametrize("name", ["swa-4:1", "mla-micro"])
def test_estimate_equals_real_fp32_tensors(name):
    """The same on real CPU tensors, 4 bytes a value."""
    cfg = CONFIGS[name]()
    assert kv_cache_bytes(cfg, 20, 4, 2) == _allocated(cfg, 2, 20, torch.float32, "cpu")


def test_per_token_is_the_growth_until_the_window_then_only_full_layers_grow():
    cfg = _sliding()
    per_token = kv_bytes_per_token(cfg)
    assert per_token == 2 * 5 * (2 * 2 * 16)  # bf16 · layers · (k and v of 2 heads of 16)
    assert kv_cache_bytes(cfg, 6) - kv_cache_bytes(cfg, 5) == per_token  # within the window: every layer grows
    assert kv_cache_bytes(cfg, 7) - kv_cache_bytes(cfg, 6) == per_token // 5  # past it: the one full layer
    assert kv_cache_bytes(cfg, 64) == 6 * per_token + 58 * per_token // 5


def test_values_per_token_per_variant():
    assert values_per_token(ModelConfig.from_preset("gpt2-124m")) == 2 * 12 * 64
    assert values_per_token(ModelConfig.from_preset("llama3.2-1b")) == 2 * 8 * 64
    assert values_per_token(ModelConfig.from_preset("mla-micro")) == 16 + 8
    # Gemma 3's 1B: one 256-wide KV head; at its 32K context the 5:1 pattern keeps 22 of 26 layers at 512 positions.
    gemma = ModelConfig.from_preset("gemma3-1b")
    assert values_per_token(gemma) == 512
    assert kv_cache_bytes(gemma, 32768) == 2 * 512 * (4 * 32768 + 22 * 512)


def test_variant_names():
    assert attention_variant(ModelConfig.from_preset("gpt2-124m")) == "MHA"
    assert attention_variant(ModelConfig.from_preset("llama3.2-1b")) == "GQA 32:8"
    assert attention_variant(ModelConfig.from_preset("mla-micro")) == "MLA latent 16 + rope 8"
    assert attention_variant(ModelConfig.from_preset("gemma3-1b")) == "GQA 4:1, SWA 512 pattern 5:1"
    assert attention_variant(_sliding()) == "GQA 4:2, SWA 6 pattern 4:1"
    assert attention_variant(_sliding(layer_types=["sliding", "full", "full", "sliding", "sliding"])).endswith(
        "pattern 3:2")
    assert attention_variant(_sliding(layer_types=["sliding"] * 5)).endswith("pattern 5:0")


def test_format_bytes():
    assert [format_bytes(n) for n in (96, 1536, 36 * 2**20, 4 * 2**30)] == ["96 B", "1.5 KiB", "36.0 MiB",
                                                                            "4.0 GiB"]


def test_info_prints_the_kv_rows(capsys):
    code, out, err = run(["info", "gemma3-1b"], capsys)
    assert code == 0, err
    row = next(line for line in out.splitlines() if line.startswith("KV cache"))
    assert "GQA 4:1, SWA 512 pattern 5:1: 26.0 KiB/token" in row
    assert "per sequence at the full context" in row and "(average 4.3 KiB/token)" in row
    code, out, err = run(["info", "mla-micro"], capsys)
    assert code == 0 and "MLA latent 16 + rope 8: 96 B/token in bf16, 6.0 KiB per sequence" in out
