"""The fast paths compute what the plain ones do: static-shape KV-cache decoding, torch.compile'd loss and
decoding (CPU here, fp32; benchmarks/gpu_check.py repeats the compiled checks on a GPU in bf16)."""

import warnings

import pytest
import torch

from llmscratch.config import ModelConfig
from llmscratch.generate import generate_ids
from llmscratch.model import GPT

CFG = ModelConfig(vocab_size=300, context_length=40, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2)


def test_static_shape_cache_path_equals_the_dynamic_one():
    torch.manual_seed(0)
    m = GPT(CFG).eval()
    x = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        m.setup_kv_cache(2, 12)
        want = torch.cat([m(x[:, :5], input_pos=0)] + [m(x[:, i:i + 1], input_pos=i) for i in range(5, 12)], 1)
        m.clear_kv_cache()
        m.setup_kv_cache(2, CFG.context_length)  # the static path attends over the whole (masked) cache
        got = [m(x[:, :5], input_pos=torch.tensor(0))]
        got += [m(x[:, i:i + 1], input_pos=torch.tensor(i)) for i in range(5, 12)]
        got = torch.cat(got, 1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, m(x), atol=1e-5, rtol=1e-5)


def test_setup_kv_cache_reuses_a_matching_cache():
    m = GPT(CFG)
    m.setup_kv_cache(1, 40)
    first = m.blocks[0].attn.kv_cache
    m.setup_kv_cache(1, 40)
    assert m.blocks[0].attn.kv_cache is first
    m.setup_kv_cache(2, 40)
    assert m.blocks[0].attn.kv_cache is not first
    second = m.blocks[0].attn.kv_cache
    m.setup_kv_cache(2, 30, at_least=True)  # the eager path: a longer cache serves
    assert m.blocks[0].attn.kv_cache is second
    m.setup_kv_cache(2, 30)  # the static path: exactly this length
    assert m.blocks[0].attn.kv_cache.max_len == 30


@pytest.mark.slow
@pytest.mark.parametrize("preset", [None, "qwen3-micro"])
def test_compiled_decoding_gives_the_same_tokens(preset):
    """GPT-2-shaped with GQA, and Qwen3-shaped (RoPE, RMSNorm, SwiGLU, QK-norm): compiled == eager tokens."""
    torch.manual_seed(0)
    cfg = CFG if preset is None else ModelConfig.from_preset(preset, vocab_size=300, context_length=40,
                                                             init_std=0.3)
    m = GPT(cfg).eval()
    prompt = torch.randint(0, 300, (2, 5))
    eager = torch.stack(list(generate_ids(m, prompt, 45)), 1)  # crosses the context: re-prefill included
    for _ in range(2):  # the second call reuses the compiled step and its cache
        compiled = torch.stack(list(generate_ids(m, prompt, 45, compile=True)), 1)
        assert torch.equal(compiled, eager)


@pytest.mark.slow
def test_compiled_loss_and_gradients_equal_eager():
    torch.manual_seed(0)
    a, b = GPT(CFG), GPT(CFG)
    b.load_state_dict(a.state_dict())
    x, y = torch.randint(0, 300, (3, 40)), torch.randint(0, 300, (3, 40))
    eager = a(x, targets=y)
    compiled = torch.compile(b)(x, targets=y)
    eager.backward()
    compiled.backward()
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_static_cache_len_is_a_power_of_two_bucket_on_cpu_and_the_context_on_gpu():
    from llmscratch.generate import static_cache_len

    assert static_cache_len(110, 1024, on_gpu=False) == 128
    assert static_cache_len(128, 1024, on_gpu=False) == 128
    assert static_cache_len(129, 1024, on_gpu=False) == 256
    assert static_cache_len(5, 1024, on_gpu=False) == 64
    assert static_cache_len(600, 1000, on_gpu=False) == 1000  # never past the context
    assert static_cache_len(5, 1024, on_gpu=True) == 1024


