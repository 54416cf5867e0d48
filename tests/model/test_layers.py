"""The fused ops the model calls equal the hand-written references printed beside them."""

import pytest
import torch
import torch.nn.functional as F

from llmscratch.model import (
    GELUMLP,
    CausalSelfAttention,
    LayerNorm,
    attention_reference,
    gelu_reference,
    layer_norm_reference,
)


def _randomise(module: torch.nn.Module) -> None:
    """Non-trivial weights *and* biases, so a test cannot pass by a bias being zero or a scale being one."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.3)


# --- LayerNorm ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False])
def test_layer_norm_reference_equals_fused(bias):
    norm = LayerNorm(48, eps=1e-5, bias=bias)
    _randomise(norm)
    x = torch.randn(3, 7, 48) * 4 + 2  # off-centre, wide: the mean/variance actually matter
    expected = F.layer_norm(x, (48,), norm.weight, norm.bias, 1e-5)
    torch.testing.assert_close(layer_norm_reference(x, norm.weight, norm.bias, 1e-5), expected,
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(norm(x), expected, atol=1e-5, rtol=1e-5)


def test_layer_norm_output_is_normalised_at_init():
    y = LayerNorm(64)(torch.randn(5, 64) * 10 + 3)
    torch.testing.assert_close(y.mean(-1), torch.zeros(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var(-1, unbiased=False), torch.ones(5), atol=1e-3, rtol=0)


def test_layer_norm_eps_is_used():
    x = torch.randn(4, 16) * 1e-3  # variance ~1e-6, comparable to eps: the eps term changes the result
    w, b = torch.ones(16), torch.zeros(16)
    torch.testing.assert_close(layer_norm_reference(x, w, b, eps=1e-2), F.layer_norm(x, (16,), w, b, 1e-2))
    assert not torch.allclose(layer_norm_reference(x, w, b, eps=1e-2), layer_norm_reference(x, w, b, eps=1e-8))


# --- GELU ---------------------------------------------------------------------------------------------------
def test_gelu_reference_equals_tanh_gelu():
    x = torch.linspace(-8, 8, 2001)
    torch.testing.assert_close(gelu_reference(x), F.gelu(x, approximate="tanh"), atol=1e-6, rtol=1e-6)


def test_gelu_mlp_equals_manual_computation():
    mlp = GELUMLP(16, 40)
    _randomise(mlp)
    x = torch.randn(2, 5, 16)
    h = gelu_reference(x @ mlp.fc.weight.T + mlp.fc.bias)
    expected = h @ mlp.proj.weight.T + mlp.proj.bias
    torch.testing.assert_close(mlp(x), expected, atol=1e-5, rtol=1e-5)


# --- attention_reference ------------------------------------------------------------------------------------
def test_attention_reference_causal_equals_sdpa():
    q, k, v = (torch.randn(2, 3, 9, 8) for _ in range(3))
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(attention_reference(q, k, v, is_causal=True), expected, atol=1e-5, rtol=1e-5)


def test_attention_reference_unmasked_equals_sdpa():
    q, k, v = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 6, 8), torch.randn(2, 3, 6, 8)
    expected = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(attention_reference(q, k, v), expected, atol=1e-5, rtol=1e-5)


def test_attention_reference_bool_mask_equals_sdpa():
    # Tq != Tk, as when new queries attend to cached keys; every row keeps at least one key.
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 11, 8), torch.randn(2, 3, 11, 8)
    mask = torch.rand(5, 11) > 0.5
    mask[torch.arange(5), torch.arange(5) + 6] = True
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(attention_reference(q, k, v, mask=mask), expected, atol=1e-5, rtol=1e-5)


def test_attention_reference_causal_mask_matches_explicit_tril():
    q, k, v = (torch.randn(1, 2, 6, 4) for _ in range(3))
    tril = torch.tril(torch.ones(6, 6, dtype=torch.bool))
    torch.testing.assert_close(attention_reference(q, k, v, is_causal=True), attention_reference(q, k, v, tril))


# --- CausalSelfAttention ------------------------------------------------------------------------------------
def _manual_attention(attn: CausalSelfAttention, x: torch.Tensor) -> torch.Tensor:
    """The module's forward, recomputed from its weights with attention_reference and an explicit per-head
    gather of the shared key/value head (query head h reads kv head h // group)."""
    B, T, C = x.shape
    nh, nkv, hs = attn.n_heads, attn.n_kv_heads, attn.head_dim
    qkv = x @ attn.qkv.weight.T
    if attn.qkv.bias is not None:
        qkv = qkv + attn.qkv.bias
    q = qkv[..., : nh * hs].reshape(B, T, nh, hs).permute(0, 2, 1, 3)
    k = qkv[..., nh * hs : (nh + nkv) * hs].reshape(B, T, nkv, hs).permute(0, 2, 1, 3)
    v = qkv[..., (nh + nkv) * hs :].reshape(B, T, nkv, hs).permute(0, 2, 1, 3)
    group = nh // nkv
    heads = [attention_reference(q[:, h : h + 1], k[:, h // group : h // group + 1],
                                 v[:, h // group : h // group + 1], is_causal=True) for h in range(nh)]
    y = torch.cat(heads, dim=1).permute(0, 2, 1, 3).reshape(B, T, nh * hs)
    y = y @ attn.proj.weight.T
    return y + attn.proj.bias if attn.proj.bias is not None else y


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
@pytest.mark.parametrize("qkv_bias,bias", [(True, True), (False, False), (True, False)])
def test_causal_self_attention_equals_manual_computation(n_kv_heads, qkv_bias, bias):
    attn = CausalSelfAttention(32, 4, n_kv_heads, qkv_bias=qkv_bias, bias=bias).eval()
    _randomise(attn)
    x = torch.randn(2, 10, 32)
    torch.testing.assert_close(attn(x), _manual_attention(attn, x), atol=1e-5, rtol=1e-5)


def test_qkv_projection_width_shrinks_with_gqa():
    hs = 32 // 8
    assert CausalSelfAttention(32, 8, 8).qkv.out_features == (8 + 2 * 8) * hs
    assert CausalSelfAttention(32, 8, 2).qkv.out_features == (8 + 2 * 2) * hs


def test_mha_and_gqa_with_all_kv_heads_are_the_same_module():
    from llmscratch.config import ModelConfig
    from llmscratch.model import GPT

    # Through the config: n_kv_heads=None means n_heads.
    a = GPT(ModelConfig(vocab_size=97, context_length=32, d_model=32, n_layers=2, n_heads=4))
    b = GPT(ModelConfig(vocab_size=97, context_length=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4))
    b.load_state_dict(a.state_dict())
    idx = torch.randint(0, 97, (2, 12))
    torch.testing.assert_close(a.eval()(idx), b.eval()(idx), atol=0, rtol=0)

    # And the module itself: same weights, same output.
    mha = CausalSelfAttention(32, 4, 4).eval()
    _randomise(mha)
    gqa = CausalSelfAttention(32, 4, n_kv_heads=4).eval()
    gqa.load_state_dict(mha.state_dict())
    x = torch.randn(2, 8, 32)
    torch.testing.assert_close(mha(x), gqa(x), atol=0, rtol=0)


def test_gqa_equals_mha_with_repeated_kv_weights():
    nh, nkv, d = 4, 2, 32
    hs, group = d // nh, nh // nkv
    gqa = CausalSelfAttention(d, nh, nkv).eval()
    _randomise(gqa)
    mha = CausalSelfAttention(d, nh, nh).eval()

    w, b = gqa.qkv.weight.detach(), gqa.qkv.bias.detach()
    q_w, k_w, v_w = w[: nh * hs], w[nh * hs : (nh + nkv) * hs], w[(nh + nkv) * hs :]
    q_b, k_b, v_b = b[: nh * hs], b[nh * hs : (nh + nkv) * hs], b[(nh + nkv) * hs :]

    def expand(t):  # rows of kv head j -> rows of query heads j*group .. j*group+group-1, by hand
        rows = []
        for h in range(nh):
            j = h // group
            rows.append(t[j * hs : (j + 1) * hs])
        return torch.cat(rows)

    with torch.no_grad():
        mha.qkv.weight.copy_(torch.cat([q_w, expand(k_w), expand(v_w)]))
        mha.qkv.bias.copy_(torch.cat([q_b, expand(k_b), expand(v_b)]))
        mha.proj.load_state_dict(gqa.proj.state_dict())
    x = torch.randn(3, 9, d)
    torch.testing.assert_close(gqa(x), mha(x), atol=1e-5, rtol=1e-5)
