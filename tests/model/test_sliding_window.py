"""Sliding-window attention and its window-only KV cache (model/attention.py), and the rest of Gemma 3 in `GPT`:
the mask matches transformers' convention, every cached path (int, 0-dim tensor, `RowPositions`, the T == 1 CPU
branch) equals the uncached forward also past the window, and a sliding layer's cache never grows past it."""

import math

import pytest
import torch

from llmscratch.config import ModelConfig
from llmscratch.errors import UserError
from llmscratch.generate import DecodeBatch, Row, generate_ids
from llmscratch.model import GPT
from llmscratch.model.attention import (
    CausalSelfAttention,
    RowPositions,
    WindowKVCache,
    attention_reference,
    sliding_window_mask,
)
from llmscratch.model.layers import SwiGLUMLP, gelu_reference


def micro(**kw) -> GPT:
    """gemma3-micro (window 8, five local layers then one global) with weights large enough that a wrong mask or
    position changes the logits visibly."""
    return GPT(ModelConfig.from_preset("gemma3-micro", init_std=0.3, **kw)).eval()


def test_mask_sees_the_query_and_the_window_minus_one_before_it_as_transformers_does():
    pos = torch.arange(12)
    mask = sliding_window_mask(pos, pos, 4)
    want = torch.tensor([[i - 4 < j <= i for j in range(12)] for i in range(12)])
    assert torch.equal(mask, want) and mask.sum(1).max() == 4
    masking = pytest.importorskip("transformers.masking_utils")
    theirs = masking.sliding_window_causal_mask_function(4)
    t = torch.tensor
    assert all(bool(theirs(t(0), t(0), t(i), t(j))) == bool(mask[i, j]) for i in range(12) for j in range(12))
    assert not sliding_window_mask(pos[:1] + 5, torch.tensor([-1, 3, 5]), 4)[0, 0]  # an empty slot is never seen


def test_uncached_window_layer_equals_the_written_out_banded_softmax():
    layer = CausalSelfAttention(32, 4, 2, qkv_bias=False, window=5, scale=0.3).eval()
    x = torch.randn(2, 13, 32)
    q, k, v = layer._heads(x, None)
    k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    pos = torch.arange(13)
    y = attention_reference(q, k, v, sliding_window_mask(pos, pos, 5), scale=0.3)
    want = layer.proj(y.transpose(1, 2).reshape(2, 13, 32))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5)
        weights = layer.attention_weights(x)  # what the pictures show is what the layer applies
        torch.testing.assert_close(layer.proj((weights @ v).transpose(1, 2).reshape(2, 13, 32)), want,
                                   atol=1e-5, rtol=1e-5)
    assert torch.all(weights[..., ~sliding_window_mask(pos, pos, 5)] == 0)


def test_int_positions_prefill_longer_than_the_window_then_steps_and_chunks_equal_uncached():
    m = micro()
    ids = torch.randint(0, 512, (2, 40))
    with torch.no_grad():
        want = m(ids)
        m.setup_kv_cache(2, 40)
        got = [m(ids[:, :13], input_pos=0)]  # the prompt already longer than the window (8)
        got += [m(ids[:, t:t + 1], input_pos=t) for t in range(13, 22)]  # T == 1: the CPU branch
        got += [m(ids[:, 22:25], input_pos=22), m(ids[:, 25:40], input_pos=25)]  # chunks shorter and longer
    torch.testing.assert_close(torch.cat(got, 1), want, atol=1e-5, rtol=1e-5)


def test_static_tensor_positions_equal_uncached_past_the_window():
    m = micro()
    ids = torch.randint(0, 512, (2, 30))
    with torch.no_grad():
        want = m(ids)
        m.setup_kv_cache(2, 32)
        got = [m(ids[:, :5], input_pos=torch.tensor(0))]
        got += [m(ids[:, t:t + 1], input_pos=torch.tensor(t)) for t in range(5, 20)]
        got.append(m(ids[:, 20:30], input_pos=torch.tensor(20)))  # a chunk after the ring has wrapped
    torch.testing.assert_close(torch.cat(got, 1), want, atol=1e-5, rtol=1e-5)


