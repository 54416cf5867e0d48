"""bf16 weights multiplied in fp32 for inputs of many rows (model/packed.py's UpcastLinear), where the CPU's
bf16 products are slow (runtime.bf16_upcast_rows), and the compiled-ahead step builder rebuilding such a model."""

import json

import pytest
import torch
import torch.nn.functional as F

from llmscratch import runtime
from llmscratch.checkpoint import load, save_model
from llmscratch.config import ModelConfig
from llmscratch.generate import generate_ids
from llmscratch.model import GPT
from llmscratch.model import packed as P
from llmscratch.model.packed import UpcastLinear, pack_for_cpu_inference, upcast_wide_products
from llmscratch.tokenizer import BPETokenizer

CFG = ModelConfig(vocab_size=257, context_length=48, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2)


def _bf16_linear(n_in=48, n_out=80, bias=True) -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(n_in, n_out, bias=bias).to(torch.bfloat16)


def _products(monkeypatch) -> list[torch.dtype]:
    """The dtypes `F.linear` is called with from now on (a CPU's bf16 product may round exactly as fp32 does,
    so the results alone cannot tell the ways apart)."""
    seen, real = [], F.linear
    monkeypatch.setattr(F, "linear", lambda x, w, b=None: seen.append((x.dtype, w.dtype)) or real(x, w, b))
    return seen


@pytest.mark.parametrize("bias", [True, False])
def test_few_rows_multiply_in_bf16_and_many_in_fp32(bias, monkeypatch):
    lin = _bf16_linear(bias=bias)
    up = UpcastLinear(lin, from_rows=4)
    narrow = torch.randn(1, 3, 48).to(torch.bfloat16)  # 3 rows
    wide = torch.randn(2, 5, 48).to(torch.bfloat16)  # 10 rows
    b = None if lin.bias is None else lin.bias.float()
    want = F.linear(wide.float(), lin.weight.float(), b).to(torch.bfloat16)
    seen = _products(monkeypatch)
    assert torch.equal(up(narrow), lin(narrow))
    assert seen == [(torch.bfloat16, torch.bfloat16)] * 2
    seen.clear()
    got = up(wide)
    assert seen == [(torch.float32, torch.float32)]
    assert got.dtype == torch.bfloat16 and got.shape == (2, 5, 80)
    assert torch.equal(got, want)


def test_a_large_weight_is_converted_a_block_at_a_time_with_the_same_result(monkeypatch):
    lin = _bf16_linear(48, 1000)
    x = torch.randn(5, 48).to(torch.bfloat16)
    whole = UpcastLinear(lin, from_rows=2)(x)
    monkeypatch.setattr(P, "_UPCAST_CHUNK", 48 * 96)  # 96 output features a block: 11 blocks, the last 40
    converted = []
    real_float = torch.Tensor.float
    monkeypatch.setattr(torch.Tensor, "float", lambda t: converted.append(t.numel()) or real_float(t))
    blocked = UpcastLinear(lin, from_rows=2)(x)
    assert torch.equal(blocked, whole)
    weight_blocks = [n for n in converted if n >= 48 * 40]  # (x itself is 240 elements, bias blocks 96 or 40)
    assert weight_blocks == [48 * 96] * 10 + [48 * 40]  # never all of the weight at once


def test_the_same_parameters_stay_in_place():
    lin = _bf16_linear()
    up = UpcastLinear(lin, from_rows=8)
    assert up.weight is lin.weight and up.bias is lin.bias
    assert isinstance(up, torch.nn.Linear) and "fp32 from 8 rows" in repr(up)
    assert set(dict(up.named_parameters())) == {"weight", "bias"}


