"""The one fine-tuning skeleton (finetune/stage.py) as every stage uses it: defaults shared by the CLI and the
Python API, the caller's TrainConfig left alone, the same result type, --overwrite on every stage, final
messages that name the files really written; and `pretrain --resume` refusing model settings that conflict."""

import dataclasses
import json

import pytest
import yaml
from clitools import assert_user_error, run

from llmscratch.finetune.defaults import DPO, INSTRUCT, instruct_train_config
from llmscratch.finetune.stage import StageResult
from llmscratch.train.config import TrainConfig

RECORDS = [
    {"instruction": "Name a colour.", "input": "", "output": "blue"},
    {"instruction": "Add the numbers.", "input": "2 + 3", "output": "5"},
    {"instruction": "Say hi.", "input": "", "output": "hi"},
    {"instruction": "Say bye.", "input": "", "output": "bye"},
] * 5
PAIRS = [{"prompt": f"Say {w}.", "chosen": w, "rejected": w[::-1] + "!"} for w in ("hi", "bye", "yes", "no")] * 5
FAST_TRAIN = dict(max_steps=2, batch_size=2, eval_every=2, eval_batches=1, warmup_steps=1, save_every=2,
                  progress=False)


@pytest.fixture
def base(byte_micro_checkpoint):
    return byte_micro_checkpoint


