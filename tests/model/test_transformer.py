"""The GPT: shapes, tied head, causality, KV cache == no cache, context limit, FLOPs and initialisation."""

import math

import pytest
import torch

from llmscratch.config import ModelConfig
from llmscratch.model import GPT, KVCache, ModelOptions, flops_per_token


def test_logits_shape(cfg):
    model = GPT(cfg)
    assert model(torch.randint(0, cfg.vocab_size, (3, 11))).shape == (3, 11, cfg.vocab_size)


def test_last_only_logits_are_the_last_positions_logits(cfg, gqa_cfg):
    for c in (cfg, gqa_cfg):
        torch.manual_seed(0)
        model = GPT(c).eval()
        idx = torch.randint(0, c.vocab_size, (2, 9))
        with torch.no_grad():
            full, last = model(idx), model(idx, last_only=True)
        assert last.shape == (2, 1, c.vocab_size)
        torch.testing.assert_close(last, full[:, -1:], atol=1e-6, rtol=1e-5)


def test_tied_head_shares_storage(cfg):
    model = GPT(cfg)
    assert model.lm_head.weight is model.tok_emb.weight
    assert model.lm_head.weight.data_ptr() == model.tok_emb.weight.data_ptr()
    with torch.no_grad():
        model.tok_emb.weight[3, 5] = 7.0
    assert model.lm_head.weight[3, 5].item() == 7.0
    # A tied head is one parameter, counted once.
    assert sum(1 for p in model.parameters() if p is model.tok_emb.weight) == 1


def test_untied_head_is_separate(cfg):
    model = GPT(cfg.replace(tie_embeddings=False))
    assert model.lm_head.weight.data_ptr() != model.tok_emb.weight.data_ptr()
    tied = GPT(cfg)
    assert model.num_params() == tied.num_params() + cfg.vocab_size * cfg.d_model


def test_causal_changing_a_token_leaves_earlier_logits_alone(cfg):
    model = GPT(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    base = model(idx)
    for t in (0, 5, 15):
        changed = idx.clone()
        changed[:, t] = (changed[:, t] + 1) % cfg.vocab_size
        out = model(changed)
        torch.testing.assert_close(out[:, :t], base[:, :t], atol=1e-6, rtol=0)
        assert not torch.allclose(out[:, t], base[:, t])  # the position itself does see the change


def test_batch_rows_are_independent(cfg):
    model = GPT(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (3, 10))
    torch.testing.assert_close(model(idx)[1:2], model(idx[1:2]), atol=1e-5, rtol=1e-5)


def _cached_logits(model, idx, chunk_sizes):
    B, T = idx.shape
    model.setup_kv_cache(B, T)
    outs, pos = [], 0
    for size in chunk_sizes:
        outs.append(model(idx[:, pos : pos + size], input_pos=pos))
        pos += size
    assert pos == T
    model.clear_kv_cache()
    return torch.cat(outs, dim=1)


def _chunks(total, first, rest):
    sizes = [first]
    while sum(sizes) < total:
        sizes.append(min(rest, total - sum(sizes)))
    return sizes


@pytest.mark.parametrize("kind", ["mha", "gqa"])
@pytest.mark.parametrize("schedule", ["prefill+steps", "chunks-of-3", "all-steps"])
def test_kv_cache_equals_uncached(cfg, gqa_cfg, kind, schedule):
    config = (cfg if kind == "mha" else gqa_cfg).replace(dropout=0.1)  # dropout must be off in eval
    model = GPT(config).eval()
    idx = torch.randint(0, config.vocab_size, (2, 20))
    full = model(idx)
    sizes = {"prefill+steps": _chunks(20, 7, 1), "chunks-of-3": _chunks(20, 3, 3),
             "all-steps": _chunks(20, 1, 1)}[schedule]
    cached = _cached_logits(model, idx, sizes)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)


def test_kv_cache_up_to_the_full_context(cfg):
    model = GPT(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (2, cfg.context_length))
    full = model(idx)
    cached = _cached_logits(model, idx, _chunks(cfg.context_length, 30, 1))
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)


def test_kv_cache_setup_and_clear(cfg, gqa_cfg):
    model = GPT(gqa_cfg)
    assert not model.has_kv_cache
    model.setup_kv_cache(3, 10)
    assert model.has_kv_cache
    cache = model.blocks[0].attn.kv_cache
    assert cache.k.shape == (3, gqa_cfg.n_kv_heads, 10, gqa_cfg.head_dim)  # GQA: the cache is narrower
    model.setup_kv_cache(1, 10_000)
    assert model.blocks[0].attn.kv_cache.max_len == gqa_cfg.context_length  # never beyond the context
    model.clear_kv_cache()
    assert not model.has_kv_cache
    assert all(b.attn.kv_cache is None for b in model.blocks)


def test_kv_cache_buffers_are_not_saved(cfg):
    model = GPT(cfg)
    keys = set(model.state_dict())
    model.setup_kv_cache(2, 8)
    assert set(model.state_dict()) == keys


