"""Process settings from llmscratch.runtime that the trainer applies."""

import ctypes
import platform
import subprocess
import sys
import textwrap

import pytest

glibc_only = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="mallopt is glibc's (Linux); elsewhere the setting is a no-op")

# In a fresh process, under one of three allocator settings, allocate and touch a large tensor, then free it.
# Print glibc's mallinfo2 count of bytes in mmapped blocks while it lives, of free bytes the heap gained once it
# was freed, and of the bytes the process's resident memory shrank by on leaving the setting (0 if not left).
#   default: glibc's defaults; reuse: inside cpu_memory_kept_for_reuse;
#   left: after a 64 MiB tensor was allocated and freed inside the setting, which was then left.
_PROBE = textwrap.dedent("""
    import contextlib, ctypes, os, sys, torch
    from llmscratch.runtime import cpu_memory_kept_for_reuse
    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                     "fordblks", "keepcost")]
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    def touch(mib):
        t = torch.empty(mib * 2**18)  # fp32
        t.fill_(1.0)
        return t
    mode = sys.argv[1]
    with contextlib.ExitStack() as stack:
        if mode == "reuse":
            assert stack.enter_context(cpu_memory_kept_for_reuse())
        released = 0
        if mode == "left":
            with cpu_memory_kept_for_reuse() as active:
                assert active
                del_me = touch(64)
                del del_me
                before = rss()
            released = before - rss()
        free_before = libc.mallinfo2().fordblks
        # After leaving, 128 MiB: more than the heap's free chunk from the 64 MiB tensor freed inside, which
        # glibc may reuse (it keeps the chunk, with its pages returned, in its free lists).
        t = touch(128 if mode == "left" else 64)
        mmapped = libc.mallinfo2().hblkhd
        del t
        print(mmapped, libc.mallinfo2().fordblks - free_before, released)
""")
MIB64 = 64 * 2**20


def _probe(mode: str) -> tuple[int, int, int]:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True)
    mmapped, kept, released = out.stdout.split()
    return int(mmapped), int(kept), int(released)


@pytest.fixture
def mallinfo2():
    if not hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2"):
        pytest.skip("glibc before 2.33 has no mallinfo2")


@glibc_only
def test_cpu_memory_kept_for_reuse_keeps_a_freed_large_tensor_in_the_heap(mallinfo2):
    # (`kept` counts the heap's free bytes gained, give or take the small free chunks the tensor used up)
    mmapped, kept, _ = _probe("default")
    assert mmapped >= MIB64 and kept < MIB64 // 2  # glibc's default: mapped for the tensor, unmapped on free
    mmapped, kept, _ = _probe("reuse")
    assert mmapped < MIB64 and kept > MIB64 * 9 // 10  # from the heap, and still there for the next step


@glibc_only
def test_leaving_cpu_memory_kept_for_reuse_returns_the_memory_and_restores_the_defaults(mallinfo2):
    mmapped, kept, released = _probe("left")
    assert released >= MIB64 * 3 // 4  # the freed tensor's pages went back to the operating system
    assert mmapped >= 2 * MIB64 and kept < MIB64 // 2  # and large tensors are mapped and unmapped again


def test_nested_use_keeps_the_setting_until_the_outermost_exit(monkeypatch):
    """Only the outermost `with` restores glibc's limits (checked on a recording stand-in for the C library)."""
    from llmscratch import runtime

    calls = []

    class FakeLibc:
        def mallopt(self, param, value):
            calls.append(("mallopt", param, value))
            return 1

        def malloc_trim(self, pad):
            calls.append(("trim", pad))
            return 1

    monkeypatch.setattr(runtime, "_glibc", lambda: FakeLibc())
    with runtime.cpu_memory_kept_for_reuse() as outer:
        with runtime.cpu_memory_kept_for_reuse() as inner:
            assert outer and inner
        assert calls == [("mallopt", runtime._M_MMAP_MAX, 0), ("mallopt", runtime._M_TRIM_THRESHOLD, 2**31 - 1)]
    assert calls[2:] == [("mallopt", runtime._M_MMAP_MAX, runtime._DEFAULT_MMAP_MAX),
                         ("mallopt", runtime._M_TRIM_THRESHOLD, runtime._DEFAULT_TRIM_THRESHOLD), ("trim", 0)]
    assert runtime._heap_reuse_depth == 0


