"""Multi-head latent attention (model/mla.py): cached decoding equals the uncached model on every input_pos path,
the cache holds only the latent and the rotary key, and the model trains and generates from the CLI."""

import pytest
import torch
from clitools import run

from llmscratch.config import ModelConfig
from llmscratch.errors import UserError
from llmscratch.generate import DecodeBatch, Row, generate_ids
from llmscratch.model import GPT
from llmscratch.model.attention import RowPositions
from llmscratch.model.mla import LatentAttention, LatentKVCache
from llmscratch.model.rope import rope_cos_sin
from llmscratch.model.transformer import flops_per_token


def _cfg(q_lora_rank: int = 0, **changes) -> ModelConfig:
    return ModelConfig.from_preset("mla-micro", vocab_size=97, context_length=32, q_lora_rank=q_lora_rank,
                                   **changes)


def _cached(model, idx, sizes):
    model.setup_kv_cache(idx.size(0), idx.size(1))
    outs, pos = [], 0
    for size in sizes:
        outs.append(model(idx[:, pos:pos + size], input_pos=pos))
        pos += size
    model.clear_kv_cache()
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("q_lora_rank", [0, 12])
@pytest.mark.parametrize("sizes", [[7] + [1] * 13, [3, 3, 3, 3, 3, 3, 2], [1] * 20, [20]])
def test_cached_equals_uncached(q_lora_rank, sizes):
    model = GPT(_cfg(q_lora_rank, dropout=0.1)).eval()  # dropout must be off in eval
    idx = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(_cached(model, idx, sizes), model(idx), atol=1e-5, rtol=1e-5)


def test_cached_up_to_the_full_context():
    model = GPT(_cfg(8)).eval()
    idx = torch.randint(0, 97, (1, 32))
    with torch.no_grad():
        torch.testing.assert_close(_cached(model, idx, [30, 1, 1]), model(idx), atol=1e-5, rtol=1e-5)


def test_static_cache_path_equals_uncached():
    """The 0-dim tensor position of the compiled decoding step: the whole cache is read, its tail masked."""
    model = GPT(_cfg()).eval()
    idx = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        full = model(idx)
        model.setup_kv_cache(2, 32)
        outs = [model(idx[:, :5], input_pos=torch.tensor(0))]
        outs += [model(idx[:, t:t + 1], input_pos=torch.tensor(t)) for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=1e-5, rtol=1e-5)


