"""The CPU decoding step compiled ahead of time (model/aot.py): the tokens it decodes equal eager decoding's, one
package serves other weights and other lengths, another process loads it without the compiler, `generate`
builds it in the background and uses it on the next call, and a broken package falls back to eager decoding.
Each build compiles C++ (~15-25 s on 2 cores)."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from llmscratch.config import ModelConfig
from llmscratch.generate import generate_ids
from llmscratch.model import GPT, aot
from llmscratch.model.attention import RowPositions
from llmscratch.model.packed import pack_for_cpu_inference

pytestmark = [
    pytest.mark.skipif(aot.unsupported(GPT(ModelConfig.from_preset("gpt-micro")).eval()) is not None,
                       reason="this PyTorch build has no AOTInductor"),
    pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None,
                       reason="no C++ compiler (g++, or $CXX) to build compiled steps with"),
]


def _model(preset: str, dtype=torch.float32, seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    model = GPT(ModelConfig.from_preset(preset, init_std=0.3, **overrides)).to(dtype).eval()
    pack_for_cpu_inference(model, where_faster=True)  # as `generate` loads it
    return model


@pytest.fixture
def steps_used(monkeypatch):
    """How many times a compiled-ahead step ran (it must run, not fall back to eager decoding unnoticed)."""
    count = [0]
    real = aot.CompiledAheadStep.__call__

    def counted(self, *args, **kwargs):
        count[0] += 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(aot.CompiledAheadStep, "__call__", counted)
    return count


@pytest.fixture(scope="module")
def built_llama(tmp_path_factory):
    """A llama-micro (RoPE, GQA, SwiGLU, RMSNorm) step built once into a cache folder of its own."""
    cache = tmp_path_factory.mktemp("aot-cache")
    old = os.environ.get("LLMSCRATCH_CACHE")
    os.environ["LLMSCRATCH_CACHE"] = str(cache)
    try:
        path = aot.build(_model("llama-micro", n_kv_heads=2))
    finally:
        if old is None:
            os.environ.pop("LLMSCRATCH_CACHE")
        else:
            os.environ["LLMSCRATCH_CACHE"] = old
    return cache, path


def test_compiled_ahead_decoding_equals_eager_for_other_weights_and_lengths(built_llama, monkeypatch, steps_used):
    cache, path = built_llama
    monkeypatch.setenv("LLMSCRATCH_CACHE", str(cache))
    monkeypatch.setenv(aot.ENV, "load")
    assert path.is_file() and path.suffix == ".pt2"
    # Other weights than the build's (a different seed): the weights are inputs, not baked into the package.
    model = _model("llama-micro", seed=7, n_kv_heads=2)
    prompt = torch.randint(0, model.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(3))
    # 3 new tokens (a 16-slot cache), 40 (64 slots), and 80: past the 64-token context, where the window slides
    for n in (3, 40, 80):
        eager = [int(t) for t in generate_ids(model, prompt, n)]
        before = steps_used[0]
        ahead = [int(t) for t in generate_ids(model, prompt, n, compiled_ahead=True)]
        assert ahead == eager, n
        assert steps_used[0] - before >= min(n, 64 - 9) - 1  # every step with a cache to extend went through it
    # One step's logits, not only the argmax.
    model.setup_kv_cache(1, 32)
    with torch.inference_mode():
        model(prompt, input_pos=0)
        saved = [(b.attn.kv_cache.k.clone(), b.attn.kv_cache.v.clone()) for b in model.blocks]
        want = model(prompt[:, :1], input_pos=9)[:, -1]
        for block, (k, v) in zip(model.blocks, saved):
            block.attn.kv_cache.k.copy_(k)
            block.attn.kv_cache.v.copy_(v)
        got = aot.load_step(model)(prompt[:, :1], torch.tensor(9))
    model.clear_kv_cache()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_another_process_loads_the_package_without_the_compiler(built_llama):
    cache, _ = built_llama
    code = """
