"""The fast paths compute what the plain ones do: static-shape KV-cache decoding, torch.compile'd loss and
decoding (CPU here, fp32; benchmarks/gpu_check.py repeats the compiled checks on a GPU in bf16)."""

import warnings

import pytest
import torch

from llmscratch.config import ModelConfig
from llmscratch.generate import built_decode_step, generate_ids
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


@pytest.mark.slow
def test_compiled_fused_loss_with_padding_and_ignored_rows_equals_the_reference():
    # Under torch.compile the loss takes its one-pass spelling (model/loss.py); padding and ignored rows too.
    from llmscratch.model.loss import lm_head_cross_entropy, lm_head_cross_entropy_reference

    torch.manual_seed(0)
    h, w = torch.randn(40, 16), torch.randn(97, 16) * 0.3
    y = torch.randint(0, 97, (40,))
    y[::7] = -100
    fused = torch.compile(lambda h, w, y: lm_head_cross_entropy(h, w, y, chunk_size=16, pad_vocab_to=64))
    results = []
    for fn in (fused, lm_head_cross_entropy_reference):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss = fn(hh, ww, y)
        loss.backward()
        results.append((loss.detach(), hh.grad, ww.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


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
    """The compiled step reads the weights as inputs: after an optimizer step the same step (no new compilation)
    decodes with the new weights."""
    torch.manual_seed(0)
    m = GPT(CFG).eval()
    prompt = torch.randint(0, 300, (1, 4))
    before = torch.stack(list(generate_ids(m, prompt, 8, compile=True)), 1)
    step = built_decode_step(m)
    assert step is not None
    opt = torch.optim.AdamW(m.parameters(), lr=0.05)
    m.train()
    m(torch.randint(0, 300, (2, 20)), targets=torch.randint(0, 300, (2, 20))).backward()
    opt.step()
    m.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        after = torch.stack(list(generate_ids(m, prompt, 8, compile=True)), 1)
    eager = torch.stack(list(generate_ids(m, prompt, 8)), 1)
    assert built_decode_step(m) is step
    assert not torch.equal(eager, before)  # the update changed what the model says...
    assert torch.equal(after, eager)  # ...and the compiled step says it too


@pytest.mark.slow
def test_steps_of_several_models_do_not_count_toward_dynamos_recompile_limit():
    """Each model's step compiles a graph of its own code: with one graph allowed per code object, the steps of
    several models in one process must still compile (past Dynamo's limit a step would fall back to slow
    eager code, here an error)."""
    import torch._dynamo.config as dynamo_config

    prompt = torch.randint(0, 300, (1, 4))
    with dynamo_config.patch(recompile_limit=1, fail_on_recompile_limit_hit=True):
        for seed in range(3):
            torch.manual_seed(seed)
            m = GPT(CFG).eval()
            compiled = torch.stack(list(generate_ids(m, prompt, 6, compile=True)), 1)
            assert torch.equal(compiled, torch.stack(list(generate_ids(m, prompt, 6)), 1))


def test_one_block_graph_traces_one_block_for_every_layer():
    """Under torch.compile, `one_block_graph=True` calls one traced block graph once per layer."""
    if not hasattr(torch.compiler, "nested_compile_region"):
        pytest.skip("this PyTorch has no torch.compiler.nested_compile_region (2.8+): every block is traced")
    graphs = []

    def keep_graph(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.manual_seed(0)
    m = GPT(ModelConfig(vocab_size=300, context_length=40, d_model=64, n_layers=3, n_heads=4)).eval()
    m.setup_kv_cache(1, 16)
    step = torch.compile(lambda i, p: m(i, input_pos=p, one_block_graph=True), backend=keep_graph,
                         fullgraph=True)
    x = torch.tensor([[7]])
    with torch.no_grad():
        got = step(x, torch.tensor(0))
        m.setup_kv_cache(1, 16)
        want = m(x, input_pos=torch.tensor(0))
    torch.testing.assert_close(got, want)
    calls = [n for g in graphs for n in g.graph.nodes if n.op == "call_function" and "invoke_subgraph" in str(n.target)]
    assert len(calls) == 3  # one call per block...
    assert len({n.args[1] for n in calls}) == 1  # ...of one traced graph


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


@pytest.mark.slow
def test_compiled_decoding_follows_the_model_through_packing_and_a_longer_cache():
    """The compiled CPU step skips Dynamo's guards on the model's modules: it must still notice that the linears
    were packed (`llmscratch generate --compile`: the oneDNN-packed linears inside the compiled step) and that a
    longer generation needs a longer KV cache (64 → 128 → 256 slots here), and decode each right."""
    from llmscratch.model.packed import can_pack, pack_for_cpu_inference

    torch.manual_seed(0)
    m = GPT(ModelConfig(vocab_size=300, context_length=300, d_model=64, n_layers=2, n_heads=4,
                        init_std=0.3)).eval()
    prompt = torch.randint(0, 300, (2, 5))
    for n in (20, 100, 20):  # 64 slots, 128, 64 again
        assert torch.equal(torch.stack(list(generate_ids(m, prompt, n, compile=True)), 1),
                           torch.stack(list(generate_ids(m, prompt, n)), 1))
    if not can_pack(m):
        pytest.skip("this PyTorch build has no oneDNN linear packing")
    plain = torch.stack(list(generate_ids(m, prompt, 20)), 1)
    pack_for_cpu_inference(m)
    eager = torch.stack(list(generate_ids(m, prompt, 20)), 1)
    compiled = torch.stack(list(generate_ids(m, prompt, 20, compile=True)), 1)
    assert torch.equal(eager, plain) and torch.equal(compiled, eager)
    longer = torch.stack(list(generate_ids(m, prompt, 200, compile=True)), 1)  # 256 slots
    assert torch.equal(longer, torch.stack(list(generate_ids(m, prompt, 200)), 1))


@pytest.mark.slow
def test_compiled_decoding_follows_a_weight_replaced_by_one_of_other_strides():
    """Within a generation the compiled CPU step checks neither Dynamo's guards nor, in its generated code, the
    sizes and strides of its inputs. A weight replaced between generations by an equal one laid out transposed
    (as a checkpoint converter's `.t()` would leave it) must bring a new compilation, not be read with the old
    strides (Dynamo's guards on the tensors, checked on each generation's first step, catch it)."""
    torch.manual_seed(0)
    m = GPT(ModelConfig(vocab_size=300, context_length=40, d_model=64, n_layers=2, n_heads=4,
                        init_std=0.3)).eval()
    prompt = torch.randint(0, 300, (1, 4))
    first = torch.stack(list(generate_ids(m, prompt, 8, compile=True)), 1)
    fc = m.blocks[0].mlp.fc
    with torch.no_grad():
        fc.weight = torch.nn.Parameter(fc.weight.t().contiguous().t())  # same values, column-major
    assert fc.weight.stride() == (1, fc.weight.size(0))
    eager = torch.stack(list(generate_ids(m, prompt, 8)), 1)
    compiled = torch.stack(list(generate_ids(m, prompt, 8, compile=True)), 1)
    assert torch.equal(eager, first) and torch.equal(compiled, eager)
    with torch.no_grad():
        fc.weight.mul_(-1)  # in place, still column-major: the step compiled for it reads the change
    eager = torch.stack(list(generate_ids(m, prompt, 8)), 1)
    assert not torch.equal(eager, first)
    assert torch.equal(torch.stack(list(generate_ids(m, prompt, 8, compile=True)), 1), eager)
