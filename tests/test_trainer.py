"""The trainer: LR schedule, exact resume (also after SIGKILL), NaN guard, metrics and plots."""

import csv
import dataclasses
import math
import os
import re
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from clitools import Crash, assert_user_error, crash_at, run

from llmscratch.config import ModelConfig
from llmscratch.errors import UserError
from llmscratch.model import GPT
from llmscratch.train.batches import ExampleBatches
from llmscratch.train.pretrain import LMBatches
from llmscratch.train.schedule import lr_at
from llmscratch.train.trainer import TrainConfig, TrainingDiverged, build_optimizer, train

MICRO = dict(vocab_size=300, context_length=32, d_model=32, n_layers=2, n_heads=4, dropout=0.1)


def train_losses(run_dir):
    with open(run_dir / "metrics.csv", newline="") as f:
        return [(int(r["step"]), r["train_loss"]) for r in csv.DictReader(f) if r["kind"] == "train"]


def small_cfg(**kw):
    base = dict(max_steps=12, batch_size=4, lr=3e-3, warmup_steps=3, eval_every=6, eval_batches=2, log_every=1,
                save_every=4, keep_last=5, progress=False, device="cpu")
    return TrainConfig(**{**base, **kw})


def fresh(prepared, cfg):
    torch.manual_seed(0)
    return GPT(ModelConfig(**MICRO)), LMBatches(prepared, cfg.batch_size, MICRO["context_length"], cfg.seed)


# --- schedule ---------------------------------------------------------------------------------------------
def test_lr_schedule_warmup_peak_cosine_floor():
    lrs = [lr_at(s, 1.0, 10, 110, 0.1) for s in range(120)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))  # warmup rises linearly
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.55)  # halfway through the cosine: midpoint of peak and floor
    assert all(a >= b for a, b in zip(lrs[10:110], lrs[11:111]))  # then decays monotonically
    assert lrs[110] == pytest.approx(0.1) and lrs[119] == pytest.approx(0.1)


def test_lr_schedule_without_warmup_starts_at_peak():
    assert lr_at(0, 3e-4, 0, 100) == pytest.approx(3e-4)


# --- optimizer --------------------------------------------------------------------------------------------
def test_no_weight_decay_on_norms_biases_embeddings():
    model = GPT(ModelConfig(**MICRO))
    opt = build_optimizer(model, TrainConfig(weight_decay=0.1), torch.device("cpu"))
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    for name, p in model.named_parameters():
        expect = p.dim() >= 2 and not name.startswith(("tok_emb", "pos_emb"))
        assert (id(p) in decayed) == expect, name
    assert opt.param_groups[1]["weight_decay"] == 0.0


# --- settings ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field, value, needle", [
    ("max_steps", 0, "at least 1"), ("grad_accum", 0, "at least 1"), ("log_every", 0, "at least 1"),
    ("save_every", 0, "at least 1"), ("eval_every", 0, "at least 1"), ("eval_batches", 0, "at least 1"),
    ("warmup_steps", -1, "0 (no warmup) or more"), ("lr", 0.0, "positive"), ("lr", -1e-3, "positive"),
    ("lr", float("nan"), "positive"), ("lr", float("inf"), "positive"), ("weight_decay", -0.1, "0 (no decay)"),
    ("keep_last", -1, "0 (keep every checkpoint)"), ("batch_size", -1, "0 for the largest"),
    ("min_lr_ratio", -0.1, "between 0 and 1"), ("min_lr_ratio", 1.5, "between 0 and 1"),
    ("max_minutes", 0, "positive"), ("max_minutes", -5.0, "positive"), ("beta2", 1.0, "below 1"),
    ("grad_clip", -1.0, "0 (no clipping)"), ("sample_every", -1, "0 (no samples)")])