import sys, time, torch
from llmscratch.config import ModelConfig
from llmscratch.model import GPT, aot
from llmscratch.model.attention import RowPositions
from llmscratch.model.packed import pack_for_cpu_inference
torch.manual_seed(11)
model = GPT(ModelConfig.from_preset("llama-micro", init_std=0.3, n_kv_heads=2)).eval()
pack_for_cpu_inference(model, where_faster=True)
start = time.perf_counter()
step = aot.load_step(model)
took = time.perf_counter() - start
assert step is not None, "no package found"
model.setup_kv_cache(1, 16)
with torch.inference_mode():
    model(torch.tensor([[1, 2, 3]]), input_pos=0)
    k = [b.attn.kv_cache.k.clone() for b in model.blocks]
    v = [b.attn.kv_cache.v.clone() for b in model.blocks]
    want = model(torch.tensor([[4]]), input_pos=3)[:, -1]
    for b, kk, vv in zip(model.blocks, k, v):
        b.attn.kv_cache.k.copy_(kk); b.attn.kv_cache.v.copy_(vv)
    got = step(torch.tensor([[4]]), torch.tensor(3))
torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
print("compiler imported:", "torch._inductor" in sys.modules or "torch._dynamo" in sys.modules, "load_s", took)
"""
    env = {**os.environ, "LLMSCRATCH_CACHE": str(cache), aot.ENV: "load"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    line = done.stdout.strip().splitlines()[-1]
    assert line.startswith("compiler imported: False"), line
    assert float(line.split()[-1]) < 5.0  # milliseconds in practice; this bounds a loader that recompiles


def test_the_key_follows_what_the_compiled_code_depends_on():
    model = _model("gpt-micro")
    key = aot.step_key(model)
    model.setup_kv_cache(1, 48)  # holding a cache or not does not change it
    assert aot.step_key(model) == key
    model.clear_kv_cache()
    assert aot.step_key(model, batch_size=2) != key
    assert aot.step_key(_model("gpt-micro", dtype=torch.bfloat16)) != key
    assert aot.step_key(_model("gpt-micro", n_layers=3)) != key
    assert aot.step_key(_model("gpt-micro", seed=5)) == key  # weights are inputs


def test_the_key_names_the_vector_extensions_not_only_the_cpu_model(monkeypatch):
    """One model name ("AMD EPYC" under KVM) covers hosts with and without AVX-512; code built for one must not be
    loaded on the other (a shared home folder on a cluster), so their keys differ."""
    from llmscratch import runtime

    model = _model("gpt-micro")
    monkeypatch.setattr(runtime, "cpu_model", lambda: "AMD EPYC")
    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset({"avx2"}))
    avx2 = aot.step_key(model)
    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    assert aot.step_key(model) != avx2
    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset({"avx2"}))
    assert aot.step_key(model) == avx2


@pytest.mark.parametrize("overrides,why", [
    (dict(preset="qwen3-moe-micro"), "mixture-of-experts"),
    (dict(preset="gemma3-micro"), "sliding-window"),
    (dict(preset="mla-micro"), "latent-attention"),
])
def test_models_it_does_not_serve_say_why(overrides, why):
    model = GPT(ModelConfig.from_preset(overrides["preset"])).eval()
    assert why in aot.unsupported(model)
    assert aot.load_step(model) is None and not aot.start_background_build(model)
    assert "training" in aot.unsupported(GPT(ModelConfig.from_preset("gpt-micro")).train())
    assert "dtype" in aot.unsupported(GPT(ModelConfig.from_preset("gpt-micro")).half().eval())


def test_a_broken_package_is_marked_failed_and_decoding_stays_eager(tmp_path, monkeypatch, steps_used):
    monkeypatch.setenv("LLMSCRATCH_CACHE", str(tmp_path))
    monkeypatch.setenv(aot.ENV, "auto")
    model = _model("gpt-micro")
    files = aot._files(aot.step_key(model))
    files["package"].parent.mkdir(parents=True)
    files["package"].write_bytes(b"not a zip archive")
    files["meta"].write_text(json.dumps({"inputs": list(aot.step_tensors(model))}))
    prompt = torch.tensor([[1, 2, 3]])
    eager = [int(t) for t in generate_ids(model, prompt, 6)]
    assert [int(t) for t in generate_ids(model, prompt, 6, compiled_ahead=True)] == eager
    assert steps_used[0] == 0
    assert files["failed"].read_text().startswith("loading:")
    assert aot.load_step(model) is None and not aot.start_background_build(model)  # not tried again


def test_off_neither_loads_nor_builds(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMSCRATCH_CACHE", str(tmp_path))
    monkeypatch.setenv(aot.ENV, "off")
    model = _model("gpt-micro")
    assert not aot.start_background_build(model)
    assert not (tmp_path / aot.FOLDER).exists()
    monkeypatch.setenv(aot.ENV, "load")
    assert not aot.start_background_build(model)


def test_generate_builds_the_step_in_the_background_and_the_next_call_uses_it(tmp_path, monkeypatch, capsys):
    """The CLI end to end: the first `generate` says it started a build and answers at once; the builder
    process writes the package; the next `generate` decodes through it to the same text."""
    from clitools import run

    from llmscratch.checkpoint import save_model
    from llmscratch.tokenizer import BPETokenizer

    monkeypatch.setenv("LLMSCRATCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(aot.ENV, "auto")
    tok = BPETokenizer.train(["bytes"], 257, progress=False)
    torch.manual_seed(0)
    ckpt = save_model(tmp_path / "ckpt", GPT(ModelConfig.from_preset("gpt-micro", vocab_size=257, init_std=0.3)),
                      tok)
    argv = ["generate", ckpt, "--prompt", "Hello", "--max-new-tokens", 12, "--temperature", 0, "--device", "cpu",
            "--dtype", "fp32"]
    code, first, err = run(argv, capsys)
    assert code == 0, err
    assert "compiling this model shape's decoding step in the background" in err
    folder = tmp_path / "cache" / aot.FOLDER
    deadline = time.monotonic() + 240
    while not list(folder.glob("*.pt2")) and time.monotonic() < deadline:
        assert not list(folder.glob("*.failed")), [p.read_text() for p in folder.glob("*")]
        time.sleep(1)
    assert list(folder.glob("*.pt2")), [p.read_text() for p in folder.glob("*.log")]
    while list(folder.glob("*.building")) and time.monotonic() < deadline:  # the builder finishes, then exits
        time.sleep(0.2)
    # The next call finds it: no build is started, the same text comes out, through the step.
    from llmscratch.cli.inference import load_for_inference

    model, _ = load_for_inference(str(ckpt), "cpu", "fp32")
    assert aot.load_step(model) is not None
    code, second, err = run(argv, capsys)
    assert code == 0, err
    assert "background" not in err
    assert second == first


def test_the_batched_rows_step_decodes_the_tokens_the_eager_batch_does(tmp_path, monkeypatch):
    """The server's step (`DecodeBatch(compiled_ahead=True)`): rows of different prompt lengths join, decode at
    positions of their own and leave at different times; their tokens equal the eager batch's, and the compiled
    step ran for every decoding step, down to the last row alone."""
    from llmscratch.generate import DecodeBatch, Row

    monkeypatch.setenv("LLMSCRATCH_CACHE", str(tmp_path))
    monkeypatch.setenv(aot.ENV, "load")
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset("gpt-micro", init_std=0.3)).eval()
    pack_for_cpu_inference(model, 4, where_faster=True)  # as the server packs for its batch
    cache_len = model.config.context_length  # DecodeBatch's cache: min(context, 256)
    aot.build(model, 4, "rows", cache_len)
    calls = []
    real = aot.CompiledRowsStep.__call__
    monkeypatch.setattr(aot.CompiledRowsStep, "__call__", lambda self, idx, at, *a: calls.append(idx.size(0))
                        or real(self, idx, at, *a))

    def decode(compiled: bool) -> dict[int, list[int]]:
        batch = DecodeBatch(model, 4, compiled_ahead=compiled)
        gen = torch.Generator().manual_seed(1)
        lengths, wanted = [3, 9, 5, 12, 7, 4], [20, 8, 30, 15, 25, 10]
        rows = [Row(torch.randint(0, 512, (n,), generator=gen).tolist(), key=i) for i, n in enumerate(lengths)]
        for row in rows:
            batch.add(row)
        while len(batch):
            for row, _ in batch.step():
                if len(row.generated) >= wanted[row.key]:
                    batch.remove(row)
        batch.close()
        return {row.key: row.generated for row in rows}

    eager = decode(False)
    assert not calls
    assert decode(True) == eager
    assert len(calls) > 20 and min(calls) == 1 and max(calls) == 4
    step = aot.load_step(model, 4, "rows", cache_len)
    at = RowPositions.make([5, 6], 1)
    assert step.fits(2, at, cache_len) and step.fits(1, at, cache_len) and not step.fits(5, at, cache_len)
    assert not step.fits(2, at, 2 * cache_len)  # a grown cache is another package
    with pytest.raises(ValueError, match="no such step"):
        aot.build(model, 1, "rows", cache_len)


def test_a_bf16_rows_step_with_upcast_products_builds_and_matches_eager(tmp_path, monkeypatch):
    """`serve --dtype bf16` on a CPU without bf16 instructions: the linears are `UpcastLinear`s (model/packed.py),
    which the exported step multiplies in fp32 from `from_rows` rows and in bf16 below (`torch.cond`, the rows
    being dynamic); its logits match eager's either side."""
    from llmscratch import runtime
    from llmscratch.model.packed import UpcastLinear

    monkeypatch.setenv("LLMSCRATCH_CACHE", str(tmp_path))
    monkeypatch.setenv(aot.ENV, "load")
    monkeypatch.setattr(runtime, "bf16_upcast_rows", lambda: 2)
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset("gpt-micro", init_std=0.3)).to(torch.bfloat16).eval()
    pack_for_cpu_inference(model, 4, where_faster=True)
    assert any(isinstance(m, UpcastLinear) for m in model.modules())
    cache_len = model.config.context_length
    aot.build(model, 4, "rows", cache_len)
    step = aot.load_step(model, 4, "rows", cache_len)
    assert step is not None
    model.setup_kv_cache(4, cache_len)
    with torch.inference_mode():
        model(torch.randint(0, 512, (4, 6)), input_pos=RowPositions.make([0] * 4, 6))
        for n in (3, 1):  # 3 rows: fp32 products; 1 row: bf16
            new = torch.randint(0, 512, (n, 1))
            at = RowPositions.make([6] * n, 1, list(range(n)))
            compiled = step(new, at).float()
            eager = model(new, input_pos=at)[:, -1].float()
            assert compiled.shape == eager.shape == (n, model.config.vocab_size)
            assert (compiled - eager).abs().max() <= 0.02 * eager.abs().max()
            assert torch.equal(compiled.argmax(-1), eager.argmax(-1))
    model.clear_kv_cache()


def test_a_one_row_batch_neither_looks_for_nor_builds_a_rows_step(tmp_path, monkeypatch):
    """`serve --max-batch 1`: a "rows" step needs at least 2 rows, so the batch decodes eagerly and starts no
    builder (one used to start, and fail with "no such step")."""
    from llmscratch.generate import DecodeBatch, Row

    monkeypatch.setenv("LLMSCRATCH_CACHE", str(tmp_path))
    monkeypatch.setenv(aot.ENV, "auto")
    started = []
    monkeypatch.setattr(aot, "start_background_build", lambda *a, **k: started.append(a))
    model = _model("gpt-micro")
    batch = DecodeBatch(model, 1, compiled_ahead=True)
    batch.add(Row([1, 2, 3], key="only"))
    tokens = [token for _ in range(4) for _, token in batch.step()]
    assert len(tokens) == 4 and started == [] and not list(tmp_path.rglob("*.failed"))
    with pytest.raises(ValueError, match="no such step"):
        aot.build(model, 1, "rows", 64)
