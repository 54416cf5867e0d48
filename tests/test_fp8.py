"""`--train.precision fp8`: the blocks' linears train as torchao's Float8Linear (emulated on a CPU: the same
scaling and rounding as on an H100), the heads stay bf16, and the caller gets its plain model back."""

import csv
import importlib.util
import sys

import pytest
import torch
from clitools import Crash, assert_user_error, crash_at, run
from torch import nn

from llmscratch.config import ModelConfig
from llmscratch.errors import UserError
from llmscratch.model import GPT
from llmscratch.train import fp8
from llmscratch.train.batches import TokenBatches
from llmscratch.train.trainer import TrainConfig, train

# (found, not imported: torchao is imported by the code under test, only when fp8 is asked for)
pytestmark = pytest.mark.skipif(importlib.util.find_spec("torchao") is None,
                                reason="torchao (the fp8 extra, in the test extra) is not installed")

# A byte-level model whose block linears are multiples of 16 (96 wide) and whose head (257 outputs) is not.
SHAPE = dict(vocab_size=257, context_length=48, d_model=96, n_layers=2, n_heads=3, dropout=0.0)


def walk() -> torch.Tensor:
    """A learnable byte sequence: a random walk over byte values, so the loss falls well below log(257)."""
    steps = torch.randint(-3, 4, (6000,), generator=torch.Generator().manual_seed(123))
    return steps.cumsum(0) % 257


def walk_batches(seed: int = 0, batch: int = 8) -> TokenBatches:
    """Training batches of the walk in a seeded order; evaluation batches repeat."""
    return TokenBatches(walk(), batch, SHAPE["context_length"], seed)


def cfg(precision, **kw):
    base = dict(max_steps=60, batch_size=8, lr=3e-3, warmup_steps=10, eval_every=60, eval_batches=2,
                log_every=5, save_every=60, progress=False, device="cpu", precision=precision)
    return TrainConfig(**{**base, **kw})


def losses(run_dir):
    with open(run_dir / "metrics.csv", newline="") as f:
        return [float(r["train_loss"]) for r in csv.DictReader(f) if r["kind"] == "train"]


def fresh():
    torch.manual_seed(0)
    return GPT(ModelConfig(**SHAPE))


def test_fp8_trains_the_block_linears_in_float8_and_tracks_bf16(tmp_path):
    bf16 = fresh()
    train(bf16, walk_batches(), cfg("bf16"), tmp_path / "bf16")

    model = fresh()
    params_before = {name: p for name, p in model.named_parameters()}
    seen = {}

    def look(step, loss):  # the model's linears as training sees them
        if step == 1:
            seen.update({name: type(m).__name__ for name, m in model.named_modules()
                         if isinstance(m, nn.Linear)})

    train(model, walk_batches(), cfg("fp8"), tmp_path / "fp8", on_step=look)

    block_linears = {n: t for n, t in seen.items() if n.startswith("blocks.")}
    assert len(block_linears) == 4 * SHAPE["n_layers"]  # qkv, proj, fc, proj in each block
    assert set(block_linears.values()) == {"Float8Linear"}
    assert seen["lm_head"] == "Linear"
    # afterwards: plain linears again, holding the very parameters the caller gave
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith(("qkv", "proj", "fc")))
    assert {n: p for n, p in model.named_parameters()}.keys() == params_before.keys()
    assert all(p is params_before[n] for n, p in model.named_parameters())

    a, b = losses(tmp_path / "bf16"), losses(tmp_path / "fp8")
    assert len(a) == len(b) == 12
    assert a[-1] < a[0] - 1.5  # the run learns (from ~5.6 nats)
    assert a != b  # fp8 rounds differently: it really multiplied in float8
    # ...and its loss curve follows bf16's within 1% at every logged step (0.1% seen)
    assert max(abs(x - y) / x for x, y in zip(a, b)) < 0.01, (a, b)