def test_nonsensical_settings_are_one_line_user_errors(field, value, needle, tmp_path):
    cfg = TrainConfig(**{field: value})
    with pytest.raises(UserError, match=re.escape(f"--train.{field} {value}: ") + ".*" + re.escape(needle)):
        cfg.check()
    with pytest.raises(UserError, match=f"--train.{field}"):  # train() checks before it touches anything
        train(GPT(ModelConfig(**MICRO)), None, cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_sensible_settings_pass_the_check():
    TrainConfig().check()
    small_cfg().check()
    TrainConfig(batch_size=0, warmup_steps=0, weight_decay=0.0, keep_last=0, min_lr_ratio=0.0, max_minutes=0.5,
                grad_clip=0.0).check()
    TrainConfig(min_lr_ratio=1.0, beta1=0.0).check()


def test_cli_rejects_a_nonsensical_setting_with_exit_2(prepared, tmp_path, capsys):
    code, out, err = run(["pretrain", "--data", prepared, "--out", tmp_path / "run", "--model", "gpt-micro",
                          "--context-length", 32, "--no-progress", "--train.grad_accum", 0], capsys)
    assert_user_error(code, err, "--train.grad_accum 0", "at least 1")
    assert not (tmp_path / "run" / "checkpoints").exists()


# --- training ---------------------------------------------------------------------------------------------
def test_overfits_and_writes_run_folder(prepared, tmp_path):
    cfg = small_cfg(max_steps=40, eval_every=20, save_every=20, lr=1e-2)
    model, batches = fresh(prepared, cfg)
    result = train(model, batches, cfg, tmp_path / "run")
    losses = [float(v) for _, v in train_losses(tmp_path / "run")]
    assert losses[-1] < losses[0] - 0.5, losses  # it learns
    run = tmp_path / "run"
    for name in ("model.safetensors", "config.json", "metrics.csv", "loss.png", "hyperparameters.yaml"):
        assert (run / name).is_file(), name
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000020", "step-0000040"]
    assert (run / "checkpoints" / "step-0000040" / "train_state.pt").is_file()
    assert result.step == 40 and result.val_loss is not None and math.isfinite(result.val_loss)
    assert not list(run.rglob("*.tmp")) and not list((run / "checkpoints").glob(".step-*"))


def test_keep_last_prunes_old_checkpoints(prepared, tmp_path):
    cfg = small_cfg(max_steps=12, save_every=2, keep_last=2)
    before = dataclasses.asdict(cfg)
    model, batches = fresh(prepared, cfg)
    train(model, batches, cfg, tmp_path / "run")
    assert dataclasses.asdict(cfg) == before  # the caller's settings are left as they were
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-0000010",
                                                                                    "step-0000012"]


def test_resume_after_exception_matches_uninterrupted_run(prepared, tmp_path):
    cfg = small_cfg()
    model, batches = fresh(prepared, cfg)
    train(model, batches, cfg, tmp_path / "a")

    model, batches = fresh(prepared, cfg)
    with pytest.raises(Crash):
        # (crashing after the step-4 checkpoint, before the step-8 one)
        train(model, batches, cfg, tmp_path / "b", on_step=crash_at(7))
    model, batches = fresh(prepared, cfg)
    train(model, batches, cfg, tmp_path / "b", resume=True)
    assert train_losses(tmp_path / "a") == train_losses(tmp_path / "b")
    assert len(train_losses(tmp_path / "b")) == cfg.max_steps


