"""Data-parallel training under torchrun (CPU, gloo, 2 processes): the same losses as one process given the same
global batch, resumable across process counts, each rank on its own rows of every batch."""

from __future__ import annotations

import csv
import importlib.util
import os
import shutil
import subprocess
import sys

import pytest
import torch

from llmscratch.errors import UserError
from llmscratch.train import distributed
from llmscratch.train.distributed import Ranks

STEPS = ["--model", "gpt-micro", "--train.max_steps", 6, "--train.batch_size", 4, "--train.eval_every", 3,
         "--train.eval_batches", 2, "--train.log_every", 1, "--train.save_every", 3, "--train.keep_last", 2,
         "--train.warmup_steps", 1, "--train.seed", 5, "--no-progress",
         # fp32: the runs are compared to 2e-5, which bf16 autocast (`auto` on a CPU with AVX512-BF16) does not hold
         "--train.precision", "fp32"]


def _pretrain(nproc: int, out, data, *extra) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    argv = [*launcher, "-m", "llmscratch", "pretrain", "--data", str(data), "--out", str(out),
            *map(str, [*STEPS, *extra])]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    r = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, _why(r.stderr)
    return r


def _why(stderr: str) -> str:
    """What failed in a torchrun's output: its error lines (rank 0's traceback ends in one), then its tail."""
    errors = [line for line in stderr.splitlines() if "Error" in line or "error:" in line]
    return "\n".join(errors[:20]) + "\n...\n" + stderr[-1500:]


def _losses(run) -> list[tuple[str, str, float, float | None]]:
    with open(run / "metrics.csv", newline="") as f:
        return [(r["kind"], r["step"], float(r["train_loss"]), float(r["val_loss"]) if r["val_loss"] else None)
                for r in csv.DictReader(f)]


def _assert_same_run(a, b) -> None:
    la, lb = _losses(a), _losses(b)
    assert [r[:2] for r in la] == [r[:2] for r in lb]
    for ra, rb in zip(la, lb):
        assert ra[2] == pytest.approx(rb[2], abs=2e-4), (ra, rb)
        assert (ra[3] is None) == (rb[3] is None) and (ra[3] is None or ra[3] == pytest.approx(rb[3], abs=2e-4))
    from safetensors.torch import load_file

    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=2e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def single_runs(prepared, tmp_path_factory):
    """One-process reference runs, by gradient accumulation (made on first use)."""
    made = {}

    def get(accum: int):
        if accum not in made:
            made[accum] = tmp_path_factory.mktemp("ddp") / f"one-{accum}"
            _pretrain(1, made[accum], prepared, "--train.grad_accum", accum)
        return made[accum]
    return get


@pytest.mark.slow
@pytest.mark.parametrize("strategy, accum", [("ddp", 1), ("fsdp", 1), ("ddp", 2), ("fsdp", 2)])
def test_two_processes_train_as_one_with_the_same_global_batch(prepared, single_runs, tmp_path, strategy, accum):
    out = tmp_path / "two"
    r = _pretrain(2, out, prepared, "--train.strategy", strategy, "--train.grad_accum", accum)
    _assert_same_run(single_runs(accum), out)
    assert r.stdout.count("stopped at step 6") == 1  # rank 0 alone prints and writes
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000003", "step-0000006"]


@pytest.mark.slow
@pytest.mark.parametrize("first, then, strategy, resumed_with", [
    (2, 1, "ddp", "ddp"), (1, 2, "fsdp", "fsdp"),  # whole checkpoints
    (2, 1, "fsdp", "ddp"), (2, 2, "fsdp", "fsdp"), (2, 2, "fsdp", "ddp")])  # sharded ones (FSDP2 on 2 processes)