def test_packing_for_decoding_returns_the_replaced_weights_pages_but_not_inside_a_training_loop(monkeypatch):
    """`pack_for_cpu_inference` trims the heap once the replaced weights are freed (~170 MB for GPT-2 124M in
    bf16, benchmarks/RESULTS.md), while `cpu_memory_kept_for_reuse` keeps it on purpose (recording stand-in)."""
    import torch

    from llmscratch import runtime
    from llmscratch.config import ModelConfig
    from llmscratch.model import GPT
    from llmscratch.model.packed import can_pack, pack_for_cpu_inference

    trims = []

    class FakeLibc:
        def mallopt(self, param, value):
            return 1

        def malloc_trim(self, pad):
            trims.append(pad)
            return 1

    monkeypatch.setattr(runtime, "_glibc", lambda: FakeLibc())
    with runtime.cpu_memory_kept_for_reuse():
        runtime.return_freed_cpu_memory()
        assert trims == []
    assert trims == [0]  # leaving the setting
    model = GPT(ModelConfig(vocab_size=50, context_length=8, d_model=16, n_layers=1, n_heads=2))
    if not can_pack(model):
        pytest.skip("this PyTorch build has no oneDNN linear packing")
    assert pack_for_cpu_inference(model) == 5 and trims == [0, 0]
    assert model(torch.tensor([[1, 2]])).shape == (1, 2, 50)


# --- TF32 -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("enabled", [True, False])
def test_tf32_matmuls_sets_both_flags_and_restores_what_was_there(enabled):
    import torch

    from llmscratch.runtime import tf32_matmuls

    flags = torch.backends.cuda.matmul, torch.backends.cudnn
    before = [f.allow_tf32 for f in flags]
    try:
        for start in ((False, True), (True, False)):
            flags[0].allow_tf32, flags[1].allow_tf32 = start
            with tf32_matmuls(enabled):
                assert [f.allow_tf32 for f in flags] == [enabled, enabled]
            assert (flags[0].allow_tf32, flags[1].allow_tf32) == start
        with pytest.raises(KeyError), tf32_matmuls(enabled):  # restored when the body raises too
            raise KeyError
        assert (flags[0].allow_tf32, flags[1].allow_tf32) == start
    finally:
        flags[0].allow_tf32, flags[1].allow_tf32 = before


# --- devices --------------------------------------------------------------------------------------------------
def test_resolve_device_accepts_auto_and_the_cpu():
    import torch

    from llmscratch.runtime import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert resolve_device("auto") == torch.device(expected)


@pytest.mark.parametrize("cuda, mps, picked", [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_auto_prefers_cuda_then_mps_then_the_cpu(monkeypatch, cuda, mps, picked):
    import torch

    from llmscratch.runtime import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert resolve_device("auto") == torch.device(picked)


def test_mps_refuses_what_it_lacks_in_one_line(monkeypatch, tmp_path):
    """No Mac here: MPS is pretended, and the trainer must refuse torch.compile there before touching the device."""
    import torch

    from llmscratch.config import ModelConfig
    from llmscratch.errors import UserError
    from llmscratch.model import GPT
    from llmscratch.train.config import TrainConfig
    from llmscratch.train.trainer import train

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    with pytest.raises(UserError, match="torch.compile is not supported on MPS"):
        train(GPT(ModelConfig.from_preset("gpt-micro")), None, TrainConfig(compile=True), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name, why", [("bogus", "not a device name"), ("cuda:x", "not a device name"),
                                       ("meta", "not supported"), ("cuda:7", "cuda:7"), ("mps", "mps")])
def test_resolve_device_refuses_devices_this_machine_lacks_naming_the_choices(name, why, monkeypatch):
    import torch

    from llmscratch.errors import UserError
    from llmscratch.runtime import resolve_device

    # A machine with one CUDA device for cuda:7, none at all otherwise; never MPS.
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    if name == "cuda:7":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    else:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError) as info:
        resolve_device(name)
    message = str(info.value)
    assert message.startswith(f"--device {name}:") and why in message and "\n" not in message
    assert message.endswith("auto, cpu, cuda, cuda:0" if name == "cuda:7" else "auto, cpu")


def test_resolve_device_refuses_cuda_without_cuda(monkeypatch):
    import torch

    from llmscratch.errors import UserError
    from llmscratch.runtime import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="CUDA is not available"):
        resolve_device("cuda")