def test_rows_at_their_own_positions_equal_each_row_alone():
    """Batched decoding (RowPositions): two prompts of 4 and 9 tokens prefilled in one padded call into cache rows
    1 and 0, then decoded together a token at a time; each row's logits equal its sequence run alone."""
    model = GPT(_cfg(12)).eval()
    a, b = torch.randint(0, 97, (14,)), torch.randint(0, 97, (19,))
    with torch.no_grad():
        alone_a, alone_b = model(a[None])[0], model(b[None])[0]
        model.setup_kv_cache(2, 24)
        prompt = torch.stack([torch.cat([a[:4], torch.zeros(5, dtype=torch.long)]), b[:9]])
        first = model(prompt, input_pos=RowPositions.make([0, 0], [4, 9], rows=[1, 0]))
        torch.testing.assert_close(first[0, :4], alone_a[:4], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(first[1], alone_b[:9], atol=1e-5, rtol=1e-5)
        for step in range(10):
            idx = torch.stack([a[4 + step:5 + step], b[9 + step:10 + step]])
            out = model(idx, input_pos=RowPositions.make([4 + step, 9 + step], 1, rows=[1, 0]))
            torch.testing.assert_close(out[0, 0], alone_a[4 + step], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(out[1, 0], alone_b[9 + step], atol=1e-5, rtol=1e-5)


def test_cache_holds_the_latent_and_the_rotary_key_only():
    cfg = _cfg()
    model = GPT(cfg)
    model.setup_kv_cache(3, 10)
    caches = [block.attn.kv_cache for block in model.blocks]
    assert all(isinstance(c, LatentKVCache) for c in caches)
    per_token = sum(t.numel() for c in caches for t in c.buffers()) // (3 * 10)
    assert per_token == cfg.n_layers * (cfg.kv_lora_rank + cfg.rope_head_dim) == 2 * (16 + 8)
    assert caches[0].latent.shape == (3, 10, 16) and caches[0].k_rope.shape == (3, 10, 8)
    assert set(model.state_dict()) == set(GPT(cfg).state_dict())  # the cache is not saved


def test_cache_resize_and_row_move_keep_entries():
    cache = LatentKVCache(2, 4, 6, 2, torch.float32)
    latent, k_rope = torch.randn(2, 3, 6), torch.randn(2, 3, 2)
    cache.update(0, latent, k_rope)
    bigger = cache.resized(8)
    assert bigger.max_len == 8 and torch.equal(bigger.latent[:, :3], latent) and not bigger.k_rope[:, 3:].any()
    bigger.move_rows(1, 0, 3)
    assert torch.equal(bigger.latent[0, :3], latent[1]) and torch.equal(bigger.k_rope[0, :3], k_rope[1])
    with pytest.raises(ValueError, match="4 positions"):
        cache.update(2, latent, k_rope)


def test_absorbed_decoding_equals_up_projected_keys():
    """W_uk folded into the query (the path of one-token decoding steps) gives the attention of the explicit
    per-head keys and values, for many queries under the causal mask too."""
    cfg = _cfg()
    attn = LatentAttention(cfg).eval()
    for p in attn.parameters():
        torch.nn.init.normal_(p, 0.0, 0.3)
    x = torch.randn(2, 9, cfg.d_model)
    cos_sin = rope_cos_sin(torch.arange(9), GPT(cfg).inverse_frequencies(x.device), x.dtype)
    q_nope, q_rope = attn._queries(x, cos_sin)
    latent, k_rope = attn._latents(x, cos_sin)
    heads = attn._attend_heads(q_nope, q_rope, latent, k_rope, None, True)
    absorbed = attn._attend_latent(q_nope, q_rope, latent, k_rope, None, True)
    torch.testing.assert_close(absorbed, heads, atol=1e-5, rtol=1e-5)
    # The weights drawn for pictures (viz.py) are the ones applied: weights @ values gives the same output.
    weights = attn.attention_weights(x, cos_sin)  # (B, nh, T, T)
    values = attn.kv_up(latent).view(2, 9, cfg.n_heads, 2 * cfg.head_dim)[..., cfg.head_dim:].transpose(1, 2)
    torch.testing.assert_close(weights @ values, heads, atol=1e-5, rtol=1e-5)


def test_tensor_positions_without_a_cache_raise():
    model = GPT(_cfg()).eval()
    idx = torch.randint(0, 97, (1, 3))
    with pytest.raises(ValueError, match="setup_kv_cache"):
        model(idx, input_pos=torch.tensor(0))


@pytest.mark.parametrize("q_lora_rank", [0, 12])
def test_gradients_reach_every_parameter(q_lora_rank):
    model = GPT(_cfg(q_lora_rank))
    idx = torch.randint(0, 97, (2, 16))
    model(idx, targets=idx).backward()
    names = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert names == []
    assert any(n.endswith("attn.q_down.weight") for n, _ in model.named_parameters()) == (q_lora_rank > 0)


def test_rope_frequencies_cover_the_rotary_part_only():
    cfg = _cfg()
    assert GPT(cfg).inverse_frequencies(torch.device("cpu")).shape == (cfg.rope_head_dim // 2,)


def test_init_scales_the_output_projection_and_draws_the_rest():
    torch.manual_seed(0)
    cfg = _cfg(24, n_layers=4, d_model=128, n_heads=8, kv_lora_rank=64)
    model = GPT(cfg)
    attn = model.blocks[0].attn
    for w in (attn.q_down.weight, attn.q_proj.weight, attn.kv_down.weight, attn.kv_up.weight):
        assert w.std().item() == pytest.approx(0.02, rel=0.1)
    assert attn.proj.weight.std().item() == pytest.approx(0.02 / (2 * 4) ** 0.5, rel=0.1)
    assert torch.equal(attn.kv_norm.weight, torch.ones(64)) and torch.equal(attn.q_norm.weight, torch.ones(24))


@pytest.mark.parametrize("q_lora_rank", [0, 12])
def test_flops_count_every_matmul(q_lora_rank):
    cfg = _cfg(q_lora_rank)
    n = sum(m.weight.numel() for m in GPT(cfg).modules() if isinstance(m, torch.nn.Linear))
    assert flops_per_token(cfg, seq_len=1) == pytest.approx(6 * n, rel=0.02)
    # QKᵀ over head_dim + rope_head_dim per head, AV over head_dim: 2 FLOPs each, ×3 for training.
    per_position = 3 * 2 * cfg.n_layers * cfg.n_heads * (2 * cfg.head_dim + cfg.rope_head_dim)
    assert flops_per_token(cfg, 16) - flops_per_token(cfg, 1) == pytest.approx(per_position * 15)


def test_config_refuses_what_mla_does_not_have():
    with pytest.raises(UserError, match="rope_head_dim"):
        _cfg(rope_head_dim=0)
    with pytest.raises(UserError, match="position to rope"):
        _cfg(position="learned")
    with pytest.raises(UserError, match="n_kv_heads"):
        _cfg(n_kv_heads=2)


def test_cached_generation_gives_the_uncached_tokens():
    model = GPT(_cfg(12)).eval()
    prompt = torch.randint(0, 97, (2, 5))
    cached = torch.stack(list(generate_ids(model, prompt, 12)), dim=1)
    plain = torch.stack(list(generate_ids(model, prompt, 12, use_cache=False)), dim=1)
    assert torch.equal(cached, plain)


def test_continuous_batching_equals_decoding_alone():
    """Rows joining and leaving a 2-row batch whose cache starts short and grows (`resized`), the last row moved
    into a freed place (`move_rows`); sampled with a seed so the tokens vary. Each row gets its tokens alone."""
    torch.manual_seed(0)
    model = GPT(_cfg(12)).eval()
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (4, 9, 2, 6)]
    wanted, sampling = [3, 12, 7, 9], dict(temperature=1.0, seed=5)
    batch = DecodeBatch(model, max_rows=2, max_len=8)
    rows = [Row(p, key=i, **sampling) for i, p in enumerate(prompts)]
    for r in rows:
        batch.add(r)
    while len(batch):
        for row, _ in batch.step():
            if len(row.generated) == wanted[row.key]:
                batch.remove(row)
    batch.close()
    for p, r, n in zip(prompts, rows, wanted):
        alone = [int(t[0]) for t in generate_ids(model, torch.tensor([p]), n, **sampling)]
        assert r.generated == alone
    assert len(set(rows[1].generated)) > 3  # sampled: not one token repeated


def test_cli_pretrains_generates_and_reports_mla_micro(prepared, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, out, err = run(["pretrain", "--data", prepared, "--out", run_dir, "--model", "mla-micro",
                          "--train.max_steps", 4, "--train.batch_size", 2, "--train.eval_every", 2,
                          "--train.eval_batches", 1, "--train.save_every", 4, "--context-length", 32,
                          "--no-progress"], capsys)
    assert code == 0, err
    assert ModelConfig.load(run_dir / "config.json").attention == "mla"
    code, out, err = run(["generate", run_dir, "--prompt", "The module", "--max-new-tokens", 6, "--seed", 1],
                         capsys)
    assert code == 0, err
    assert out.startswith("The module") and len(out.strip()) > len("The module")
    code, out, err = run(["info", run_dir], capsys)
    assert code == 0 and "MLA latent 16 + rope 8: 96 B/token" in out


def test_an_mla_checkpoint_does_not_export_to_hugging_face(tmp_path, capsys):
    """transformers has no Llama/Qwen3 class with latent attention: `convert to-hf` refuses in one line and
    writes nothing."""
    from clitools import assert_user_error

    from llmscratch.checkpoint import save_model

    save_model(tmp_path / "mla", GPT(ModelConfig.from_preset("mla-micro")))
    code, _, err = run(["convert", "to-hf", tmp_path / "mla", tmp_path / "hf"], capsys)
    assert_user_error(code, err, "multi-head latent", "does not export")
    assert not (tmp_path / "hf").exists()