def test_a_checkpoint_resumes_on_another_number_of_processes(prepared, single_runs, tmp_path, first, then,
                                                              strategy, resumed_with):
    out = tmp_path / "run"
    _pretrain(first, out, prepared, "--train.strategy", strategy)
    step3 = out / "checkpoints" / "step-0000003"
    sharded = first > 1 and strategy == "fsdp"
    assert (step3 / "sharded").is_dir() == sharded and (step3 / "model.safetensors").exists() != sharded
    if sharded:  # each process wrote its own piece of every tensor: two files, about half the state each
        shards = sorted((step3 / "sharded").glob("*.safetensors"))
        assert len(shards) == 2 and abs(shards[0].stat().st_size - shards[1].stat().st_size) < \
            0.2 * shards[0].stat().st_size
    shutil.rmtree(out / "checkpoints" / "step-0000006")  # as if stopped after step 3
    _pretrain(then, out, prepared, "--resume", "--train.strategy", resumed_with)
    _assert_same_run(single_runs(1), out)


@pytest.mark.slow
def test_a_sharded_checkpoint_loads_in_one_process_and_converts_to_a_whole_folder(prepared, single_runs, tmp_path,
                                                                                  capsys):
    """A step folder of an FSDP2 run holds shards; `checkpoint.load` reads them in one process, equal to the
    whole weights one process saved at that step, and `convert from-sharded` writes an ordinary folder."""
    from clitools import assert_user_error, run
    from safetensors.torch import load_file

    from llmscratch.checkpoint import load_model, model_state

    out = tmp_path / "run"
    _pretrain(2, out, prepared, "--train.strategy", "fsdp")
    step3, ref = out / "checkpoints" / "step-0000003", single_runs(1) / "checkpoints" / "step-0000003"
    whole = load_file(ref / "model.safetensors")
    loaded = model_state(load_model(step3))
    assert loaded.keys() == whole.keys()
    for k in whole:
        torch.testing.assert_close(loaded[k], whole[k], atol=2e-5, rtol=1e-4)
    code, _, err = run(["convert", "from-sharded", step3, tmp_path / "whole"], capsys)
    assert code == 0, err
    exported = load_file(tmp_path / "whole" / "model.safetensors")
    assert all(torch.equal(exported[k], loaded[k]) for k in whole)
    assert (tmp_path / "whole" / "config.json").is_file() and not (tmp_path / "whole" / "sharded").exists()
    shard = next((step3 / "sharded").glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:100])  # a truncated shard: one line naming the folder
    code, _, err = run(["convert", "from-sharded", step3, tmp_path / "again"], capsys)
    assert_user_error(code, err, "sharded")
    assert not (tmp_path / "again").exists()


def test_each_rank_gets_its_own_rows_of_every_batch():
    x = torch.arange(8 * 3).view(8, 3)
    batch = (x, {"y": x + 100})
    parts = [distributed.shard(batch, Ranks(rank, 4, rank)) for rank in range(4)]
    rows = torch.cat([p[0] for p in parts])
    assert torch.equal(rows, x)  # together the whole global batch, each row exactly once
    assert all(torch.equal(p[1]["y"], p[0] + 100) for p in parts)  # every tensor of a batch cut the same way
    assert distributed.shard(batch, Ranks()) is batch
    with pytest.raises(UserError, match="--train.batch_size 8: .*multiple of 3"):
        distributed.shard(x, Ranks(0, 3, 0))


def test_global_batch_rules():
    distributed.check_global_batch(0, Ranks())  # one process: the automatic size is fine
    with pytest.raises(UserError, match="--train.batch_size 0"):
        distributed.check_global_batch(0, Ranks(0, 2, 0))
    with pytest.raises(UserError, match="multiple of 2"):
        distributed.check_global_batch(5, Ranks(1, 2, 1))