@pytest.mark.skipif(__import__("torch").backends.mps.is_available(), reason="this machine has MPS")
def test_generate_with_an_unavailable_device_is_a_one_line_error(capsys, tmp_path):
    from clitools import assert_user_error, run

    code, _, err = run(["generate", tmp_path / "no-checkpoint", "--prompt", "hi", "--device", "mps"], capsys)
    assert_user_error(code, err, "--device mps", "auto, cpu")
    code, _, err = run(["generate", tmp_path / "no-checkpoint", "--prompt", "hi", "--device", "bogus"], capsys)
    assert_user_error(code, err, "--device bogus", "not a device name")


def test_the_cpu_dtype_choice_is_measured_once_and_remembered(monkeypatch, tmp_path):
    """`--dtype auto` on a CPU is bf16 exactly where bf16 weights multiplied ≥ 10% faster than fp32 in this CPU's
    probe; the probe runs once per CPU model and is read back from the cache file after that."""
    import torch

    from llmscratch import runtime

    monkeypatch.setenv("LLMSCRATCH_CACHE", str(tmp_path))
    for timing, want in (({"fp32_us": 100.0, "bf16_us": 50.0}, torch.bfloat16),
                         ({"fp32_us": 100.0, "bf16_us": 95.0}, torch.float32),  # not 10% faster
                         ({"fp32_us": 100.0, "bf16_us": 900.0}, torch.float32)):  # emulated bf16 (AVX2)
        calls = []
        monkeypatch.setattr(runtime, "measure_dtypes", lambda t=timing, c=calls, **kw: c.append(1) or dict(t))
        (tmp_path / runtime.PROBE_CACHE).unlink(missing_ok=True)
        runtime.bf16_multiplies_faster.cache_clear()
        assert runtime.inference_dtype("auto", torch.device("cpu")) == want
        runtime.bf16_multiplies_faster.cache_clear()  # a new process: the answer comes from the file
        assert runtime.inference_dtype("auto", torch.device("cpu")) == want and len(calls) == 1
        assert any(runtime.cpu_model() in key and "dtype choice" in key for key in runtime.read_probe_cache())
    runtime.bf16_multiplies_faster.cache_clear()
    assert runtime.inference_dtype("fp32", torch.device("cpu")) == torch.float32  # named dtypes are not probed


def test_the_dtype_probe_times_both_dtypes():
    from llmscratch import runtime

    timing = runtime.measure_dtypes(rounds=3)
    assert set(timing) == {"fp32_us", "bf16_us"} and all(0 < v < 1e6 for v in timing.values())


def test_cpus_of_one_model_name_with_other_vector_extensions_are_probed_apart(monkeypatch, tmp_path):
    """Under virtualisation one model name ("AMD EPYC") covers hosts with and without AVX-512: the probe cache
    (and the compiled-step key) tell them apart by the vector extensions, and a host keeps its own answer."""
    import torch

    from llmscratch import runtime

    monkeypatch.setenv("LLMSCRATCH_CACHE", str(tmp_path))
    monkeypatch.setattr(runtime, "cpu_model", lambda: "AMD EPYC")
    answers = {"avx2": {"fp32_us": 100.0, "bf16_us": 60.0},  # streaming bf16 halves the bytes: faster
               "avx2,avx512f,avx512_bf16": {"fp32_us": 100.0, "bf16_us": 40.0}}
    measured = []
    for flags in (["avx2"], ["avx2", "avx512f", "avx512_bf16"], ["avx2"]):
        monkeypatch.setattr(runtime, "cpu_flags", lambda f=flags: frozenset(f))
        features = runtime.cpu_features()
        assert features == ",".join(flags)
        monkeypatch.setattr(runtime, "measure_dtypes",
                            lambda f=features, **kw: measured.append(f) or dict(answers[f]))
        assert runtime.dtype_probe() == answers[features]
        assert runtime.cpu_has_fast_bf16() == ("avx512_bf16" in flags)
    assert measured == ["avx2", "avx2,avx512f,avx512_bf16"]  # the second avx2 host read its own entry back
    keys = [k for k in runtime.read_probe_cache() if "dtype choice" in k]
    assert len(keys) == 2 and all(k.startswith("AMD EPYC|") for k in keys)
    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset())  # no /proc/cpuinfo: PyTorch's ISA name
    assert runtime.cpu_features() == torch.backends.cpu.get_cpu_capability()


