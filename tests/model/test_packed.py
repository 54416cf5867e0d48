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


def test_the_default_packs_only_the_shapes_packing_speeds_up_and_remembers(monkeypatch, tmp_path):
    """`where_faster`: each linear shape is measured once per CPU model (here a stand-in measurement: packing pays
    for the LM head's shape only), the answer is kept in the cache folder, and a later model reads it without
    measuring again."""
    from llmscratch.model import packed

    monkeypatch.setenv("LLMSCRATCH_CACHE", str(tmp_path))  # a cache of its own: nothing measured before
    measured = []

    def fake_measure(linear, batch_hint=1, rounds=5, working_set=0):
        measured.append((linear.out_features, linear.in_features, batch_hint))
        head = linear.out_features == 512
        return {"plain_us": 10.0, "packed_us": 5.0 if head else 10.0}  # a tie (not 3% faster) stays plain

    monkeypatch.setattr(packed, "measure_linear", fake_measure)
    model = GPT(ModelConfig.from_preset("gpt-micro", tie_embeddings=False)).eval()
    assert pack_for_cpu_inference(model, where_faster=True) == 1
    assert isinstance(model.lm_head, PackedLinear) and type(model.blocks[0].attn.qkv) is torch.nn.Linear
    shapes = {(512, 64, 1), (192, 64, 1), (64, 64, 1), (256, 64, 1), (64, 256, 1)}  # head, qkv, out, fc, proj
    assert sorted(measured) == sorted(shapes)  # each shape once, though each block has its own layers
    again = GPT(ModelConfig.from_preset("gpt-micro", tie_embeddings=False)).eval()
    assert pack_for_cpu_inference(again, where_faster=True) == 1 and len(measured) == len(shapes)
    assert pack_for_cpu_inference(GPT(ModelConfig.from_preset("gpt-micro")).eval(), 8, where_faster=True) == 1
    assert len(measured) == 2 * len(shapes)  # 8 rows: another layout, measured anew
    from llmscratch import runtime

    cache = runtime.read_probe_cache()
    assert len(cache) == 2 * len(shapes) and all(runtime.cpu_model() in key for key in cache)


def test_a_measurement_streams_the_weights_as_a_model_of_that_size_does(monkeypatch, tmp_path):
    """Both ways are timed; the working set is the model's linear bytes (a power of two, at least the weight's
    own, at most 128 MiB), so a large model's weight is measured coming from memory, a small one's from cache."""
    from llmscratch.model import packed

    for working_set in (0, 4 << 20):  # the weight alone (cache-hot), or cycling through 8 copies of it
        timing = packed.measure_linear(torch.nn.Linear(256, 512), batch_hint=1, rounds=3, working_set=working_set)
        assert set(timing) == {"plain_us", "packed_us"} and all(v > 0 for v in timing.values())
    linear = torch.nn.Linear(256, 512)  # 512 KiB of fp32 weight
    assert packed._working_set(linear, 0) == 512 << 10
    assert packed._working_set(linear, 3 << 20) == 4 << 20
    assert packed._working_set(linear, 10 << 30) == 128 << 20
    seen = []
    monkeypatch.setattr(packed, "measure_linear", lambda lin, rows=1, rounds=5, working_set=0: seen.append(
        working_set) or {"plain_us": 1.0, "packed_us": 1.0})
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("LLMSCRATCH_CACHE", str(tmp_path / "a-file" / "cache"))  # cannot be made: still no error
    model = GPT(ModelConfig.from_preset("gpt-micro")).eval()
    streamed = sum(m.weight.numel() * 4 for n, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and n != "lm_head")  # (the tied head is the embedding)
    pack_for_cpu_inference(model, where_faster=True)
    assert set(seen) == {1 << (streamed + model.tok_emb.weight.numel() * 4 - 1).bit_length()}