CHILD = textwrap.dedent("""
    import os, signal, sys, torch
    from llmscratch.config import ModelConfig
    from llmscratch.model import GPT
    from llmscratch.train.pretrain import LMBatches
    from llmscratch.train.trainer import TrainConfig, train
    data, out, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
    cfg = TrainConfig(max_steps=12, batch_size=4, lr=3e-3, warmup_steps=3, eval_every=6, eval_batches=2,
                      log_every=1, save_every=4, keep_last=5, progress=False, device="cpu")
    torch.manual_seed(0)
    model = GPT(ModelConfig(**{MICRO!r}))
    batches = LMBatches(data, cfg.batch_size, {ctx}, cfg.seed)
    def on_step(step, loss):
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    train(model, batches, cfg, out, on_step=on_step)
""").replace("{MICRO!r}", repr(MICRO)).replace("{ctx}", str(MICRO["context_length"]))


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="SIGKILL needs a POSIX system")
def test_resume_after_sigkill_matches_uninterrupted_run(prepared, tmp_path):
    cfg = small_cfg()
    model, batches = fresh(prepared, cfg)
    train(model, batches, cfg, tmp_path / "a")

    script = tmp_path / "child.py"
    script.write_text(CHILD)
    proc = subprocess.run([sys.executable, str(script), str(prepared), str(tmp_path / "b"), "10"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["step-0000004",
                                                                                  "step-0000008"]
    model, batches = fresh(prepared, cfg)
    train(model, batches, cfg, tmp_path / "b", resume=True)
    assert train_losses(tmp_path / "a") == train_losses(tmp_path / "b")


def test_resume_without_checkpoint_is_a_user_error(prepared, tmp_path):
    cfg = small_cfg()
    model, batches = fresh(prepared, cfg)
    with pytest.raises(UserError, match="no checkpoint"):
        train(model, batches, cfg, tmp_path / "empty", resume=True)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(prepared, tmp_path):
    cfg = small_cfg(max_steps=12, save_every=4)

    def loss_fn(model, batch):
        x, y = batch
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        if model.training:
            if step_counter["n"] >= 6 * cfg.grad_accum:  # poison the training loss from step 7 on
                loss = loss * float("nan")
            step_counter["n"] += 1
        return loss, y.numel()

    step_counter = {"n": 0}
    model, batches = fresh(prepared, cfg)
    with pytest.raises(TrainingDiverged, match="loss became nan at step 7"):
        train(model, batches, cfg, tmp_path / "run", loss_fn=loss_fn)
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["step-0000004"]
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "run" / "checkpoints" / "step-0000004" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in state.values())


def test_time_budget_stops_early_and_saves(prepared, tmp_path):
    cfg = small_cfg(max_steps=100000, max_minutes=0.02, save_every=100000, eval_every=100000)
    model, batches = fresh(prepared, cfg)
    result = train(model, batches, cfg, tmp_path / "run")
    assert result.stopped_early == "time" and 0 < result.step < 100000
    assert (tmp_path / "run" / "checkpoints" / f"step-{result.step:07d}").is_dir()
    assert (tmp_path / "run" / "model.safetensors").is_file()


@pytest.mark.parametrize("reuse", [True, False])
def test_cpu_heap_setting_lasts_exactly_as_long_as_training(prepared, tmp_path, monkeypatch, reuse):
    from llmscratch import runtime

    class AcceptingLibc:  # a stand-in C library: mallopt and malloc_trim succeed and change nothing
        def mallopt(self, param, value):
            return 1

        def malloc_trim(self, pad):
            return 1

    monkeypatch.setattr(runtime, "_glibc", lambda: AcceptingLibc())
    depth_at_steps = []
    cfg = small_cfg(max_steps=2, cpu_heap_reuse=reuse)
    model, batches = fresh(prepared, cfg)
    train(model, batches, cfg, tmp_path / "run",
          on_step=lambda step, loss: depth_at_steps.append(runtime._heap_reuse_depth))
    assert depth_at_steps == ([1, 1] if reuse else [0, 0])
    assert runtime._heap_reuse_depth == 0  # left when training ended


@pytest.mark.skipif(not torch.cuda.is_available(), reason="TF32 is a CUDA setting")
def test_tf32_is_on_while_training_on_cuda_and_restored_after(prepared, tmp_path):
    from llmscratch.train.pretrain import LMBatches

    flags = (torch.backends.cuda.matmul, torch.backends.cudnn)
    before = [f.allow_tf32 for f in flags]
    seen = []
    try:
        for f in flags:
            f.allow_tf32 = False
        cfg = small_cfg(max_steps=2, device="cuda", compile=False)
        torch.manual_seed(0)
        batches = LMBatches(prepared, cfg.batch_size, MICRO["context_length"], cfg.seed, device="cuda")
        train(GPT(ModelConfig(**MICRO)), batches, cfg, tmp_path / "run",
              on_step=lambda step, loss: seen.append([f.allow_tf32 for f in flags]))
        assert seen == [[True, True]] * 2
        assert [f.allow_tf32 for f in flags] == [False, False]  # as the caller had them
    finally:
        for f, was in zip(flags, before):
            f.allow_tf32 = was


def test_grad_accumulation_equals_bigger_batch(prepared, tmp_path):
    """Two micro-batches of 2 give the same update as one batch of 4 holding the same rows."""
    torch.manual_seed(0)
    cfg_model = ModelConfig(**{**MICRO, "dropout": 0.0})
    a, b = GPT(cfg_model), GPT(cfg_model)
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, 300, (4, 16))
    y = torch.randint(0, 300, (4, 16))

    class Fixed:
        def __init__(self, parts):
            self.parts, self.i = parts, 0

        def next(self, split):
            part = self.parts[self.i % len(self.parts)]
            self.i += 1
            return part

        def reset_eval(self):
            pass

        def state_dict(self):
            return {}

        def load_state_dict(self, s):
            pass

    common = dict(max_steps=1, warmup_steps=0, eval_every=100, eval_batches=1, save_every=100, progress=False,
                  precision="fp32",
                  device="cpu", grad_clip=0.0)
    train(a, Fixed([(x, y)]), TrainConfig(batch_size=4, **common), tmp_path / "a")
    train(b, Fixed([(x[:2], y[:2]), (x[2:], y[2:])]), TrainConfig(batch_size=2, grad_accum=2, **common),
          tmp_path / "b")
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=n)