@pytest.mark.slow
def test_compiled_decoding_follows_weights_changed_in_place():
    """On a CPU the compiled step freezes the weights; after an optimizer step it must not decode with the old
    ones (the step is rebuilt), nor may a model whose weights did not change pay for a new compilation."""
    torch.manual_seed(0)
    m = GPT(CFG).eval()
    prompt = torch.randint(0, 300, (1, 4))
    before = torch.stack(list(generate_ids(m, prompt, 8, compile=True)), 1)
    first_step = m._compiled_decode_step
    torch.stack(list(generate_ids(m, prompt, 8, compile=True)), 1)
    assert m._compiled_decode_step is first_step  # unchanged weights: the same compiled step
    opt = torch.optim.AdamW(m.parameters(), lr=0.05)
    m.train()
    m(torch.randint(0, 300, (2, 20)), targets=torch.randint(0, 300, (2, 20))).backward()
    opt.step()
    m.eval()
    old_modules = list(first_step._generated)
    assert old_modules and _frozen_bytes(old_modules) > 0  # the weights frozen into the first step
    with pytest.warns(UserWarning, match="weights changed") as caught:
        after = torch.stack(list(generate_ids(m, prompt, 8, compile=True)), 1)  # reuses the cache
    eager = torch.stack(list(generate_ids(m, prompt, 8)), 1)
    assert not torch.equal(eager, before)  # the update changed what the model says...
    assert torch.equal(after, eager)  # ...and the compiled step says it too
    # The replaced step's frozen weights were dropped (PyTorch would keep them until the process exits).
    assert _frozen_bytes(old_modules) == 0 and "keeps" not in str(caught[0].message)
    assert _frozen_bytes(m._compiled_decode_step._generated) > 0


def _frozen_bytes(modules) -> int:
    """Bytes of the tensors held as attributes of inductor's generated modules."""
    return sum(v.numel() * v.element_size() for mod in modules for v in vars(mod).values()
               if isinstance(v, torch.Tensor))


@pytest.mark.slow
def test_rebuilt_steps_do_not_count_toward_dynamos_recompile_limit():
    """Each rebuild compiles a step of its own: with one graph allowed per code object, repeated rebuilds must
    still compile (past Dynamo's limit a step would fall back to slow eager code, here an error)."""
    import torch._dynamo.config as dynamo_config

    torch.manual_seed(0)
    m = GPT(CFG).eval()
    prompt = torch.randint(0, 300, (1, 4))
    with dynamo_config.patch(recompile_limit=1, fail_on_recompile_limit_hit=True), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the rebuild warning
        for _ in range(3):
            compiled = torch.stack(list(generate_ids(m, prompt, 6, compile=True)), 1)
            assert torch.equal(compiled, torch.stack(list(generate_ids(m, prompt, 6)), 1))
            with torch.no_grad():
                m.tok_emb.weight.mul_(1.5)  # in place: the step is stale


@pytest.mark.slow
def test_eager_generation_between_compiled_ones_keeps_the_compiled_cache():
    """An eager generation in between must not replace the cache buffers a compiled step's graph is tied to
    (that would recompile it: ~20 s for GPT-2 124M on a CPU)."""
    torch.manual_seed(0)
    m = GPT(CFG).eval()
    prompt = torch.randint(0, 300, (1, 5))
    compiled = torch.stack(list(generate_ids(m, prompt, 10, compile=True)), 1)
    cache = m.blocks[0].attn.kv_cache
    assert cache is not None  # kept for the next compiled generation
    eager = torch.stack(list(generate_ids(m, prompt, 10)), 1)
    assert m.blocks[0].attn.kv_cache is cache
    assert torch.equal(eager, compiled)
    again = torch.stack(list(generate_ids(m, prompt, 10, compile=True)), 1)
    assert m.blocks[0].attn.kv_cache is cache and torch.equal(again, compiled)


def test_compiling_a_packed_model_is_a_clear_error():
    from llmscratch.errors import UserError
    from llmscratch.model.packed import can_pack, pack_for_cpu_inference

    m = GPT(CFG).eval()
    if not can_pack(m):
        pytest.skip("this PyTorch build has no oneDNN linear packing")
    pack_for_cpu_inference(m)
    with pytest.raises(UserError, match="packed"):
        list(generate_ids(m, torch.randint(0, 300, (1, 4)), 3, compile=True))