def test_fp8_checkpoint_loads_into_a_plain_model_and_resume_continues_exactly(tmp_path):
    whole = fresh()
    train(whole, walk_batches(), cfg("fp8", max_steps=8, save_every=4, log_every=1, eval_every=4), tmp_path / "whole")

    part = fresh()
    with pytest.raises(Crash):
        train(part, walk_batches(), cfg("fp8", max_steps=8, save_every=4, log_every=1, eval_every=4), tmp_path / "part",
              on_step=crash_at(6))  # after the step-4 checkpoint
    # the interrupted run handed back plain linears too
    assert all(type(m) is nn.Linear for m in part.modules() if isinstance(m, nn.Linear))
    resumed = fresh()
    train(resumed, walk_batches(), cfg("fp8", max_steps=8, save_every=4, log_every=1, eval_every=4),
          tmp_path / "part", resume=True)
    assert losses(tmp_path / "part") == losses(tmp_path / "whole")
    assert len(losses(tmp_path / "whole")) == 8

    from llmscratch.checkpoint import load_model

    loaded = load_model(tmp_path / "whole")
    x = torch.randint(0, 257, (2, 16))
    whole.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), whole(x))


def test_lora_fine_tuning_in_fp8_trains_the_adapters_and_leaves_the_base(tmp_path):
    from llmscratch.lora import apply_lora

    model = fresh()
    applied = apply_lora(model, "all", rank=16, alpha=16)
    wrapped = [model.get_submodule(name) for name in applied.modules]
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    b_before = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("lora_B")}
    train(model, walk_batches(), cfg("fp8", max_steps=6, log_every=3, eval_every=6, save_every=6), tmp_path / "lora")
    assert len(wrapped) == 4 * SHAPE["n_layers"]
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)
    assert any(not torch.equal(p, b_before[n]) for n, p in model.named_parameters() if n in b_before)
    assert all(type(m.base) is nn.Linear for m in wrapped)  # plain again after training


def test_a_model_without_eligible_linears_is_refused_in_one_line(tmp_path):
    model = GPT(ModelConfig(**{**SHAPE, "d_model": 36, "n_heads": 3}))  # 36, 108: not multiples of 16
    with pytest.raises(UserError, match="multiple of 16"):
        train(model, walk_batches(), cfg("fp8", max_steps=1), tmp_path / "r")
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_devices_without_fp8_are_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(UserError, match=r"A100 \(compute capability 8\.0\) has no fp8"):
        fp8.check_device(torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    fp8.check_device(torch.device("cuda", 0))  # H100/H200
    with pytest.raises(UserError, match="not on mps"):
        fp8.check_device(torch.device("mps"))


def test_without_torchao_the_error_says_how_to_install_it(monkeypatch):  # (runs with torchao installed too)
    monkeypatch.setitem(sys.modules, "torchao.float8", None)  # makes `import torchao.float8` fail
    with pytest.raises(UserError, match=r"pip install 'llmscratch\[fp8\]'"):
        fp8.convert(fresh(), torch.device("cpu"))
    assert all(type(m) is nn.Linear for m in fresh().modules() if isinstance(m, nn.Linear))


def test_pretrain_cli_runs_in_fp8(prepared, tmp_path, capsys):
    code, out, err = run(["pretrain", "--data", prepared, "--out", tmp_path / "run", "--model", "gpt-micro",
                          "--context-length", 32, "--no-progress", "--train.max_steps", 3, "--train.eval_every", 3,
                          "--train.eval_batches", 1, "--train.batch_size", 2, "--train.precision", "fp8"], capsys)
    assert code == 0, err
    assert (tmp_path / "run" / "model.safetensors").exists()
    code, out, err = run(["pretrain", "--data", prepared, "--out", tmp_path / "bad", "--model", "gpt-micro",
                          "--no-progress", "--train.precision", "fp4"], capsys)
    assert_user_error(code, err, "--train.precision fp4", "fp8")
