"""The `llmscratch` CLI end to end on tiny settings, and each user mistake → one line on stderr, exit 2."""

import subprocess
import sys
from pathlib import Path

import pytest
from clitools import assert_user_error, run

FAST = ["--model", "gpt-micro", "--train.max_steps", "6", "--train.batch_size", "2", "--train.eval_every", "3",
        "--train.eval_batches", "1", "--train.save_every", "3", "--train.warmup_steps", "2",
        "--context-length", "32", "--no-progress"]


def test_pipeline_end_to_end(tiny_corpus, tmp_path, capsys):
    tok, data, run_dir = tmp_path / "tok", tmp_path / "data", tmp_path / "run"
    code, out, err = run(["tokenizer", "train", "--data", tiny_corpus, "--vocab-size", 300, "--out", tok], capsys)
    assert code == 0, err
    assert (tok / "tokenizer.json").is_file()
    code, out, err = run(["prepare", "--data", tiny_corpus, "--tokenizer", tok, "--out", data], capsys)
    assert code == 0, err
    assert {p.name for p in data.iterdir()} >= {"train.bin", "val.bin", "meta.json", "tokenizer.json"}
    code, out, err = run(["pretrain", "--data", data, "--out", run_dir, *FAST], capsys)
    assert code == 0, err
    assert "stopped at step 6" in out
    for name in ("model.safetensors", "config.json", "tokenizer.json", "metrics.csv", "loss.png",
                 "hyperparameters.yaml"):
        assert (run_dir / name).is_file(), name
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-0000003", "step-0000006"]
    code, out, err = run(["generate", run_dir, "--prompt", "The module", "--max-new-tokens", 8, "--seed", 1],
                         capsys)
    assert code == 0, err
    assert out.startswith("The module") and len(out.strip()) > len("The module")
    code, out2, err = run(["generate", run_dir, "--prompt", "The module", "--max-new-tokens", 8, "--seed", 1,
                           "--stream"], capsys)
    assert code == 0 and out2 == out  # streaming prints the same text
    code, out, err = run(["info", run_dir], capsys)
    assert code == 0 and "parameters" in out and "FLOPs/token" in out


def test_pretrain_from_corpus_with_config_file_and_resume(tiny_corpus, tmp_path, capsys):
    tok = tmp_path / "tok"
    assert run(["tokenizer", "train", "--data", tiny_corpus, "--vocab-size", 300, "--out", tok], capsys)[0] == 0
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: gpt-micro\ncontext_length: 32\ntrain:\n  max_steps: 4\n  batch_size: 2\n"
                   "  eval_every: 2\n  eval_batches: 1\n  save_every: 2\n")
    run_dir = tmp_path / "run"
    code, out, err = run(["pretrain", "--config", cfg, "--data", tiny_corpus, "--tokenizer", tok,
                          "--out", run_dir, "--no-progress"], capsys)
    assert code == 0, err
    assert (run_dir / "data" / "train.bin").is_file()
    code, out, err = run(["pretrain", "--config", cfg, "--out", run_dir, "--resume", "--train.max_steps", 6,
                          "--no-progress"], capsys)
    assert code == 0, err
    assert "stopped at step 6" in out