def test_compiled_for_fixed_rows_one_way_goes_in_and_for_dynamic_rows_both():
    """Compiled for a fixed number of rows the choice is made while tracing; exported with the rows a dynamic
    dimension (the server's compiled-ahead step) both ways go into the graph and `torch.cond` picks one per
    call."""
    lin = _bf16_linear()
    up = UpcastLinear(lin, from_rows=4)

    def traced(x):
        torch._dynamo.reset()
        graphs = []
        compiled = torch.compile(up, fullgraph=True, dynamic=False, backend=lambda gm, ex: graphs.append(gm) or gm)
        return compiled(x), graphs[0]

    for rows, dtype in ((2, torch.bfloat16), (8, torch.float32)):
        x = torch.randn(rows, 48).to(torch.bfloat16)
        y, gm = traced(x)
        assert torch.equal(y, up(x))
        products = [n for n in gm.graph.nodes if n.target in (torch._C._nn.linear, F.linear)]
        assert [n.args[0].meta["example_value"].dtype for n in products] == [dtype]
    exported = torch.export.export(up, (torch.randn(5, 48).to(torch.bfloat16),), strict=False,  # as model/aot.py
                                   dynamic_shapes=({0: torch.export.Dim("rows", min=1, max=64)},))
    assert any("cond" in str(n.target) for n in exported.graph.nodes)
    for rows in (1, 3, 4, 30):  # either side of from_rows, through one exported graph
        x = torch.randn(rows, 48).to(torch.bfloat16)
        assert torch.equal(exported.module()(x), up(x))


def _bf16_gpt(tied: bool = True) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig.from_preset("gpt-micro", tie_embeddings=tied)).to(torch.bfloat16).eval()


def test_a_bf16_model_gets_them_where_the_cpu_needs_them(monkeypatch):
    monkeypatch.setattr(runtime, "bf16_upcast_rows", lambda: 4)
    model = _bf16_gpt()
    linears = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear]
    assert upcast_wide_products(model) == len(linears) > 0
    assert all(type(model.get_submodule(n)) is UpcastLinear for n in linears)
    assert model.lm_head.weight is model.tok_emb.weight  # the tied head stays tied
    assert upcast_wide_products(model) == 0  # nothing plain left
    # where the CPU's bf16 products are fast, or for an fp32 model: nothing changes
    monkeypatch.setattr(runtime, "bf16_upcast_rows", lambda: None)
    assert upcast_wide_products(_bf16_gpt()) == 0
    monkeypatch.setattr(runtime, "bf16_upcast_rows", lambda: 4)
    fp32 = GPT(ModelConfig.from_preset("gpt-micro")).eval()
    assert upcast_wide_products(fp32) == 0 and not any(isinstance(m, UpcastLinear) for m in fp32.modules())


def test_the_cli_path_swaps_the_linears_packing_left_plain(monkeypatch):
    monkeypatch.setattr(runtime, "bf16_upcast_rows", lambda: 4)
    monkeypatch.setattr(P, "packing_pays", lambda linear, batch_hint=1, streamed=0: False)  # pack nothing
    model = _bf16_gpt()
    pack_for_cpu_inference(model, 32, where_faster=True)
    ups = [m for m in model.modules() if isinstance(m, UpcastLinear)]
    assert ups and all(m.from_rows == 4 for m in ups)
    plain = _bf16_gpt()
    pack_for_cpu_inference(plain, where_faster=False)  # asked to pack everything: no upcasting added
    assert not any(isinstance(m, UpcastLinear) for m in plain.modules())


def test_the_model_decodes_as_the_fp32_arithmetic_says_and_still_saves(monkeypatch, tmp_path):
    """Reading a prompt (many rows) goes through fp32 arithmetic, decoding (one row) through bf16: the greedy
    tokens equal a model that does exactly that by hand, and the model saves and loads as usual."""
    monkeypatch.setattr(runtime, "bf16_upcast_rows", lambda: 4)
    model = GPT(CFG).to(torch.bfloat16).eval()
    reference = GPT(CFG).to(torch.bfloat16).eval()
    reference.load_state_dict(model.state_dict())
    upcast_wide_products(model)
    prompt = torch.randint(0, 257, (1, 20))
    seen = _products(monkeypatch)
    with torch.no_grad():
        model(prompt[:, :3])  # 3 rows: bf16
        assert set(seen) == {(torch.bfloat16, torch.bfloat16)}
        seen.clear()
        model(prompt)  # 20 rows: fp32, every product
        assert set(seen) == {(torch.float32, torch.float32)} and len(seen) == 4 * CFG.n_layers + 1
    monkeypatch.undo()
    monkeypatch.setattr(runtime, "bf16_upcast_rows", lambda: 4)
    with torch.no_grad():
        logits = model(prompt)
        by_hand = reference.float()(prompt)  # fp32 arithmetic on the same (bf16-valued) weights
    assert (logits.float() - by_hand).abs().max() < 0.05  # (activations are still rounded to bf16 between ops)
    decoded = torch.stack(list(generate_ids(model, prompt, 10)), 1)
    assert decoded.shape == (1, 10) and int(decoded.max()) < CFG.vocab_size
    out = save_model(tmp_path / "up", model, BPETokenizer.train(["bytes"], 257, progress=False))
    loaded, _ = load(out, dtype=torch.bfloat16)  # plain nn.Linear again, the same tensors
    assert not any(isinstance(m, UpcastLinear) for m in loaded.modules())
    for (name, a), (_, b) in zip(sorted(model.state_dict().items()), sorted(loaded.state_dict().items())):
        assert torch.equal(a, b), name