def test_row_positions_with_padding_moved_rows_and_a_grown_cache_equal_uncached():
    m = micro()
    ids = torch.randint(0, 512, (2, 30))
    with torch.no_grad():
        want = m(ids)
        m.setup_kv_cache(3, 6)  # shorter than the window: grown below, past it
        a = m(ids[:1, :5], input_pos=RowPositions.make([0], 5, [2]))
        m.resize_kv_cache(32)
        b = m(ids[1:, :3], input_pos=RowPositions.make([0], 3, [0]))
        idx = torch.zeros(2, 14, dtype=torch.long)  # row 2 feeds 1 token, row 0 feeds 14 (padded call)
        idx[0, 0], idx[1] = ids[0, 5], ids[1, 3:17]
        out = m(idx, input_pos=RowPositions.make([5, 3], [1, 14], [2, 0]))
        got0, got1 = [a, out[:1, :1]], [b, out[1:]]
        n0, n1 = 6, 17
        for _ in range(9):  # decoding, both rows past the window
            step = m(torch.stack([ids[0, n0:n0 + 1], ids[1, n1:n1 + 1]]),
                     input_pos=RowPositions.make([n0, n1], 1, [2, 0]))
            got0.append(step[:1])
            got1.append(step[1:])
            n0, n1 = n0 + 1, n1 + 1
        m.move_kv_rows(2, 1, n0)  # as DecodeBatch.remove closes a gap
        got0.append(m(ids[:1, n0:n0 + 4], input_pos=RowPositions.make([n0], 4, [1])))
    torch.testing.assert_close(torch.cat(got0, 1), want[:1, :n0 + 4], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat(got1, 1), want[1:, :n1], atol=1e-5, rtol=1e-5)


def test_generation_crossing_the_window_and_the_context_equals_uncached_and_batched():
    m = micro(context_length=24)
    prompt = torch.randint(0, 512, (2, 11))
    cached = torch.stack(list(generate_ids(m, prompt, 18)), 1)  # 29 tokens: past the context (24) too
    uncached = torch.stack(list(generate_ids(m, prompt, 18, use_cache=False)), 1)
    assert torch.equal(cached, uncached)

    batch = DecodeBatch(m, max_rows=2, max_len=4, prefill_tokens=6)  # chunked prefill, a cache that grows
    rows = [Row(prompt[0].tolist()), Row(prompt[1, :3].tolist())]
    for r in rows:
        batch.add(r)
    while any(len(r.generated) < n for r, n in zip(rows, (8, 14))):
        batch.step()
        if len(rows[0].generated) >= 8 and rows[0] in batch.active:
            batch.remove(rows[0])  # the other row moves into its place
    batch.close()
    assert rows[0].generated[:8] == cached[0, :8].tolist()
    alone = torch.stack(list(generate_ids(m, prompt[1:, :3], 14)), 1)
    assert rows[1].generated[:14] == alone[0].tolist()


def test_window_cache_memory_stays_flat_past_the_window():
    m = micro()
    m.setup_kv_cache(1, 64)
    sliding = [b.attn for b in m.blocks if b.sliding]
    full = [b.attn for b in m.blocks if not b.sliding]
    assert len(sliding) == 5 and len(full) == 1
    buffers = [(a.kv_cache, a.kv_cache.k.data_ptr()) for a in sliding]
    assert all(isinstance(a.kv_cache, WindowKVCache) and a.kv_cache.k.shape[2] == 8 for a in sliding)
    assert full[0].kv_cache.k.shape[2] == 64
    ids = torch.randint(0, 512, (1, 60))
    with torch.no_grad():
        m(ids[:, :20], input_pos=0)
        for t in range(20, 60):
            m(ids[:, t:t + 1], input_pos=t)
    for (cache, ptr), a in zip(buffers, sliding):  # the same 8 slots, written in place, all the way
        assert a.kv_cache is cache and cache.k.data_ptr() == ptr and cache.k.shape == (1, 2, 8, 16)
    nbytes = sum(a.kv_cache.k.numel() + a.kv_cache.v.numel() for a in sliding + full) * 4
    assert nbytes == 2 * 4 * 2 * 16 * (5 * 8 + 64)  # k and v, fp32, 2 heads of 16: 5 windows + 1 full
    with pytest.raises(ValueError, match="holds 64 positions"):
        sliding[0].kv_cache.update(60, torch.zeros(1, 2, 5, 16), torch.zeros(1, 2, 5, 16))