@pytest.fixture
def records(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return path


def hparams(folder):
    return yaml.safe_load((folder / "hyperparameters.yaml").read_text())


def test_run_instruct_from_python_trains_at_the_instruct_defaults(base, records, tmp_path):
    """Without a TrainConfig, the Python API uses the same instruct settings as the CLI (not pretraining's)."""
    from llmscratch.finetune.instruct import run_instruct

    cfg_defaults = instruct_train_config()
    result = run_instruct(base, records, tmp_path / "o", epochs=0.2, max_new_tokens=2, progress=False,
                          log=lambda s: None)
    assert isinstance(result, StageResult)
    train = hparams(tmp_path / "o")["train"]
    assert train["lr"] == cfg_defaults.lr == 1e-4 and train["warmup_steps"] == cfg_defaults.warmup_steps
    assert train["lr"] != TrainConfig().lr  # pretraining's default is 6e-4
    assert result.n_train + result.n_val + result.n_test == len(RECORDS)
    assert result.metrics["responses"] == tmp_path / "o" / "test_responses.json"
    assert "model.safetensors" in result.files and not result.adapter


def test_stages_never_change_the_callers_train_config(base, records, tmp_path):
    from llmscratch.finetune.dpo import run_dpo
    from llmscratch.finetune.instruct import run_instruct

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    cfg = TrainConfig(**FAST_TRAIN)
    before = dataclasses.asdict(cfg)
    run_instruct(base, records, tmp_path / "i", train_cfg=cfg, epochs=1.0, max_new_tokens=2, progress=False,
                 log=lambda s: None)
    assert dataclasses.asdict(cfg) == before  # epochs set the run's steps, in a copy
    r = run_dpo(base, pairs, tmp_path / "d", train_cfg=cfg, epochs=1.0, max_new_tokens=2, n_samples=1,
                progress=False, log=lambda s: None)
    assert dataclasses.asdict(cfg) == before
    assert isinstance(r, StageResult) and set(r.metrics) >= {"before", "after", "samples", "responses"}
    assert hparams(tmp_path / "d")["train"]["max_steps"] == r.train.step


def test_the_cli_defaults_are_the_python_defaults():
    import inspect

    from llmscratch.finetune.dpo import run_dpo
    from llmscratch.finetune.instruct import run_instruct

    sig = inspect.signature(run_instruct).parameters
    assert sig["epochs"].default == INSTRUCT.epochs and sig["max_new_tokens"].default == INSTRUCT.max_new_tokens
    sig = inspect.signature(run_dpo).parameters
    assert sig["beta"].default == DPO.beta and sig["n_samples"].default == DPO.samples


@pytest.mark.parametrize("stage", ["instruct", "dpo"])
def test_overwrite_replaces_a_run_and_is_required_to(stage, base, records, tmp_path, capsys):
    data = records
    if stage == "dpo":
        data = tmp_path / "pairs.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    out = tmp_path / "run"
    argv = ["finetune", stage, base, "--data", data, "--out", out, "--epochs", 0, "--train.max_steps", 2,
            "--train.batch_size", 2, "--train.eval_every", 2, "--train.eval_batches", 1, "--train.save_every", 2,
            "--train.warmup_steps", 1, "--max-new-tokens", 2, "--no-progress"]
    code, stdout, err = run(argv, capsys)
    assert code == 0, err
    # the final lines name what is really in the folder
    assert "Files in" in stdout and "model.safetensors" in stdout and "checkpoints/" in stdout
    (out / "notes.txt").write_text("mine")
    code, _, err = run(argv, capsys)
    assert_user_error(code, err, "already holds a training run", "--overwrite")
    code, _, err = run([*argv, "--train.max_steps", 4, "--overwrite"], capsys)
    assert code == 0, err
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-0000004"]  # the old run's step 2 is gone
    assert (out / "notes.txt").read_text() == "mine"  # only the run's own files are replaced
    code, _, err = run([*argv, "--resume", "--overwrite"], capsys)
    assert_user_error(code, err, "--resume and --overwrite")


def classify_argv(base, data, out) -> list:
    """A two-step `finetune classify` run (the fixtures' spam set, one evaluation)."""
    return ["finetune", "classify", base, "--data", data, "--out", out, "--max-steps", 2, "--train.eval_every", 2,
            "--train.eval_batches", 1, "--no-progress"]


@pytest.fixture
def spam(tmp_path):
    data = tmp_path / "spam.tsv"
    data.write_text("".join(f"{label}\t{text}\n" for label, text in
                            [("spam", "win free cash prize now"), ("ham", "see you at lunch today")] * 20))
    return data


def test_classify_with_lora_names_the_adapter_files_and_classifies_from_the_adapter(base, spam, tmp_path, capsys):
    out = tmp_path / "clf"
    code, stdout, err = run([*classify_argv(base, spam, out), "--lora-rank", 2, "--lora-targets", "attn"], capsys)
    assert code == 0, err
    files_line = next(line for line in stdout.splitlines() if line.startswith("files in"))
    assert "adapter.safetensors" in files_line and "labels.json" in files_line
    assert "model.safetensors" not in files_line and not (out / "model.safetensors").exists()
    code, stdout, err = run(["classify", out, "win cash now", "lunch today"], capsys)
    assert code == 0, err
    assert [line.split("\t")[0] in ("spam", "ham") for line in stdout.strip().splitlines()] == [True, True]


def test_classify_reads_labels_from_the_run_of_a_step_folder(base, spam, tmp_path, capsys):
    out = tmp_path / "clf"
    code, _, err = run([*classify_argv(base, spam, out), "--train.save_every", 2], capsys)
    assert code == 0, err
    step = out / "checkpoints" / "step-0000002"
    assert not (step / "labels.json").exists()
    code, stdout, err = run(["classify", step, "win cash now"], capsys)
    assert code == 0, err
    assert stdout.split("\t")[0] in ("spam", "ham")


def test_pretrain_resume_refuses_model_settings_that_differ_from_the_run(prepared, tmp_path, capsys):
    out = tmp_path / "run"
    fast = ["--data", prepared, "--out", out, "--train.batch_size", 2, "--train.eval_every", 2,
            "--train.eval_batches", 1, "--train.save_every", 2, "--train.warmup_steps", 1, "--no-progress"]
    code, _, err = run(["pretrain", "--model", "gpt-micro", "--context-length", 32, *fast,
                        "--train.max_steps", 2], capsys)
    assert code == 0, err
    for flag, value in (("--model", "gpt-tiny"), ("--context-length", 64), ("--dropout", 0.3)):
        code, _, err = run(["pretrain", *fast, "--train.max_steps", 4, "--resume", flag, value], capsys)
        assert_user_error(code, err, f"{flag} {value}", "a resumed run keeps its model")
    # the same settings, or none, resume
    code, stdout, err = run(["pretrain", *fast, "--train.max_steps", 4, "--resume", "--model", "gpt-micro",
                             "--context-length", 32], capsys)
    assert code == 0, err
    assert "stopped at step 4" in stdout
    # a finished run is not replaced without --overwrite
    code, _, err = run(["pretrain", "--model", "gpt-micro", "--context-length", 32, *fast,
                        "--train.max_steps", 2], capsys)
    assert_user_error(code, err, "already holds a training run")
    code, _, err = run(["pretrain", "--model", "gpt-micro", "--context-length", 32, *fast,
                        "--train.max_steps", 2, "--overwrite"], capsys)
    assert code == 0, err
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-0000002"]
