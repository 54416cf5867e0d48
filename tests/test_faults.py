"""Fault injection (issue 24): `pretrain` killed (SIGKILL) at random moments, checkpoint saves included, resumes to
the very model an uninterrupted run ends with, and cleans the temporary folders of the saves it lost; Ctrl-C (SIGINT)
saves a resumable checkpoint and exits 130; a full disk during a save is one line that says so and keeps the
previous checkpoint (simulated in-process always, on a real 3 MiB tmpfs where the test may mount one).

The killed runs are real processes (`python -m llmscratch.cli pretrain`), single-threaded so that every run, the
reference included, computes in the same order: bit-for-bit equality is the claim under test.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from clitools import assert_same_files, assert_user_error, run, snapshot

STEPS = 8
TRAIN = ["--model", "gpt-micro", "--train.max_steps", STEPS, "--train.batch_size", 2, "--train.eval_every", 4,
         "--train.eval_batches", 1, "--train.save_every", 1, "--train.log_every", 1, "--train.warmup_steps", 2,
         "--context-length", 32, "--train.precision", "fp32", "--no-progress"]
KILLS = 10
SEED = 24  # of the kill moments: the same ten every time


def _cli(data: Path, out: Path, *extra) -> list[str]:
    return [sys.executable, "-m", "llmscratch.cli", "pretrain", "--data", str(data), "--out", str(out),
            *(str(a) for a in (*TRAIN, *extra))]


def _env() -> dict[str, str]:
    # one thread each: two runs share the machine's cores, and every run sums in the same order
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _save_temps(run_dir: Path) -> list[str]:
    """The temporary folders of checkpoint saves in progress (or lost): checkpoints/.step-*."""
    folder = run_dir / "checkpoints"
    return sorted(p.name for p in folder.glob(".step-*")) if folder.is_dir() else []


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 180.0) -> bool:
    """Poll `condition()` every half millisecond until it holds (True) or `proc` has ended without it (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if proc.poll() is not None:
            return condition()
        time.sleep(0.0005)
    raise AssertionError(f"waited {timeout} s for the run")


def _metrics(run_dir: Path) -> list[tuple]:
    """The rows of metrics.csv that do not depend on timing: (kind, step, tokens, train loss, val loss)."""
    with open(run_dir / "metrics.csv", newline="") as f:
        return [(r["kind"], r["step"], r["tokens"], r["train_loss"], r.get("val_loss")) for r in csv.DictReader(f)]


def _reference(data: Path, out: Path) -> float:
    """The uninterrupted run; returns how long it ran after its first checkpoint (the window the kills fall in)."""
    proc = subprocess.Popen(_cli(data, out), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    with _ended(proc):
        assert _wait_for((out / "checkpoints" / "step-0000001").is_dir, proc)
        start = time.monotonic()
        _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr.decode()
    return time.monotonic() - start


@contextlib.contextmanager
def _ended(proc: subprocess.Popen):
    """Never leave a run behind, whatever the test does."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _killed_and_resumed(data: Path, out: Path, during_save: bool, delay: float) -> list[str]:
    """Start a run, SIGKILL it once its first checkpoint exists (as soon as a save is under way when
    `during_save`, else `delay` seconds later), then `--resume` it to the end; returns the save temporaries the
    kill left behind."""
    proc = subprocess.Popen(_cli(data, out), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with _ended(proc):
        assert _wait_for((out / "checkpoints" / "step-0000001").is_dir, proc), "the run ended before its first save"
        if during_save:
            _wait_for(lambda: bool(_save_temps(out)), proc)
        else:
            time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
    left = _save_temps(out)
    if proc.returncode != 0:  # (a late kill may find the run finished)
        resumed = subprocess.run(_cli(data, out, "--resume"), env=_env(), capture_output=True, text=True,
                                 timeout=300)
        assert resumed.returncode == 0, resumed.stderr
    return left


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_gives_the_uninterrupted_model_bit_for_bit(prepared, tmp_path):
    window = _reference(prepared, tmp_path / "reference")
    want = (tmp_path / "reference" / "model.safetensors").read_bytes()
    rng = random.Random(SEED)
    plans = [(tmp_path / f"killed-{i}", i % 3 == 0, rng.uniform(0.0, window)) for i in range(KILLS)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        left = list(pool.map(lambda plan: _killed_and_resumed(prepared, *plan), plans))
    for out, during_save, delay in plans:
        what = f"{out.name} (killed {'during a save' if during_save else f'{delay:.2f} s after the first save'})"
        assert (out / "model.safetensors").read_bytes() == want, f"{what}: the model differs from the reference"
        assert _save_temps(out) == [], f"{what}: temporary folders of lost saves remain after the resume"
        assert _metrics(out) == _metrics(tmp_path / "reference"), f"{what}: metrics.csv lost or repeated rows"
    # the kills during saves did interrupt saves: the test covered the temporary folders it says it covers
    assert any(temps for temps in left), "no kill landed during a checkpoint save"


@pytest.mark.slow
def test_ctrl_c_saves_a_resumable_checkpoint_and_exits_130(prepared, tmp_path, capsys):
    from llmscratch.runs import latest_checkpoint, step_of

    out = tmp_path / "run"
    endless = ["--train.max_steps", 100_000, "--train.eval_every", 1, "--train.save_every", 100_000]
    proc = subprocess.Popen(_cli(prepared, out, *endless), env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    with _ended(proc):
        for line in proc.stdout:  # the loop has started once it printed its first evaluation
            if line.startswith("step "):
                break
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr, stderr
    ckpt = latest_checkpoint(out)
    assert ckpt is not None, "no resumable checkpoint after Ctrl-C"
    step = step_of(ckpt)
    code, stdout, err = run(["pretrain", "--data", prepared, "--out", out, "--resume", *TRAIN,
                             "--train.max_steps", step + 1], capsys)
    assert code == 0, err
    assert f"stopped at step {step + 1}" in stdout


FOUR_STEPS = [*TRAIN, "--train.max_steps", 4, "--train.save_every", 2]


def test_disk_full_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(prepared, tmp_path, capsys,
                                                                             monkeypatch):
    """The second weights file written (step 4's checkpoint) hits a full disk half-way: the error says so in one
    line, step 2's checkpoint is untouched and loads, and the run resumes from it once there is room."""
    import safetensors.torch
    import torch

    from llmscratch import load
    from llmscratch.runs import latest_checkpoint, step_of

    out, real_save, seen = tmp_path / "run", safetensors.torch.save_file, {}

    def save_file(tensors, filename, metadata=None):
        seen["calls"] = seen.get("calls", 0) + 1
        if seen["calls"] == 2:
            seen["previous"] = latest_checkpoint(out)
            seen["files"] = snapshot(seen["previous"])
            Path(filename).write_bytes(b"\0" * 4096)  # what fitted before the disk filled up
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))
        return real_save(tensors, filename, metadata=metadata)

    # save_model imports save_file when it runs, so the module attribute is what every checkpoint save calls
    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    code, _, err = run(["pretrain", "--data", prepared, "--out", out, *FOUR_STEPS], capsys)
    assert_user_error(code, err, "No space left on device")
    previous = seen["previous"]
    assert previous is not None and step_of(previous) == 2
    assert_same_files(seen["files"], snapshot(previous))
    load(previous)
    torch.load(previous / "train_state.pt", map_location="cpu", weights_only=True)
    monkeypatch.undo()  # room again
    code, stdout, err = run(["pretrain", "--data", prepared, "--out", out, "--resume", *FOUR_STEPS], capsys)
    assert code == 0, err
    assert "stopped at step 4" in stdout and _save_temps(out) == []


@contextlib.contextmanager
def _tmpfs(folder: Path, options: str):
    """A tmpfs mounted at `folder` for the body (unmounted after); skips the test where mounting is not allowed."""
    folder.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no `mount` command to make a small file system with")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root and CAP_SYS_ADMIN): {done.stderr.strip() or done.returncode}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], capture_output=True)


def test_a_real_full_disk_during_a_save_keeps_the_earlier_checkpoint(prepared, tmp_path, capsys):
    """A 3 MiB tmpfs holds one checkpoint of this run (~1.5 MB: weights and AdamW state) but not every one."""
    import torch

    from llmscratch import load
    from llmscratch.runs import latest_checkpoint

    with _tmpfs(tmp_path / "small-disk", "size=3m") as disk:
        out = disk / "run"
        code, _, err = run(["pretrain", "--data", prepared, "--out", out, *TRAIN, "--train.max_steps", 20,
                            "--train.keep_last", 0], capsys)
        assert_user_error(code, err, "No space left on device")
        ckpt = latest_checkpoint(out)
        assert ckpt is not None, "the checkpoint saved before the disk filled up is gone"
        load(ckpt)
        torch.load(ckpt / "train_state.pt", map_location="cpu", weights_only=True)


@pytest.mark.parametrize("verb", ["tokenizer", "pretrain"])
def test_a_read_only_file_system_is_one_line_naming_out(verb, prepared, tiny_corpus, tmp_path, capsys):
    """An unwritable --out that root cannot write either (chmod does not stop root): a read-only mount."""
    with _tmpfs(tmp_path / "read-only", "ro,size=1m") as disk:
        argv = (["tokenizer", "train", "--data", tiny_corpus, "--vocab-size", 300]
                if verb == "tokenizer" else ["pretrain", "--data", prepared, *TRAIN])
        code, _, err = run([*argv, "--out", disk / "out"], capsys)
        assert_user_error(code, err, "--out")
        assert list(disk.iterdir()) == []
