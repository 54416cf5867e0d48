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


def test_compiled_step_calls_onednn_directly():
    """`generate --compile` on a packed model: inductor's generated code calls oneDNN's operator itself, not our
    operator's Python body (model/packed.py, `lower_to_onednn_call`), and computes what the eager model does."""
    from torch._inductor import lowering
    from torch._inductor.utils import run_and_get_code

    from llmscratch.generate import CompiledDecodeStep
    from llmscratch.model.packed import lower_to_onednn_call

    if not (hasattr(lowering, "lowerings") and hasattr(lowering, "fallback_handler")):
        pytest.skip("this PyTorch's inductor has other internals: the packed operator stays a call of ours")
    assert lower_to_onednn_call()
    # (registered now: a graph from inductor's on-disk cache, below, may have been compiled by another process)
    assert lowering.lowerings[torch.ops.llmscratch.packed_linear.default].__module__ == "llmscratch.model.packed"
    torch.manual_seed(0)
    m = GPT(CFG).eval()
    pack_for_cpu_inference(m)
    m.setup_kv_cache(1, 16)
    idx, pos = torch.tensor([[5]]), torch.tensor(0)
    step = CompiledDecodeStep(m)
    with torch.inference_mode():
        got, code = run_and_get_code(step, idx, pos)
        m.setup_kv_cache(1, 16)
        want = m(idx, input_pos=pos)[:, -1]
    code = "\n".join(code)
    calls = code.count("torch.ops.mkldnn._linear_pointwise.default("), code.count("llmscratch.packed_linear.default(")
    assert calls == (4 + 1, 0), calls  # one block's four products (its graph serves both layers), the LM head
    assert "assert_size_stride(" not in code  # no shape checks on every call (generate.py)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