def test_interrupt_flag_saves_and_stops(prepared, tmp_path):
    cfg = small_cfg(max_steps=50, save_every=1000)

    def ctrl_c(step, loss):
        if step == 5:
            os.kill(os.getpid(), signal.SIGINT)

    model, batches = fresh(prepared, cfg)
    result = train(model, batches, cfg, tmp_path / "run", on_step=ctrl_c)
    assert result.stopped_early == "interrupt" and result.step == 5
    assert (tmp_path / "run" / "checkpoints" / "step-0000005" / "train_state.pt").is_file()


def test_largest_fitting_batch_doubles_until_out_of_memory():
    from llmscratch.train.trainer import largest_fitting_batch

    tried = []

    def fits_up_to_24(b):
        tried.append(b)
        if b > 24:
            raise torch.cuda.OutOfMemoryError("fake: out of memory")

    assert largest_fitting_batch(fits_up_to_24) == 16
    assert tried == [1, 2, 4, 8, 16, 32]
    assert largest_fitting_batch(lambda b: None, limit=8) == 8


def test_largest_fitting_batch_when_nothing_fits_is_a_user_error():
    from llmscratch.train.trainer import largest_fitting_batch

    def never(b):
        raise torch.cuda.OutOfMemoryError("fake")

    with pytest.raises(UserError, match="not even one sequence"):
        largest_fitting_batch(never)


def test_auto_micro_batch_on_cpu_is_eight():
    from llmscratch.train.trainer import find_micro_batch

    m = GPT(ModelConfig.from_preset("gpt-micro"))
    assert find_micro_batch(m, 64, TrainConfig(batch_size=0), torch.device("cpu")) == 8


# --- extra scalars from loss_fn ---------------------------------------------------------------------------
def test_loss_fn_extras_are_averaged_and_logged_as_columns(prepared, tmp_path):
    """A loss_fn may return (loss, n, {name: scalar}): each extra is averaged over the logging window and over
    the evaluation batches like the loss, and lands in metrics.csv as train_<name> / val_<name> columns, also
    across a resume (whose metrics.csv already has the wider header)."""
    from llmscratch.train.trainer import lm_loss

    calls = {"n": 0}

    def loss_with_extras(model, batch):
        loss, n = lm_loss(model, batch)
        calls["n"] += 1
        # One extra that tracks the loss, one constant, one that alternates 0/1 (mean 0.5 over pairs of calls).
        return loss, n, {"loss_copy": loss.detach(), "const": 2.5, "flip": float(calls["n"] % 2)}

    cfg = small_cfg(max_steps=4, log_every=2, eval_every=2, eval_batches=2, save_every=2)
    model, batches = fresh(prepared, cfg)
    result = train(model, batches, cfg, tmp_path, loss_fn=loss_with_extras)
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    train_rows = [r for r in rows if r["kind"] == "train"]
    eval_rows = [r for r in rows if r["kind"] == "eval"]
    assert len(train_rows) == 2 and len(eval_rows) == 2
    for r in train_rows:
        assert float(r["train_loss_copy"]) == pytest.approx(float(r["train_loss"]), rel=1e-5)
        assert float(r["train_const"]) == pytest.approx(2.5)
        assert float(r["train_flip"]) == pytest.approx(0.5)
    for r in eval_rows:
        assert float(r["train_loss_copy"]) == pytest.approx(float(r["train_loss"]), rel=1e-5)
        assert float(r["val_loss_copy"]) == pytest.approx(float(r["val_loss"]), rel=1e-5)
        assert float(r["val_const"]) == pytest.approx(2.5)
    assert result.history[-1]["val_const"] == pytest.approx(2.5)

    # Resume to step 6: the earlier rows and their extra columns are kept, the new rows fill them too.
    cfg6 = small_cfg(max_steps=6, log_every=2, eval_every=2, eval_batches=2, save_every=2)
    model, batches = fresh(prepared, cfg6)
    train(model, batches, cfg6, tmp_path, loss_fn=loss_with_extras, resume=True)
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows if r["kind"] == "eval"] == [2, 4, 6]
    assert all(float(r["val_const"]) == pytest.approx(2.5) for r in rows if r["kind"] == "eval")


