"""Llama/Qwen components beside their references, and the Llama/Qwen configurations of the one GPT."""

import math

import pytest
import torch

from llmscratch.config import ModelConfig
from llmscratch.errors import UserError
from llmscratch.generate import generate_ids
from llmscratch.model import GPT
from llmscratch.model.layers import RMSNorm, SwiGLUMLP, rms_norm_reference
from llmscratch.model.rope import apply_rope, apply_rope_reference, inverse_frequencies, rope_cos_sin


def test_rms_norm_equals_reference():
    torch.manual_seed(0)
    norm = RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 16) * 4
    torch.testing.assert_close(norm(x), rms_norm_reference(x, norm.weight, 1e-6))
    y = norm(x) / norm.weight
    torch.testing.assert_close(y.pow(2).mean(-1), torch.ones(3, 5), atol=1e-4, rtol=1e-4)  # unit RMS


def test_swiglu_is_gate_times_up():
    torch.manual_seed(0)
    mlp = SwiGLUMLP(8, 12)
    x = torch.randn(2, 8)
    g, u = x @ mlp.gate.weight.t(), x @ mlp.up.weight.t()
    want = (g * torch.sigmoid(g) * u) @ mlp.proj.weight.t()
    torch.testing.assert_close(mlp(x), want)


def test_rope_equals_complex_rotation_and_keeps_norms():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, 16)
    pos = torch.arange(10, 17)
    inv = inverse_frequencies(16, 10000.0)
    cos, sin = rope_cos_sin(pos, inv, torch.float32)
    got = apply_rope(x, cos, sin)
    torch.testing.assert_close(got, apply_rope_reference(x, pos, inv), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.norm(dim=-1), x.norm(dim=-1))  # a rotation


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    inv = inverse_frequencies(8, 100.0)

    def score(m, n):
        qm = apply_rope(q, *rope_cos_sin(torch.tensor([m]), inv, torch.float32))
        kn = apply_rope(k, *rope_cos_sin(torch.tensor([n]), inv, torch.float32))
        return float((qm * kn).sum())

    assert score(5, 2) == pytest.approx(score(13, 10), abs=1e-5)
    assert score(5, 2) != pytest.approx(score(5, 4), abs=1e-3)


def test_llama3_scaling_keeps_high_and_slows_low_frequencies():
    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_context_length": 64}
    plain, scaled = inverse_frequencies(32, 10000.0), inverse_frequencies(32, 10000.0, scaling)
    wavelength = 2 * math.pi / plain
    high = wavelength < 64 / 4  # short wavelengths: untouched
    low = wavelength > 64 / 1  # long ones: divided by the factor
    assert high.any() and low.any()
    torch.testing.assert_close(scaled[high], plain[high])
    torch.testing.assert_close(scaled[low], plain[low] / 8)
    mid = ~high & ~low
    assert ((scaled[mid] < plain[mid]) & (scaled[mid] > plain[mid] / 8)).all()


@pytest.mark.parametrize("preset", ["llama-micro", "qwen3-micro"])
def test_modern_presets_cache_static_path_and_loss(preset):
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(preset)
    m = GPT(cfg).eval()
    assert m.pos_emb is None and (m.blocks[0].attn.q_norm is not None) == cfg.qk_norm
    prompt = torch.randint(0, cfg.vocab_size, (2, 5))
    cached = torch.stack(list(generate_ids(m, prompt, 70)), 1)  # crosses the 64-token context
    uncached = torch.stack(list(generate_ids(m, prompt, 70, use_cache=False)), 1)
    assert torch.equal(cached, uncached)
    x = torch.randint(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        m.setup_kv_cache(2, cfg.context_length)
        steps = [m(x[:, :4], input_pos=torch.tensor(0))] + [m(x[:, i:i + 1], input_pos=torch.tensor(i))
                                                              for i in range(4, 12)]
        m.clear_kv_cache()
        torch.testing.assert_close(torch.cat(steps, 1), m(x), atol=1e-5, rtol=1e-5)
    loss = m.train()(x, targets=x)
    loss.backward()
    assert math.isfinite(float(loss.detach())) and all(p.grad is not None for p in m.parameters())


def test_published_parameter_counts():
    counts = {"llama3.2-1b": 1_235_814_400, "llama3.2-3b": 3_212_749_824, "qwen3-0.6b": 596_049_920,
              "qwen3-1.7b": 1_720_574_976}
    for name, n in counts.items():
        with torch.device("meta"):
            assert GPT(ModelConfig.from_preset(name)).num_params() == n, name


def test_invalid_component_names():
    with pytest.raises(UserError, match="norm must be one of layernorm, rmsnorm"):
        ModelConfig(norm="batchnorm")
    with pytest.raises(UserError, match="rope_scaling must be a dict"):
        ModelConfig(position="rope", rope_scaling={"factor": 2.0})