def test_kv_cache_overflow_raises():
    cache = KVCache(1, 4, 2, 8, torch.float32)
    k = torch.randn(1, 2, 3, 8)
    cache.update(0, k, k)
    with pytest.raises(ValueError, match="4 positions"):
        cache.update(3, k, k)


def test_kv_cache_update_returns_filled_prefix():
    cache = KVCache(2, 6, 1, 4, torch.float32)
    k1, v1 = torch.randn(2, 1, 2, 4), torch.randn(2, 1, 2, 4)
    k2, v2 = torch.randn(2, 1, 1, 4), torch.randn(2, 1, 1, 4)
    cache.update(0, k1, v1)
    k, v = cache.update(2, k2, v2)
    torch.testing.assert_close(k, torch.cat([k1, k2], dim=2))
    torch.testing.assert_close(v, torch.cat([v1, v2], dim=2))


def test_sequence_longer_than_context_raises(cfg):
    model = GPT(cfg)
    with pytest.raises(ValueError, match="context_length"):
        model(torch.zeros(1, cfg.context_length + 1, dtype=torch.long))
    model(torch.zeros(1, cfg.context_length, dtype=torch.long))  # exactly the context is fine
    model.setup_kv_cache(1)
    with pytest.raises(ValueError, match="context_length"):
        model(torch.zeros(1, 2, dtype=torch.long), input_pos=cfg.context_length - 1)


def test_backward_reaches_every_parameter(cfg):
    model = GPT(cfg.replace(tie_embeddings=False))
    idx = torch.randint(0, cfg.vocab_size, (2, 8))
    loss = torch.nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.flatten())
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