def test_console_script_help_and_error_exit_code(tmp_path):
    exe = Path(sys.executable).parent / "llmscratch"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "llmscratch.cli"]
    proc = subprocess.run(cmd + ["--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "quickstart" in proc.stdout and "pretrain" in proc.stdout
    proc = subprocess.run(cmd + ["generate", str(tmp_path / "nope"), "--prompt", "x"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "not found" in proc.stderr


@pytest.mark.parametrize("argv", [["--help"], ["pretrain", "--help"], ["generate", "ckpt", "--no-such-option"],
                                  ["--version"], ["finetune", "classify", "--help"], ["finetune", "instruct", "--help"],
                                  ["finetune", "dpo", "--help"], ["finetune", "classify", "ckpt", "--no-such-option"]])
def test_help_and_mistakes_answer_without_importing_torch(argv):
    """Building the parser must not import PyTorch (~2 s): `--help` and a wrong option answer at once. The
    fine-tuning verbs' defaults live in torch-free modules for this (finetune/defaults.py, lora_settings.py)."""
    probe = ("import sys\nfrom llmscratch.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n"
             "    pass\nsys.stderr.write('torch imported: %s\\n' % ('torch' in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, timeout=60)
    assert "torch imported: False" in proc.stderr, proc.stderr


def test_package_names_stay_functions_after_their_submodules_are_imported():
    """`llmscratch.generate` (a function re-exported lazily) must not be replaced by the submodule it lives in."""
    probe = ("import llmscratch\nfrom llmscratch.generate import generate_ids\nfrom llmscratch import generate\n"
             "assert callable(llmscratch.generate) and llmscratch.generate is generate, llmscratch.generate\n"
             "assert llmscratch.load.__module__ == 'llmscratch.checkpoint'\nprint('ok')\n")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "ok", proc.stderr


# --- user mistakes ----------------------------------------------------------------------------------------
def test_missing_data_file(tmp_path, capsys):
    code, _, err = run(["tokenizer", "train", "--data", tmp_path / "missing.txt", "--out", tmp_path / "t"], capsys)
    assert_user_error(code, err, "missing.txt")
    assert not (tmp_path / "t").exists()


def test_unknown_preset(prepared, tmp_path, capsys):
    code, _, err = run(["pretrain", "--data", prepared, "--model", "gpt-huge", "--out", tmp_path / "r"], capsys)
    assert_user_error(code, err, "gpt-huge", "gpt2-124m", "gpt-micro")
    assert not (tmp_path / "r").exists()


def test_info_unknown_target(capsys):
    assert_user_error(*run(["info", "gpt-huge"], capsys)[::2], "gpt-huge")


def test_bad_yaml_key(prepared, tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("train:\n  learning_rate: 0.1\n")
    code, _, err = run(["pretrain", "--config", cfg, "--data", prepared, "--out", tmp_path / "r"], capsys)
    assert_user_error(code, err, "learning_rate")
    assert not (tmp_path / "r").exists()


def test_unknown_option(capsys):
    code, _, err = run(["generate", "x", "--prompt", "a", "--temprature", "1"], capsys)
    assert_user_error(code, err, "--temprature")


def test_corpus_too_small(tmp_path, prepared, capsys):
    small = tmp_path / "small.txt"
    small.write_text("just a few words here")
    code, _, err = run(["pretrain", "--data", small, "--tokenizer", prepared, "--out", tmp_path / "r", *FAST],
                       capsys)
    assert_user_error(code, err, "tokens")
    assert not (tmp_path / "r").exists()  # nothing half-written


def test_unwritable_out(prepared, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run(["pretrain", "--data", prepared, "--out", blocker / "run", *FAST], capsys)
    assert_user_error(code, err, "--out")


@pytest.mark.skipif(sys.platform == "win32" or __import__("os").geteuid() == 0,
                    reason="root ignores directory permissions")
def test_read_only_out(prepared, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    code, _, err = run(["pretrain", "--data", prepared, "--out", ro / "run", *FAST], capsys)
    assert_user_error(code, err, "not writable")


def test_resume_without_run(tmp_path, prepared, capsys):
    code, _, err = run(["pretrain", "--data", prepared, "--out", tmp_path / "r", "--resume", *FAST], capsys)
    assert_user_error(code, err, "--resume")


def test_generate_missing_checkpoint_and_truncated_weights(prepared, tmp_path, capsys):
    assert_user_error(*run(["generate", tmp_path / "nope", "--prompt", "x"], capsys)[::2], "not found")
    run_dir = tmp_path / "run"
    assert run(["pretrain", "--data", prepared, "--out", run_dir, *FAST], capsys)[0] == 0
    weights = run_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    code, _, err = run(["generate", run_dir, "--prompt", "x"], capsys)
    assert_user_error(code, err, "model.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_generate_compile_prints_what_the_default_path_does(prepared, tmp_path, capsys, dtype):
    """`generate --compile` (on a CPU: one compiled block graph around the packed linears) against the default packed
    eager path, greedy, on random weights drawn wide (std 0.3) so that every token depends on the context:
    a wrong mask or position in the compiled step changes the text."""
    import torch

    from llmscratch import GPT, ModelConfig
    from llmscratch.checkpoint import save_model
    from llmscratch.tokenizer import load_tokenizer

    tok = load_tokenizer(prepared.parent / "tok")
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset("gpt-micro", vocab_size=tok.vocab_size, init_std=0.3))
    folder = save_model(tmp_path / "random", model, tok)
    ask = ["generate", folder, "--prompt", "The module", "--max-new-tokens", 24, "--temperature", 0,
           "--dtype", dtype]
    code, eager, err = run(ask, capsys)
    assert code == 0, err
    code, compiled, err = run([*ask, "--compile"], capsys)
    assert code == 0, err
    assert compiled == eager and len(eager.strip()) > len("The module")
    assert "compiling the decoding step" in err  # the wait before the first token is announced


def test_generate_rejects_compile_without_the_kv_cache(tmp_path, capsys):
    """`--compile` compiles the cached step; with `--no-kv-cache` it would be silently ignored."""
    code, _, err = run(["generate", tmp_path / "unused", "--prompt", "x", "--compile", "--no-kv-cache"], capsys)
    assert_user_error(code, err, "--no-kv-cache")


def test_quickstart_rejects_bad_minutes(tmp_path, capsys):
    code, _, err = run(["quickstart", "--minutes", "0", "--out", tmp_path / "q"], capsys)
    assert_user_error(code, err, "--minutes")


def test_quickstart_end_to_end_small(tmp_path, capsys):
    """The main job on tiny settings: tokenizer, token files, a short run, samples and the loss report."""
    out = tmp_path / "qs"
    code, stdout, err = run(["quickstart", "--minutes", "0.05", "--vocab-size", 300, "--model", "gpt-micro",
                             "--out", out, "--no-progress"], capsys)
    assert code == 0, err
    for name in ("model.safetensors", "config.json", "tokenizer.json", "metrics.csv", "loss.png"):
        assert (out / name).is_file(), name
    assert (out / "tokenizer" / "tokenizer.json").is_file() and (out / "data" / "train.bin").is_file()
    assert "sample before training" in stdout and "sample after training" in stdout
    assert "unigram cross-entropy" in stdout and "next, try:" in stdout
    assert "model: gpt-micro" in stdout and "chosen with --model" in stdout  # the output says why
    # a second run into the same folder needs --overwrite, and nothing is lost without it
    weights = (out / "model.safetensors").read_bytes()
    code, _, err = run(["quickstart", "--minutes", "0.05", "--out", out], capsys)
    assert_user_error(code, err, "--overwrite")
    assert (out / "model.safetensors").read_bytes() == weights
    # with it, the run's files are replaced and a file the quickstart did not write stays as it was
    (out / "notes.txt").write_text("mine")
    code, stdout, err = run(["quickstart", "--minutes", "0.05", "--vocab-size", 300, "--model", "gpt-micro",
                             "--out", out, "--no-progress", "--overwrite"], capsys)
    assert code == 0, err
    assert (out / "notes.txt").read_text() == "mine" and (out / "model.safetensors").is_file()


def test_wrong_type_names_the_option_and_value(capsys):
    code, _, err = run(["quickstart", "--minutes", "abc"], capsys)
    assert_user_error(code, err, "minutes", "abc", "llmscratch quickstart --help")


# --- the parser and its defaults -----------------------------------------------------------------------------
@pytest.mark.parametrize("verb", ["instruct", "classify", "dpo"])
def test_finetune_defaults_come_from_the_stage_defaults(verb):
    """The fine-tuning verbs' defaults, `--train.*` included, are those of finetune/defaults.py, which the Python
    API reads too; the full parser (no argv) holds every verb's options."""
    import dataclasses

    from llmscratch.cli import build_parser
    from llmscratch.finetune import defaults

    stage, train = {"instruct": (defaults.INSTRUCT, defaults.instruct_train_config()),
                    "classify": (defaults.CLASSIFY, defaults.classify_train_config()),
                    "dpo": (defaults.DPO, defaults.dpo_train_config())}[verb]
    args = build_parser().parse_args(["finetune", verb, "ckpt", "--data", "d", "--out", "o"])
    options = getattr(args.finetune, verb)
    for field in dataclasses.fields(stage):
        assert getattr(options, field.name) == getattr(stage, field.name), field.name
    options = {k: v for k, v in vars(options.train).items() if not k.startswith("__")}
    assert options and options == {k: v for k, v in dataclasses.asdict(train).items() if k in options}


@pytest.mark.parametrize("preset, architecture", [("gpt-micro", "GPT2LMHeadModel"), ("llama-micro", "LlamaForCausalLM"),
                                                  ("qwen3-micro", "Qwen3ForCausalLM")])
def test_convert_to_hf_names_the_class_that_loads_the_export(preset, architecture, tmp_path, capsys):
    """`convert to-hf` of a Llama or Qwen3 checkpoint must not send its user to GPT2LMHeadModel."""
    from llmscratch import GPT, ModelConfig
    from llmscratch.checkpoint import save_model

    save_model(tmp_path / "ours", GPT(ModelConfig.from_preset(preset, n_layers=1, d_model=32, n_heads=2)))
    code, out, err = run(["convert", "to-hf", tmp_path / "ours", tmp_path / "hf"], capsys)
    assert code == 0, err
    assert f"transformers.{architecture}.from_pretrained" in out and "AutoModelForCausalLM" in out
    assert ("GPT2LMHeadModel" in out) == (architecture == "GPT2LMHeadModel")