def test_the_cpu_flags_are_read_from_proc_cpuinfo():
    from pathlib import Path

    from llmscratch import runtime

    if not Path("/proc/cpuinfo").exists():
        pytest.skip("no /proc/cpuinfo on this system")
    text = Path("/proc/cpuinfo").read_text()
    line = next((ln for ln in text.splitlines() if ln.startswith(("flags", "Features"))), None)
    if line is None:
        pytest.skip("/proc/cpuinfo lists no flags here")
    assert runtime.cpu_flags() == frozenset(line.split(":", 1)[1].split())


def test_a_servers_auto_dtype_is_bf16_only_where_bf16_is_faster_at_its_batch_too(monkeypatch, tmp_path):
    """On the AVX2-only EPYC bf16 streamed one row faster than fp32 but multiplied 32 rows at 1/6 of fp32's rate:
    `--dtype auto` with rows=32 (a server's --max-batch) must not pick bf16 there; with both faster it does."""
    import torch

    from llmscratch import runtime

    monkeypatch.setenv("LLMSCRATCH_CACHE", str(tmp_path))
    cpu = torch.device("cpu")
    for at_32, want_32 in (({"fp32_us": 400.0, "bf16_us": 2400.0}, torch.float32),  # emulated bf16 arithmetic
                           ({"fp32_us": 400.0, "bf16_us": 250.0}, torch.bfloat16)):  # AVX512-BF16
        timings = {1: {"fp32_us": 500.0, "bf16_us": 300.0}, 32: at_32}
        asked = []
        monkeypatch.setattr(runtime, "measure_dtypes",
                            lambda rounds=5, rows=1, a=asked, t=timings: a.append(rows) or dict(t[rows]))
        (tmp_path / runtime.PROBE_CACHE).unlink(missing_ok=True)
        runtime.bf16_multiplies_faster.cache_clear()
        assert runtime.inference_dtype("auto", cpu) == torch.bfloat16  # generate and chat: one row
        assert runtime.inference_dtype("auto", cpu, rows=32) == want_32
        assert sorted(asked) == [1, 32]  # each row count measured once
    runtime.bf16_multiplies_faster.cache_clear()
    assert runtime.probe_rows(1000) == 64 and runtime.probe_rows(0) == 1


def test_the_dtype_probe_times_a_batch_of_rows():
    from llmscratch import runtime

    timing = runtime.measure_dtypes(rounds=3, rows=8)
    assert set(timing) == {"fp32_us", "bf16_us"} and all(0 < v < 1e6 for v in timing.values())


def test_training_auto_precision_follows_the_measured_product_at_many_rows_not_the_flags(monkeypatch, tmp_path):
    """`--train.precision auto` on a CPU is bf16 autocast exactly where bf16 multiplied `TRAIN_PROBE_ROWS` rows at
    least 10% faster; what /proc/cpuinfo claims does not decide (a build whose kernels ignore AVX512-BF16 would
    train slower in bf16)."""
    import torch

    from llmscratch import runtime

    monkeypatch.setenv("LLMSCRATCH_CACHE", str(tmp_path))
    cpu = torch.device("cpu")
    for flags, at_64, want in (({"avx512_bf16"}, {"fp32_us": 2400.0, "bf16_us": 2500.0}, None),
                               (set(), {"fp32_us": 2400.0, "bf16_us": 900.0}, torch.bfloat16),
                               ({"avx2"}, {"fp32_us": 2450.0, "bf16_us": 14800.0}, None)):  # the AVX2-only EPYC
        monkeypatch.setattr(runtime, "cpu_flags", lambda f=flags: frozenset(f))
        asked = []
        monkeypatch.setattr(runtime, "measure_dtypes",
                            lambda rounds=5, rows=1, a=asked, t=at_64: a.append(rows) or dict(t))
        runtime.bf16_multiplies_faster.cache_clear()
        assert runtime.autocast_dtype("auto", cpu) == want
        assert asked == [runtime.TRAIN_PROBE_ROWS]
    runtime.bf16_multiplies_faster.cache_clear()
    assert runtime.autocast_dtype("fp32", cpu) is None and runtime.autocast_dtype("bf16", cpu) == torch.bfloat16