def test_the_probe_measures_once_and_stops_at_the_first_row_count_that_pays(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMSCRATCH_CACHE", str(tmp_path))
    monkeypatch.setattr(runtime, "dtype_probe", lambda rows=1: {"bf16_us": 900.0, "fp32_us": 100.0})
    measured = []

    def fake(rows, rounds=5):
        measured.append(rows)
        return {"bf16_us": 100.0 * rows, "upcast_us": 300.0 + 10 * rows}  # pays from 4 rows: 340 < 0.9 * 400

    monkeypatch.setattr(runtime, "measure_upcast", fake)
    runtime.bf16_upcast_rows.cache_clear()
    try:
        assert runtime.bf16_upcast_rows() == 4 and measured == [2, 4]
        runtime.bf16_upcast_rows.cache_clear()  # a new process: the answers come from the cache file
        assert runtime.bf16_upcast_rows() == 4 and measured == [2, 4]
        keys = [k for k in runtime.read_probe_cache() if "bf16 upcast" in k]
        assert len(keys) == 2 and all(runtime.cpu_model() in k for k in keys)
        # a CPU whose bf16 products are no slower at 64 rows (bf16 instructions): no ladder, no upcasting
        monkeypatch.setattr(runtime, "dtype_probe", lambda rows=1: {"bf16_us": 90.0, "fp32_us": 100.0})
        runtime.bf16_upcast_rows.cache_clear()
        assert runtime.bf16_upcast_rows() is None and measured == [2, 4]
        # slow bf16, but converting never pays either
        monkeypatch.setenv("LLMSCRATCH_CACHE", str(tmp_path / "other"))
        monkeypatch.setattr(runtime, "dtype_probe", lambda rows=1: {"bf16_us": 900.0, "fp32_us": 100.0})
        monkeypatch.setattr(runtime, "measure_upcast", lambda rows, rounds=5: {"bf16_us": 1.0, "upcast_us": 2.0})
        runtime.bf16_upcast_rows.cache_clear()
        assert runtime.bf16_upcast_rows() is None
    finally:
        runtime.bf16_upcast_rows.cache_clear()


def test_the_real_measurement_times_both_ways():
    timing = runtime.measure_upcast(4, rounds=2)
    assert set(timing) == {"bf16_us", "upcast_us"} and all(v > 0 for v in timing.values())


def test_the_background_builder_rebuilds_upcast_linears_with_the_same_key(tmp_path, monkeypatch):
    """`start_background_build` writes which linears are swapped and how; the builder's model must have the
    same key, or it refuses (and marks the key failed)."""
    from llmscratch.model import aot

    monkeypatch.setenv("LLMSCRATCH_CACHE", str(tmp_path))
    monkeypatch.setenv(aot.ENV, "auto")
    monkeypatch.setattr(runtime, "bf16_upcast_rows", lambda: 8)
    model = GPT(CFG).to(torch.bfloat16).eval()
    upcast_wide_products(model)
    started = []
    monkeypatch.setattr(aot.subprocess, "Popen", lambda cmd, **kw: started.append(cmd))
    assert aot.start_background_build(model) and len(started) == 1
    spec_path = started[0][-1]
    spec = json.loads(open(spec_path).read())
    assert {kind for kind, _, _ in spec["linears"].values()} == {"UpcastLinear"}
    assert all(from_rows == 8 for _, _, from_rows in spec["linears"].values())
    built = []
    monkeypatch.setattr(aot, "build", lambda m, b, k, c: built.append(aot.step_key(m, b, k, c)) or tmp_path / "x")
    assert aot._build_from_spec(__import__("pathlib").Path(spec_path)) == 0
    assert built == [aot.step_key(model)]
    other = GPT(CFG).to(torch.bfloat16).eval()
    monkeypatch.setattr(runtime, "bf16_upcast_rows", lambda: 16)
    upcast_wide_products(other)
    assert aot.step_key(other) != aot.step_key(model)  # the threshold is part of what the step is