def test_loss_fn_returning_two_items_logs_no_extra_columns(prepared, tmp_path):
    from llmscratch.train.metrics import FIELDS

    cfg = small_cfg(max_steps=2, log_every=1, eval_every=2, eval_batches=1, save_every=2)
    model, batches = fresh(prepared, cfg)
    train(model, batches, cfg, tmp_path)
    with open(tmp_path / "metrics.csv", newline="") as f:
        assert next(csv.reader(f)) == FIELDS


def test_perplexity_and_loss_label_can_be_turned_off(tmp_path, capsys):
    # A classification or DPO loss is not a next-token loss: no perplexity in the log or metrics.csv.
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset("gpt-micro", vocab_size=64, context_length=16))
    rows = list(torch.randint(0, 64, (8, 17)))

    def collate(batch):
        t = torch.stack(batch)
        return t[:, :-1], t[:, 1:]

    batches = ExampleBatches(rows, rows, collate, batch_size=4)
    cfg = TrainConfig(max_steps=2, eval_every=1, eval_batches=1, log_every=1, save_every=2, progress=False,
                      device="cpu", precision="fp32", warmup_steps=1)
    train(model, batches, cfg, tmp_path, perplexity=False, loss_label="DPO loss")
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [r["val_ppl"] for r in rows if r["kind"] == "eval"] == ["", ""]
    out = capsys.readouterr().out
    assert "val loss" in out and "perplexity" not in out
    assert (tmp_path / "loss.png").is_file()


def test_removed_on_failure_removes_only_a_new_folder_without_a_checkpoint(tmp_path):
    from llmscratch.train.pretrain import check_out_dir, removed_on_failure
    from llmscratch.train.trainer import TRAIN_STATE

    new = tmp_path / "new"
    with pytest.raises(KeyboardInterrupt), removed_on_failure(new, check_out_dir(new)):
        (new / "partial.bin").write_bytes(b"x")
        raise KeyboardInterrupt
    assert not new.exists()  # created by this run, nothing resumable: gone

    old = tmp_path / "old"
    old.mkdir()
    (old / "keep.txt").write_text("mine")
    with pytest.raises(ValueError), removed_on_failure(old, check_out_dir(old)):
        raise ValueError
    assert (old / "keep.txt").read_text() == "mine"  # the user's folder stays

    resumable = tmp_path / "resumable"
    with pytest.raises(RuntimeError), removed_on_failure(resumable, check_out_dir(resumable)):
        step = resumable / "checkpoints" / "step-0000010"
        step.mkdir(parents=True)
        (step / TRAIN_STATE).write_bytes(b"")
        raise RuntimeError
    assert (resumable / "checkpoints" / "step-0000010").is_dir()  # --resume can continue from it

    ok = tmp_path / "ok"
    with removed_on_failure(ok, check_out_dir(ok)):
        pass
    assert ok.is_dir()


@pytest.mark.parametrize("setting, device, want", [(None, "cpu", False), (None, "cuda", True), (True, "cpu", True),
                                                   (False, "cuda", False)])
def test_bf16_residual_defaults_on_for_cuda_only(setting, device, want):
    from llmscratch.train.trainer import set_model_options

    model = GPT(ModelConfig(**MICRO))
    set_model_options(model, TrainConfig(bf16_residual=setting, activation_checkpointing=True), torch.device(device))
    assert model.options.low_precision_residual is want and model.options.activation_checkpointing is True


def test_progress_bar_says_the_first_step_compiles(prepared, tmp_path, monkeypatch, capsys):
    """With compilation on (the CUDA default), the first step's wait of tens of seconds is named on the bar."""
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compiled.append(model) or model)  # no compile wait
    cfg = small_cfg(max_steps=2, compile=True, progress=True, eval_every=100, save_every=100)
    model, batches = fresh(prepared, cfg)
    train(model, batches, cfg, tmp_path / "run")
    assert compiled == [model]
    assert "compiling the model (torch.compile)" in capsys.readouterr().err
    cfg = small_cfg(max_steps=2, compile=False, progress=True, eval_every=100, save_every=100)
    model, batches = fresh(prepared, cfg)
    train(model, batches, cfg, tmp_path / "run2")
    assert "compiling" not in capsys.readouterr().err