def test_window_cache_fits_and_resized_keep_the_kv_cache_contract():
    cache = WindowKVCache(2, 5, 8, 2, 4, torch.float32)
    assert cache.max_len == 5 and cache.slots == 5
    k = torch.randn(2, 2, 5, 4)
    cache.update(0, k, k)
    grown = cache.resized(20)
    assert grown.max_len == 20 and grown.slots == 8 and torch.equal(grown.k[:, :, :5], k)
    assert grown.fits(2, 12, torch.float32, torch.device("cpu"), at_least=True)
    assert not grown.fits(2, 12, torch.float32, torch.device("cpu"))
    assert not grown.fits(2, 20, torch.bfloat16, torch.device("cpu"))


def test_local_and_global_layers_rotate_with_their_own_bases():
    m = micro()
    inv_global, inv_local = m.inverse_frequencies(torch.device("cpu")), m.inverse_frequencies(torch.device("cpu"),
                                                                                                local=True)
    assert inv_global[1] == pytest.approx(1e6 ** (-2 / 16)) and inv_local[1] == pytest.approx(1e4 ** (-2 / 16))
    seen = []
    hooks = [b.attn.register_forward_pre_hook(lambda mod, args: seen.append(args[2][0])) for b in m.blocks]
    with torch.no_grad():
        m(torch.randint(0, 512, (1, 6)))
    for h in hooks:
        h.remove()
    angles = [torch.acos(cos[3, 1].clamp(-1, 1)).item() for cos in seen]  # position 3, pair 1
    assert angles[:5] == pytest.approx([3 * inv_local[1].item()] * 5) and angles[5] == pytest.approx(
        3 * inv_global[1].item())


def test_embedding_scale_is_rounded_to_the_weights_dtype_as_gemma_does():
    m = micro().to(torch.bfloat16)
    ids = torch.tensor([[3, 4]])
    captured = []
    hook = m.blocks[0].register_forward_pre_hook(lambda mod, args: captured.append(args[0]))
    with torch.no_grad():
        m(ids)
    hook.remove()
    scale = torch.tensor(math.sqrt(64), dtype=torch.bfloat16)
    assert torch.equal(captured[0], m.tok_emb.weight[ids] * scale)


def test_geglu_is_the_gate_through_tanh_gelu():
    mlp = SwiGLUMLP(8, 12, activation="gelu_tanh")
    x = torch.randn(3, 8)
    want = mlp.proj(gelu_reference(mlp.gate(x)) * mlp.up(x))
    torch.testing.assert_close(mlp(x), want, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="activation"):
        SwiGLUMLP(8, 12, activation="relu")


def test_sandwich_norms_are_in_the_block_and_bad_window_settings_are_user_errors():
    block = micro().blocks[0]
    assert block.post_attn_norm is not None and block.post_mlp_norm is not None
    assert micro(post_norms=False).blocks[0].post_attn_norm is None
    with pytest.raises(UserError, match="sliding_window must be positive"):
        ModelConfig.from_preset("gemma3-micro", sliding_window=0)
    with pytest.raises(UserError, match="attn_scale must be positive"):
        ModelConfig.from_preset("gemma3-micro", attn_scale=-1.0)


@pytest.mark.slow
def test_compiled_decoding_with_window_caches_gives_the_same_tokens():
    from llmscratch.generate import generate_ids as gen

    m = micro()
    prompt = torch.randint(0, 512, (2, 5))
    eager = torch.stack(list(gen(m, prompt, 40)), 1)
    compiled = torch.stack(list(gen(m, prompt, 40, compile=True)), 1)
    assert torch.equal(compiled, eager)


def test_flops_count_a_sliding_layers_window_not_the_whole_sequence():
    """Up to the window a sliding layer's attention costs what a full one's does; past it, its window's worth."""
    from llmscratch.model.transformer import flops_per_token

    local = ModelConfig.from_preset("gemma3-1b")
    full = ModelConfig.from_preset("gemma3-1b", layer_types=None)
    assert flops_per_token(local, local.sliding_window) == flops_per_token(full, local.sliding_window)
    T, n_sliding = 8192, sum(local.sliding_layers)
    per_key = 2 * 3 * local.n_heads * local.head_dim * 2  # QKᵀ and AV, forward and backward (×3), per key
    assert flops_per_token(full, T) - flops_per_token(local, T) == per_key * n_sliding * (T - local.sliding_window)