# --- FLOPs --------------------------------------------------------------------------------------------------
def _matmul_weights(model: GPT) -> int:
    """Weights of every Linear layer, the LM head included (a tied head is still a matmul)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


@pytest.mark.parametrize("n_kv_heads", [None, 2])
def test_flops_per_token_is_about_6n_for_training(cfg, n_kv_heads):
    config = cfg.replace(n_kv_heads=n_kv_heads or cfg.n_heads)
    n = _matmul_weights(GPT(config))
    train = flops_per_token(config, seq_len=1, training=True)
    assert train > 0
    assert train == pytest.approx(6 * n, rel=0.02)
    # Attention's T-dependent term: 2 matmuls · 2 FLOPs · n_layers · T · d_model, ×3 for training.
    expected_t_term = 3 * 2 * 2 * config.n_layers * config.d_model * (16 - 1)
    assert flops_per_token(config, 16) - flops_per_token(config, 1) == pytest.approx(expected_t_term)


def test_flops_forward_is_a_third_of_training(cfg):
    assert flops_per_token(cfg, 8, training=True) == pytest.approx(3 * flops_per_token(cfg, 8, training=False))
    # seq_len defaults to the context length
    assert flops_per_token(cfg) == flops_per_token(cfg, cfg.context_length)


def test_flops_gpt2_124m_matches_kaplan_estimate():
    # Kaplan et al.: C_forward ≈ 2N + 2·n_layer·n_ctx·d_model; N(non-embedding) ≈ 85M for GPT-2 small.
    cfg = ModelConfig.from_preset("gpt2-124m")
    forward = flops_per_token(cfg, training=False)
    n_nonemb = 12 * 12 * 768**2
    expected = 2 * (n_nonemb + 768 * 50257) + 2 * 2 * 12 * 1024 * 768
    assert forward == pytest.approx(expected, rel=0.01)


# --- initialisation -----------------------------------------------------------------------------------------
def test_init_gpt2_style():
    cfg = ModelConfig(vocab_size=512, context_length=64, d_model=128, n_layers=4, n_heads=4,
                      tie_embeddings=False)
    torch.manual_seed(0)
    model = GPT(cfg)
    residual_std = 0.02 / math.sqrt(2 * cfg.n_layers)
    seen = set()
    for name, p in model.named_parameters():
        seen.add(name)
        if name.endswith("bias"):
            assert torch.all(p == 0), name
        elif "norm" in name:
            assert torch.all(p == 1), name
        elif name.endswith(("attn.proj.weight", "mlp.proj.weight")):
            assert p.std().item() == pytest.approx(residual_std, rel=0.05), name
            assert abs(p.mean().item()) < residual_std / 10, name
        else:
            assert p.std().item() == pytest.approx(0.02, rel=0.05), name
            assert abs(p.mean().item()) < 0.002, name
    assert {"tok_emb.weight", "pos_emb.weight", "lm_head.weight", "blocks.0.attn.qkv.weight",
            "blocks.3.mlp.fc.weight", "blocks.3.mlp.proj.weight", "blocks.0.attn.proj.weight"} <= seen


def test_building_on_the_meta_device_draws_nothing():
    """Checkpoints are loaded into a model built on the meta device. PyTorch's normal_ there imports
    torch._dynamo first (~1.5 s of every CLI command that loads a model), so building must not call it."""
    import subprocess
    import sys

    code = ("import sys, torch\n"
            "from llmscratch import GPT, ModelConfig\n"
            "with torch.device('meta'):\n"
            "    m = GPT(ModelConfig.from_preset('gpt2-124m'))\n"
            "assert m.tok_emb.weight.is_meta and m.pos_emb.weight.is_meta\n"
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False"]


def test_init_std_follows_config():
    cfg = ModelConfig(vocab_size=512, context_length=64, d_model=128, n_layers=1, n_heads=4, init_std=0.05)
    model = GPT(cfg)
    assert model.tok_emb.weight.std().item() == pytest.approx(0.05, rel=0.05)


def test_initial_loss_is_near_log_vocab(cfg):
    # With std-0.02 weights the logits are almost flat, so the untrained loss is ≈ ln(vocab).
    model = GPT(cfg)
    idx = torch.randint(0, cfg.vocab_size, (4, 32))
    # Targets independent of the inputs: with a tied head the input token's own logit is slightly raised.
    targets = torch.randint(0, cfg.vocab_size, (4, 32))
    loss = torch.nn.functional.cross_entropy(model(idx).flatten(0, 1), targets.flatten())
    assert loss.item() == pytest.approx(math.log(cfg.vocab_size), rel=0.05)


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    cfg = ModelConfig(vocab_size=120, context_length=16, d_model=32, n_layers=3, n_heads=4, dropout=0.1)
    torch.manual_seed(0)
    a, b = GPT(cfg), GPT(cfg)
    b.load_state_dict(a.state_dict())
    b.set_options(activation_checkpointing=True)
    x, y = torch.randint(0, 120, (2, 16)), torch.randint(0, 120, (2, 16))
    torch.manual_seed(1)
    la = a(x, targets=y)
    la.backward()
    torch.manual_seed(1)
    lb = b(x, targets=y)  # dropout masks are replayed identically in the recomputation
    lb.backward()
    torch.testing.assert_close(lb, la)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)


def test_low_precision_residual_carries_bf16_between_blocks_under_autocast_only():
    cfg = ModelConfig(vocab_size=120, context_length=16, d_model=32, n_layers=2, n_heads=4)
    torch.manual_seed(0)
    m = GPT(cfg)
    x, y = torch.randint(0, 120, (2, 16)), torch.randint(0, 120, (2, 16))
    seen = []
    m.blocks[1].register_forward_pre_hook(lambda mod, args: seen.append(args[0].dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = m(x, targets=y)
        m.set_options(low_precision_residual=True)
        low = m(x, targets=y)
    assert seen == [torch.float32, torch.bfloat16]
    torch.testing.assert_close(low, ref, atol=2e-2, rtol=0)  # bf16 tolerance on a loss of ~4.8
    plain_fp32 = m(x, targets=y)  # without autocast the flag changes nothing
    assert seen[-1] == torch.float32 and plain_fp32.dtype == torch.float32


def test_options_are_one_instance_shared_by_the_layers_and_changed_in_place(cfg):
    m = GPT(cfg)
    opts = m.options
    assert opts == ModelOptions()
    assert all(b.attn.options is opts and b.mlp.options is opts for b in m.blocks)
    assert m.set_options(qkv_kernel=True, gelu_kernel="never") is opts
    assert m.blocks[0].attn.options.qkv_kernel and m.blocks[-1].mlp.options.gelu_kernel == "never"


def test_constructor_options_are_copied_per_model(cfg):
    given = ModelOptions(low_precision_residual=True, loss_kernel=False)
    a, b = GPT(cfg, given), GPT(cfg, given)
    assert a.options == given and a.options is not given
    a.set_options(low_precision_residual=False)
    assert b.options.low_precision_residual and given.low_precision_residual


def test_set_options_refuses_unknown_names_and_bad_values_and_changes_nothing(cfg):
    m = GPT(cfg)
    with pytest.raises(TypeError, match="no_such_option"):
        m.set_options(qkv_kernel=True, no_such_option=1)
    with pytest.raises(ValueError, match="gelu_kernel"):
        m.set_options(qkv_kernel=True, gelu_kernel="sometimes")
    with pytest.raises(TypeError, match="activation_checkpointing"):
        m.set_options(activation_checkpointing="yes")
    assert m.options == ModelOptions()
    with pytest.raises(ValueError, match="gelu_kernel"):
        ModelOptions(gelu_kernel="eager")


def test_a_compiled_model_follows_changed_options(cfg):
    """Dynamo guards on the option values it read: a change retraces instead of running the stale graph."""
    m = GPT(cfg)
    seen = []
    m.blocks[1].register_forward_pre_hook(lambda mod, args: seen.append(args[0].dtype))
    x, y = torch.randint(0, cfg.vocab_size, (2, 8)), torch.randint(0, cfg.vocab_size, (2, 8))
    compiled = torch.compile(m, backend="eager")
    torch._dynamo.reset()
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            compiled(x, targets=y)
            m.set_options(low_precision_residual=True)
            compiled(x, targets=y)
    finally:
        torch._dynamo.reset()
    assert seen == [torch.float32, torch.bfloat16]