def test_ranks_from_torchrun_environment(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.ranks() == Ranks() and distributed.ranks().main and not distributed.ranks().active
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    r = distributed.ranks()
    assert (r.rank, r.world, r.local_rank, r.main, r.active) == (3, 4, 1, False, True)


HANG = """
import sys, time
import torch
from llmscratch.errors import UserError
from llmscratch.train import distributed
r, _ = distributed.setup("cpu")
try:
    with distributed.peers_answer(r):
        if r.rank == 1:
            time.sleep(12)  # a rank that stops answering
        distributed.mean(torch.ones(1), r)
except UserError as exc:
    print(f"rank {r.rank} one line: {exc}")
    sys.exit(2)
"""


@pytest.mark.slow
def test_a_rank_that_stops_answering_ends_the_run_with_one_line(tmp_path):
    script = tmp_path / "hang.py"
    script.write_text(HANG)
    env = dict(os.environ, OMP_NUM_THREADS="1", **{distributed.TIMEOUT_ENV: "3"})
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode != 0
    line = next(x for x in r.stdout.splitlines() if x.startswith("rank 0 one line:"))
    assert "another training process stopped answering" in line and "3 s" in line


CRASH = """
import sys
from llmscratch.errors import UserError
from llmscratch.train import distributed
r, _ = distributed.setup("cpu")
def work():
    raise RuntimeError("a bug in rank 0's work")
try:
    distributed.on_main(work, r)
except UserError as exc:
    print(f"rank {r.rank} one line: {exc}")
    sys.exit(2)
"""


@pytest.mark.slow
def test_a_crash_in_rank_0s_work_stops_the_others_at_once(tmp_path):
    """Not only a UserError: any failure of what rank 0 does alone reaches the other ranks at once (one line),
    instead of leaving them waiting for the collective timeout (set to 10 minutes here: the test ends long before)."""
    script = tmp_path / "crash.py"
    script.write_text(CRASH)
    env = dict(os.environ, OMP_NUM_THREADS="1", **{distributed.TIMEOUT_ENV: "600"})
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode != 0
    assert "rank 1 one line: rank 0 failed: RuntimeError: a bug in rank 0's work" in r.stdout, r.stdout[-2000:]
    assert "a bug in rank 0's work" in r.stderr  # rank 0's own traceback


# --- the fine-tuning verbs under torchrun ---------------------------------------------------------------------
FT_STEPS = ["--train.batch_size", 4, "--train.eval_every", 2, "--train.eval_batches", 2, "--train.log_every", 1,
            "--train.save_every", 2, "--train.warmup_steps", 1, "--train.seed", 3, "--no-progress",
            "--train.precision", "fp32"]  # (as STEPS: the runs are compared closely)


def _finetune(nproc: int, verb: str, base, data, out, *extra) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    argv = [*launcher, "-m", "llmscratch", "finetune", verb, str(base), "--data", str(data), "--out", str(out),
            *map(str, [*FT_STEPS, *extra])]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    r = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, _why(r.stderr)
    return r


@pytest.fixture
def ft_base(byte_micro_checkpoint):
    """The base the fine-tuning runs start from (conftest: random gpt-micro, byte-level tokenizer)."""
    return byte_micro_checkpoint


def _files(run, checkpoints: bool = True) -> list[str]:
    """The files of a run; without those of its step checkpoints (FSDP2's hold shards, DDP's whole weights)."""
    return sorted(str(p.relative_to(run)) for p in run.rglob("*")
                  if checkpoints or p.relative_to(run).parts[0] != "checkpoints" or len(p.relative_to(run).parts) < 3)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_finetune_classify_on_two_processes_trains_as_one(ft_base, tmp_path, strategy):
    """Classification averages its loss over texts, so 2 processes with the same global batch give one
    process's losses (training and evaluation) and weights, within fp32 tolerance, and the same files — with
    DDP, and with FSDP2 (its loss calls the model's parts, run as the sharded model's forward; rank 0 evaluates
    the test split with the model gathered whole)."""
    import json
    import random

    rng = random.Random(0)
    words = {"spam": ["win", "free", "cash", "prize"], "ham": ["see", "you", "lunch", "home"]}
    rows = [(label, " ".join(rng.choice(words[label]) for _ in range(rng.randint(2, 8))))
            for label in ("spam", "ham") * 20]  # 40 texts → 28 train / 4 val / 8 test
    data = tmp_path / "texts.tsv"
    data.write_text("".join(f"{label}\t{text}\n" for label, text in rows))
    steps = ["--trainable", "all", "--max-steps", 4]
    one, two = tmp_path / "one", tmp_path / "two"
    _finetune(1, "classify", ft_base, data, one, *steps)
    r = _finetune(2, "classify", ft_base, data, two, *steps, "--train.strategy", strategy)
    _assert_same_run(one, two)
    m1, m2 = (json.loads((run / "metrics.json").read_text()) for run in (one, two))
    assert m1["splits"]["test"]["loss"] == pytest.approx(m2["splits"]["test"]["loss"], abs=1e-4)  # (gathered whole)
    assert _files(one, strategy == "ddp") == _files(two, strategy == "ddp")
    assert r.stdout.count("test confusion matrix") == 1  # rank 0 alone reports


@pytest.mark.slow
def test_finetune_instruct_on_two_processes_writes_what_one_does(ft_base, tmp_path):
    """Instruction tuning averages its loss over each rank's answer tokens, which two ranks' halves of a batch
    share unevenly: its losses are not exactly one process's. Asserted: it runs, writes the same files (the
    test-set answers by rank 0), reports once, and its losses are close to one process's (within 0.02 nats)."""
    import json

    records = [{"instruction": "Name a colour.", "input": "", "output": "blue"},
               {"instruction": "Add the numbers.", "input": "2 + 3", "output": "5"},
               {"instruction": "Say hi.", "input": "", "output": "hi there"}] * 6
    data = tmp_path / "records.jsonl"
    data.write_text("".join(json.dumps(rec) + "\n" for rec in records))
    steps = ["--prompt-style", "phi3", "--epochs", 0, "--train.max_steps", 2, "--max-new-tokens", 3]
    one, two = tmp_path / "one", tmp_path / "two"
    _finetune(1, "instruct", ft_base, data, one, *steps)
    r = _finetune(2, "instruct", ft_base, data, two, *steps)
    assert _files(one) == _files(two)
    assert r.stdout.count("stopped at step 2") == 1
    assert len(json.loads((two / "test_responses.json").read_text())) == len(
        json.loads((one / "test_responses.json").read_text()))
    la, lb = _losses(one), _losses(two)
    assert [x[:2] for x in la] == [x[:2] for x in lb]
    assert all(a[2] == pytest.approx(b[2], abs=0.02) for a, b in zip(la, lb)), (la, lb)


def test_rank_batches_split_every_global_batch_evenly():
    """Each rank's rows of a training batch together are one process's batch; a short last evaluation batch
    is filled up to a multiple of the ranks; with own_rows each rank collates its own examples only."""
    from llmscratch.finetune.stage import OwnRows, _RankBatches
    from llmscratch.train.batches import ExampleBatches

    train, val = list(range(10)), list(range(5))
    one = ExampleBatches(train, val, list, 4, seed=1)
    ranks = [_RankBatches(train, val, list, 4, 1, Ranks(k, 2, k), own_rows=True) for k in range(2)]
    for _ in range(3):
        whole = one.next("train")
        parts = [b.next("train") for b in ranks]
        assert all(isinstance(p, OwnRows) for p in parts)
        assert parts[0].batch + parts[1].batch == whole and len(parts[0].batch) == 2
    evals = [[b.next("eval_val").batch for _ in range(3)] for b in ranks]
    assert [a + b for a, b in zip(*evals)] == [[0, 1, 2, 3], [4, 0], [0, 1, 2, 3]]
    shared = _RankBatches(train, val, list, 4, 1, Ranks(0, 2, 0), own_rows=False)
    assert shared.next("train") == ExampleBatches(train, val, list, 4, seed=1).next("train")  # shard() cuts it


@pytest.mark.slow
@pytest.mark.parametrize("verb", ["instruct", "dpo"])
def test_finetune_with_lora_under_fsdp_writes_what_ddp_does(ft_base, tmp_path, verb):
    """LoRA under FSDP2 (the frozen base sharded with its adapters; for DPO the reference is the same sharded
    model with its adapters off): the run writes the adapter and the answers DDP's run writes, with close
    losses, and the adapter loads for generation."""
    import json

    from llmscratch.lora.adapter import load_merged

    if verb == "instruct":
        rows = [{"instruction": "Name a colour.", "input": "", "output": "blue"},
                {"instruction": "Say hi.", "input": "", "output": "hi there"}] * 8
    else:
        rows = [{"instruction": "Name a colour.", "input": "", "chosen": "blue", "rejected": "a cat"},
                {"instruction": "Say hi.", "input": "", "chosen": "hi there", "rejected": "no"}] * 8
    data = tmp_path / "records.jsonl"
    data.write_text("".join(json.dumps(rec) + "\n" for rec in rows))
    steps = ["--prompt-style", "phi3", "--epochs", 0, "--train.max_steps", 2, "--max-new-tokens", 3,
             "--lora-rank", 4]
    runs = {}
    for strategy in ("ddp", "fsdp"):
        runs[strategy] = tmp_path / strategy
        _finetune(2, verb, ft_base, data, runs[strategy], *steps, "--train.strategy", strategy)
    assert _files(runs["ddp"], checkpoints=False) == _files(runs["fsdp"], checkpoints=False)
    assert (runs["fsdp"] / "checkpoints" / "step-0000002" / "sharded").is_dir()
    assert (runs["fsdp"] / "adapter_config.json").is_file() and not (runs["fsdp"] / "model.safetensors").exists()
    la, lb = _losses(runs["ddp"]), _losses(runs["fsdp"])
    assert [x[:2] for x in la] == [x[:2] for x in lb]
    assert all(a[2] == pytest.approx(b[2], abs=1e-3) for a, b in zip(la, lb)), (la, lb)
    model, _ = load_merged(runs["fsdp"])
    assert model(torch.tensor([[1, 2, 3]])).shape[-1] == model.config.vocab_size


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_mixture_of_experts_trains_on_two_processes(prepared, tmp_path, strategy):
    """Experts no token was routed to on a rank have no gradient there: DDP is told to look for them
    (find_unused_parameters), FSDP2 takes them as they are; the router's load-balancing loss is logged."""
    out = tmp_path / "moe"
    _pretrain(2, out, prepared, "--model", "qwen3-moe-micro", "--train.strategy", strategy,
              "--train.max_steps", 3, "--train.save_every", 3)
    with open(out / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["kind"] == "train"]
    assert rows and all(float(r["train_aux_loss"]) >= 2.0 - 1e-4 for r in rows)  # >= k (top-2): even routing


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="torchao (the fp8 extra) is not installed")
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_fp8_trains_on_two_processes_as_on_one(prepared, tmp_path, strategy):
    """`--train.precision fp8` under torchrun: the blocks' linears are converted before DDP wraps or FSDP2 shards
    them. The scales are per tensor and each rank scales its own rows, so the run follows one process's closely
    rather than exactly."""
    one, two = tmp_path / "one", tmp_path / "two"
    _pretrain(1, one, prepared, "--train.precision", "fp8", "--train.max_steps", 4, "--train.save_every", 4)
    _pretrain(2, two, prepared, "--train.precision", "fp8", "--train.max_steps", 4, "--train.save_every", 4,
              "--train.strategy", strategy)
    assert all("precision: fp8" in (run / "hyperparameters.yaml").read_text() for run in (one, two))
    la, lb = _losses(one), _losses(two)
    assert [r[:2] for r in la] == [r[:2] for r in lb] and len(la) >= 4
    for ra, rb in zip(la, lb):
        assert rb[2] == pytest.approx(ra[2], rel=1e-2), (ra, rb)
