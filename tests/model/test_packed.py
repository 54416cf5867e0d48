"""oneDNN-packed linears compute the same function as nn.Linear (CPU inference fast path)."""

import pytest
import torch

from llmscratch.checkpoint import save_model
from llmscratch.config import ModelConfig
from llmscratch.generate import generate_ids
from llmscratch.model import GPT
from llmscratch.model.packed import PackedLinear, can_pack, pack_for_cpu_inference

CFG = ModelConfig(vocab_size=101, context_length=24, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2)

pytestmark = pytest.mark.skipif(not can_pack(torch.nn.Linear(2, 2)), reason="this PyTorch build has no oneDNN")


def test_packed_linear_equals_linear():
    torch.manual_seed(0)
    lin = torch.nn.Linear(48, 80)
    x = torch.randn(3, 5, 48)
    torch.testing.assert_close(PackedLinear(lin)(x), lin(x), atol=1e-5, rtol=1e-5)


def test_packed_model_logits_and_greedy_tokens_equal_plain():
    torch.manual_seed(0)
    plain = GPT(CFG).eval()
    packed = GPT(CFG).eval()
    packed.load_state_dict(plain.state_dict())
    assert pack_for_cpu_inference(packed) == 2 * 4 + 1  # qkv, attn proj, fc, mlp proj per block + LM head
    x = torch.randint(0, 101, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(packed(x), plain(x), atol=1e-5, rtol=1e-5)
    prompt = torch.randint(0, 101, (2, 5))
    a = torch.stack(list(generate_ids(plain, prompt, 30)), 1)
    b = torch.stack(list(generate_ids(packed, prompt, 30)), 1)
    assert torch.equal(a, b)


def test_packed_model_refuses_to_be_saved(tmp_path):
    model = GPT(CFG)
    pack_for_cpu_inference(model)
    with pytest.raises(ValueError, match="packed"):
        save_model(tmp_path, model)
