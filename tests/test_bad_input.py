"""The bad-input suite (issue 24): every verb given options out of range, files that do not fit, and output paths
that would destroy work. Each refusal must be exit code 2 with one line on stderr (no traceback) naming the flag
or file at fault, and must leave every file that was in the case's folder byte-identical, with nothing new beside
them (a refused command leaves no --out behind). The positive controls after the table show the legitimate form
of each kind of refusal working.

Each case runs in a folder of its own (`Workspace`) into which the fixtures it names are copied on first use: a
command that wrongly writes into its inputs spoils only its own copies, and one snapshot before and after covers
inputs and outputs alike. The fixtures are tiny and built once per module: a 300-token BPE and its prepared corpus
(conftest), a 4-step gpt-micro run with 2 checkpoints, checkpoint folders as `convert` writes them (no
checkpoints/), a classifier, a LoRA adapter, a Hugging Face export and small data files.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from clitools import assert_same_files, assert_user_error, run, run_quiet, snapshot, time_limit

CONTEXT = 256  # the checkpoints' context length: room for the Alpaca preamble in 300-token BPE pieces
LIMIT_S = 120  # a case that should be refused at once but starts working instead is stopped by then

PRETRAIN = ["--model", "gpt-micro", "--train.max_steps", 4, "--train.batch_size", 2, "--train.eval_every", 2,
            "--train.eval_batches", 1, "--train.save_every", 2, "--train.warmup_steps", 1, "--context-length", 32,
            "--no-progress"]
INSTRUCT = ["--epochs", 0, "--train.max_steps", 2, "--train.batch_size", 2, "--train.eval_every", 2,
            "--train.eval_batches", 1, "--train.warmup_steps", 1, "--max-new-tokens", 4, "--no-progress"]
DPO = [*INSTRUCT, "--samples", 1]
CLASSIFY = ["--max-steps", 2, "--train.batch_size", 2, "--train.eval_every", 2, "--train.eval_batches", 1,
            "--no-progress"]
RECORDS = [
    {"instruction": "Name a colour.", "input": "", "output": "blue", "family": "words"},
    {"instruction": "Add the numbers.", "input": "2 + 3", "output": "5", "family": "sums"},
    {"instruction": "Add the numbers.", "input": "4 + 4", "output": "8", "family": "sums"},
    {"instruction": "Say hi.", "input": "", "output": "hi", "family": "words"},
] * 5
PAIRS = [{"prompt": f"Say {w}.", "chosen": w, "rejected": w[::-1] + "!"} for w in ("hi", "bye", "yes", "no")] * 5
SPAM = [("spam", "win free cash prize now"), ("ham", "see you at lunch today")] * 20
JUDGE = ["--model", "judge", "--url", "http://127.0.0.1:9", "--retries", 0, "--timeout", 1, "--no-progress"]

#: fixture name → the name of its copy in a case's folder (hyphens and dots: no test id can spell them, so a
#: needle such as "base-ckpt" can only match the path of the fixture itself)
NAMES = {"corpus": "corpus.txt", "corpus_dir": "corpus-dir", "tok": "tok-300", "data": "data-300",
         "data_big": "data-400", "base": "base-ckpt", "other": "other-ckpt", "small_vocab": "small-vocab-ckpt",
         "notes": "notes-dir", "records": "records.jsonl", "prefs": "prefs.json", "csv": "spam.csv",
         "responses": "responses.json", "run": "tiny-run", "clf": "spam-clf", "adapter": "lora-adapter",
         "hf": "hf-export"}


def _ok(argv) -> None:
    code, _, err = run_quiet(argv)
    assert code == 0, f"fixture command {argv[:2]} failed: {err}"


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tiny_corpus, prepared) -> dict[str, Path]:
    """The fixtures (`NAMES`), built once: nothing writes here, cases work on copies."""
    import torch

    from llmscratch.checkpoint import save_model
    from llmscratch.config import ModelConfig
    from llmscratch.model import GPT
    from llmscratch.tokenizer import BPETokenizer, load_tokenizer
    from llmscratch.train.pretrain import prepare

    root = tmp_path_factory.mktemp("bad-input-fixtures")
    tok = load_tokenizer(prepared.parent / "tok")
    src = {"corpus": tiny_corpus, "tok": prepared.parent / "tok", "data": prepared}
    src["corpus_dir"] = root / "corpus-dir"
    src["corpus_dir"].mkdir()
    shutil.copy2(tiny_corpus, src["corpus_dir"] / "corpus.txt")
    BPETokenizer.train(tiny_corpus.read_text(), 400, progress=False).save(root / "tok-400")
    src["data_big"] = root / "data-400"
    prepare(str(tiny_corpus), load_tokenizer(root / "tok-400"), src["data_big"], progress=False)
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset("gpt-micro", vocab_size=tok.vocab_size, context_length=CONTEXT))
    src["base"] = save_model(root / "base-ckpt", model, tok, {"model": "gpt-micro"})
    src["other"] = save_model(root / "other-ckpt", model, tok, {"model": "gpt-micro"})
    small = GPT(ModelConfig.from_preset("gpt-micro", vocab_size=256, context_length=CONTEXT))  # < the tokenizer
    src["small_vocab"] = save_model(root / "small-vocab-ckpt", small, tok)
    src["notes"] = root / "notes-dir"
    src["notes"].mkdir()
    (src["notes"] / "notes.txt").write_text("my notes, not a model\n")
    src["records"] = root / "records.jsonl"
    src["records"].write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    src["prefs"] = root / "prefs.json"
    src["prefs"].write_text(json.dumps(PAIRS))
    src["csv"] = root / "spam.csv"
    src["csv"].write_text("label,text\n" + "".join(f"{label},{text}\n" for label, text in SPAM))
    src["responses"] = root / "responses.json"
    src["responses"].write_text(json.dumps([{**r, "model_response": r["output"]} for r in RECORDS[:4]]))
    src.update(_trained(root, prepared, src["base"], src["csv"], src["records"]))
    src["hf"] = root / "hf-export"
    _ok(["convert", "to-hf", src["base"], src["hf"]])
    return src


def _trained(root: Path, prepared: Path, base: Path, csv: Path, records: Path) -> dict[str, Path]:
    """The run, the classifier and the adapter, trained through the Python API (the same stages the verbs call,
    settings as in PRETRAIN, CLASSIFY, INSTRUCT): the command line itself is what the cases test."""
    import dataclasses

    from llmscratch.finetune.classify import finetune_classify
    from llmscratch.finetune.defaults import classify_train_config, instruct_train_config
    from llmscratch.finetune.instruct import run_instruct
    from llmscratch.lora_settings import LoRASettings
    from llmscratch.train.config import TrainConfig
    from llmscratch.train.pretrain import run_pretrain

    quiet = dict(batch_size=2, eval_every=2, eval_batches=1, progress=False)
    run_pretrain("gpt-micro", str(prepared), root / NAMES["run"], context_length=32, progress=False,
                 train_cfg=TrainConfig(max_steps=4, save_every=2, warmup_steps=1, **quiet))
    finetune_classify(base, str(csv), root / NAMES["clf"], max_steps=2, progress=False, log=lambda *a: None,
                      train_cfg=dataclasses.replace(classify_train_config(), **quiet))
    run_instruct(base, records, root / NAMES["adapter"], epochs=None, max_new_tokens=4, progress=False,
                 log=lambda *a: None, lora=LoRASettings(2, targets="attn"),
                 train_cfg=dataclasses.replace(instruct_train_config(), max_steps=2, warmup_steps=1, **quiet))
    return {name: root / NAMES[name] for name in ("run", "clf", "adapter")}


class Workspace:
    """A case's folder. `w.base`, `w.run`, ...: that fixture copied into the folder on first use (under its
    `NAMES` name); `w / "name"`: a path in the folder, not created."""

    def __init__(self, root: Path, sources: dict[str, Path]):
        self.root, self._sources = root, sources

    def __getattr__(self, name: str) -> Path:
        if name.startswith("_") or name not in NAMES:
            raise AttributeError(name)
        dest = self.root / NAMES[name]
        if not dest.exists():
            src = self._sources[name]
            if src.is_dir():
                shutil.copytree(src, dest, symlinks=True)
            else:
                shutil.copy2(src, dest)
        return dest

    def __truediv__(self, rel: str) -> Path:
        return self.root / rel


@pytest.fixture
def ws(sources, tmp_path_factory) -> Workspace:
    # mktemp names the folder case0, case1...: no word of a test id in the paths the needles are looked for in
    return Workspace(tmp_path_factory.mktemp("case"), sources)


# --- what the cases set up in their folder --------------------------------------------------------------------
def poison(value: float):
    """Put `value` (NaN, inf) into one weight of the case's base-ckpt, as a diverged run might have saved it."""

    def setup(w: Workspace) -> None:
        from safetensors.torch import load_file, save_file

        path = w.base / "model.safetensors"
        state = load_file(str(path))
        name = sorted(state)[len(state) // 2]
        state[name].view(-1)[0] = value
        save_file(state, str(path), metadata={"format": "pt"})

    return setup


def binary_file(name: str):
    def setup(w: Workspace) -> None:
        (w / name).write_bytes(bytes(range(256)) * 8)  # not UTF-8, not YAML

    return setup


def symlink_loop(name: str):
    def setup(w: Workspace) -> None:
        os.symlink(name, w / name)

    return setup


def folder(name: str):
    def setup(w: Workspace) -> None:
        (w / name).mkdir()

    return setup


def text_file(name: str, text: str):
    def setup(w: Workspace) -> None:
        (w / name).write_text(text)

    return setup


def read_only_folder(w: Workspace) -> None:
    (w / "read-only").mkdir(mode=0o500)


def pickled_hf(w: Workspace) -> None:
    """A Hugging Face folder whose pytorch_model.bin pickles an object that is not a tensor."""
    import datetime

    import torch

    (w / "pickled-hf").mkdir()
    shutil.copy2(w.hf / "config.json", w / "pickled-hf" / "config.json")
    torch.save({"transformer.wte.weight": datetime.date(2024, 1, 1)}, w / "pickled-hf" / "pytorch_model.bin")


def sharded_hf(w: Workspace, outside: bool) -> Path:
    """The case's hf-export split into two shards under an index; with `outside`, the index names the second
    one ../outside.safetensors (a file that exists, beside the folder)."""
    from safetensors.torch import load_file, save_file

    folder = w / "sharded-hf"
    folder.mkdir()
    for name in ("config.json", "vocab.json", "merges.txt"):
        if (w.hf / name).exists():
            shutil.copy2(w.hf / name, folder / name)
    tensors = load_file(str(w.hf / "model.safetensors"))
    names = sorted(tensors)
    halves = {"part-1.safetensors": names[: len(names) // 2],
              "../outside.safetensors" if outside else "part-2.safetensors": names[len(names) // 2:]}
    for shard, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, str(folder / shard), metadata={"format": "pt"})
    weight_map = {k: shard for shard, keys in halves.items() for k in keys}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def edit_adapter(**changes):
    def setup(w: Workspace) -> None:
        path = w.adapter / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))

    return setup


# --- the table -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    argv: Callable[[Workspace], list]
    needles: tuple  # each a string the error line must hold, or a tuple of alternatives
    setup: Callable[[Workspace], None] | None = None


def bad(case_id: str, argv, *needles, setup=None, marks=()):
    return pytest.param(Case(argv, needles, setup), id=case_id, marks=marks)


NOT_ROOT = pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions (chmod has no effect)")
NONFINITE = ("NaN", "nan", "Inf", "inf", "finite")


def generate(w, *extra):
    return ["generate", w.base, "--prompt", "The module", "--max-new-tokens", 4, *extra]


def chat(w, *extra):
    return ["chat", w.base, "--max-new-tokens", 4, *extra]


def serve(w, *extra):
    return ["serve", w.base, "--port", 0, *extra]


def pretrain(w, *extra):
    return ["pretrain", "--data", w.data, "--out", w / "new-run", *PRETRAIN, *extra]


def instruct(w, *extra, base=None, out=None, data=None):
    return ["finetune", "instruct", base or w.base, "--data", data or w.records, "--out", out or w / "tuned",
            *INSTRUCT, *extra]


def classify(w, *extra, base=None, out=None, data=None):
    return ["finetune", "classify", base or w.base, "--data", data or w.csv, "--out", out or w / "tuned", *CLASSIFY,
            *extra]


def dpo(w, *extra, base=None, out=None):
    return ["finetune", "dpo", base or w.base, "--data", w.prefs, "--out", out or w / "tuned", *DPO, *extra]


def eval_tasks(w, *extra, model=None):
    return ["eval", "tasks", model or w.base, w.records, "--prompt-style", "alpaca", "--max-new-tokens", 4,
            "--no-progress", *extra]


def quickstart(w, *extra):
    return ["quickstart", "--minutes", 0.01, "--vocab-size", 300, "--model", "gpt-micro", "--no-progress", *extra]


DESTROYS_WORK = [
    bad("instruct-out-holds-a-checkpoint", lambda w: instruct(w, out=w.other), "--overwrite"),
    bad("instruct-out-is-its-checkpoint-even-with-overwrite", lambda w: instruct(w, "--overwrite", out=w.base),
        ("--out", "base-ckpt")),
    bad("instruct-out-is-its-data-even-with-overwrite", lambda w: instruct(w, "--overwrite", out=w.records),
        ("--out", "records.jsonl")),
    bad("classify-out-holds-a-checkpoint", lambda w: classify(w, out=w.other), "--overwrite"),
    bad("dpo-out-holds-a-checkpoint", lambda w: dpo(w, out=w.other), "--overwrite"),
    bad("instruct-lora-over-full-weights-with-overwrite",
        lambda w: instruct(w, "--overwrite", "--lora-rank", 2, out=w.other), ("--out", "other-ckpt")),
    bad("classify-lora-over-full-weights-with-overwrite",
        lambda w: classify(w, "--overwrite", "--lora-rank", 2, out=w.other), ("--out", "other-ckpt")),
    bad("dpo-lora-over-full-weights-with-overwrite",
        lambda w: dpo(w, "--overwrite", "--lora-rank", 2, out=w.other), ("--out", "other-ckpt")),
    bad("pretrain-out-holds-a-run", lambda w: ["pretrain", "--data", w.data, "--out", w.run, *PRETRAIN],
        "--overwrite"),
    bad("pretrain-out-holds-other-files", lambda w: ["pretrain", "--data", w.data, "--out", w.notes, *PRETRAIN],
        "--overwrite"),
    bad("pretrain-out-holds-a-checkpoint", lambda w: ["pretrain", "--data", w.data, "--out", w.other, *PRETRAIN],
        "--overwrite"),
    bad("pretrain-out-is-its-data-even-with-overwrite",
        lambda w: ["pretrain", "--data", w.data, "--out", w.data, "--overwrite", *PRETRAIN], ("--out", "data-300")),
    bad("pretrain-resume-of-a-checkpoint-folder",
        lambda w: ["pretrain", "--data", w.data, "--out", w.other, "--resume", *PRETRAIN], "--resume"),
    bad("tokenizer-train-out-holds-a-checkpoint",
        lambda w: ["tokenizer", "train", "--data", w.corpus, "--vocab-size", 300, "--out", w.other], "--overwrite"),
    bad("tokenizer-train-out-is-its-data-even-with-overwrite",
        lambda w: ["tokenizer", "train", "--data", w.corpus_dir, "--vocab-size", 300, "--out", w.corpus_dir,
                   "--overwrite"], ("--out", "corpus-dir")),
    bad("prepare-out-holds-prepared-data",
        lambda w: ["prepare", "--data", w.corpus, "--tokenizer", w.tok, "--out", w.data], "--overwrite"),
    bad("prepare-out-is-its-tokenizer-even-with-overwrite",
        lambda w: ["prepare", "--data", w.corpus, "--tokenizer", w.tok, "--out", w.tok, "--overwrite"],
        ("--out", "tok-300")),
    bad("quickstart-out-holds-other-files", lambda w: quickstart(w, "--out", w.notes), "--overwrite"),
    bad("quickstart-out-holds-a-run", lambda w: quickstart(w, "--out", w.run), "--overwrite"),
    bad("judge-out-is-its-input", lambda w: ["eval", "judge", w.responses, *JUDGE, "--out", w.responses],
        ("--out", "responses.json")),
    bad("judge-out-exists", lambda w: ["eval", "judge", w.responses, *JUDGE, "--out", w / "scores.json"],
        "--overwrite", setup=text_file("scores.json", '{"mine": true}\n')),
    bad("eval-tasks-json-is-its-data", lambda w: eval_tasks(w, "--json", w.records), ("--json", "records.jsonl")),
    bad("synth-instruct-out-holds-files",
        lambda w: ["data", "synth-instruct", "--out", w.notes, "--n-train", 5, "--n-test", 2], "--overwrite"),
    bad("to-hf-out-holds-files", lambda w: ["convert", "to-hf", w.base, w.other], "--overwrite"),
    bad("to-hf-out-is-its-checkpoint", lambda w: ["convert", "to-hf", w.base, w.base], "base-ckpt"),
    bad("from-hf-out-holds-files", lambda w: ["convert", "from-hf", w.hf, w.other, "--tokenizer", w.tok],
        "--overwrite"),
    bad("from-hf-out-is-its-input", lambda w: ["convert", "from-hf", w.hf, w.hf, "--tokenizer", w.tok], "hf-export"),
    bad("merge-out-is-its-adapter", lambda w: ["lora", "merge", w.adapter, w.adapter], "lora-adapter"),
    bad("merge-out-is-its-base", lambda w: ["lora", "merge", w.adapter, w.base, "--base", w.base], "base-ckpt"),
    bad("merge-out-holds-files", lambda w: ["lora", "merge", w.adapter, w.other], "--overwrite"),
    bad("export-peft-out-is-its-adapter", lambda w: ["lora", "export-peft", w.adapter, w.adapter], "lora-adapter"),
    bad("export-peft-out-holds-files", lambda w: ["lora", "export-peft", w.adapter, w.notes], "--overwrite"),
    bad("download-out-holds-files", lambda w: ["download", "gpt2-124m", "--out", w.other, "--no-progress"],
        "--overwrite"),
    bad("attention-out-exists",
        lambda w: ["inspect", "attention", w.base, "--prompt", "The module", "--out", w / "old.png"], "--overwrite",
        setup=text_file("old.png", "an older picture")),
    bad("embeddings-out-exists", lambda w: ["inspect", "embeddings", w.base, "--out", w / "old.png"], "--overwrite",
        setup=text_file("old.png", "an older picture")),
]

TRACEBACKS = [
    bad("pretrain-negative-lr", lambda w: pretrain(w, "--train.lr", -1), "--train.lr"),
    bad("pretrain-lr-nan", lambda w: pretrain(w, "--train.lr", "nan"), "--train.lr"),
    bad("pretrain-save-every-0", lambda w: pretrain(w, "--train.save_every", 0), "--train.save_every"),
    bad("pretrain-log-every-0", lambda w: pretrain(w, "--train.log_every", 0), "--train.log_every"),
    bad("pretrain-data-ids-beyond-the-tokenizer",
        lambda w: ["pretrain", "--data", w.data_big, "--tokenizer", w.tok, "--out", w / "new-run", *PRETRAIN],
        ("data-400", "tok-300")),
    bad("resume-with-data-ids-beyond-the-model",
        lambda w: ["pretrain", "--data", w.data_big, "--out", w.run, "--resume", *PRETRAIN,
                   "--train.max_steps", 6], ("data-400", "tiny-run")),
    bad("generate-tokenizer-larger-than-model",
        lambda w: ["generate", w.small_vocab, "--prompt", "The module", "--max-new-tokens", 4], "small-vocab-ckpt"),
    bad("instruct-tokenizer-larger-than-model", lambda w: instruct(w, base=w.small_vocab), "small-vocab-ckpt"),
    bad("generate-negative-max-new-tokens", lambda w: generate(w, "--max-new-tokens", -5), "--max-new-tokens"),
    bad("generate-nan-weights", generate, "model.safetensors", NONFINITE, setup=poison(float("nan"))),
    bad("generate-inf-weights", generate, "model.safetensors", NONFINITE, setup=poison(float("inf"))),
    bad("chat-nan-weights", chat, "model.safetensors", NONFINITE, setup=poison(float("nan"))),
    bad("eval-tasks-nan-weights", eval_tasks, "model.safetensors", NONFINITE, setup=poison(float("nan"))),
    bad("classify-from-nan-weights", classify, "model.safetensors", NONFINITE, setup=poison(float("nan"))),
    bad("to-hf-nan-weights", lambda w: ["convert", "to-hf", w.base, w / "new-hf"], "model.safetensors", NONFINITE,
        setup=poison(float("-inf"))),
    bad("pretrain-binary-config", lambda w: pretrain(w, "--config", w / "settings.yaml"),
        ("--config", "settings.yaml"), setup=binary_file("settings.yaml")),
    bad("generate-binary-config", lambda w: generate(w, "--config", w / "settings.yaml"),
        ("--config", "settings.yaml"), setup=binary_file("settings.yaml")),
    bad("instruct-binary-config", lambda w: instruct(w, "--config", w / "settings.yaml"),
        ("--config", "settings.yaml"), setup=binary_file("settings.yaml")),
    bad("from-hf-pickled-object",
        lambda w: ["convert", "from-hf", w / "pickled-hf", w / "new-ckpt", "--tokenizer", w.tok],
        "pytorch_model.bin", setup=pickled_hf),
    bad("eval-tasks-json-is-a-folder", lambda w: eval_tasks(w, "--json", w / "scores"), "--json",
        setup=folder("scores")),
    bad("judge-out-is-a-folder", lambda w: ["eval", "judge", w.responses, *JUDGE, "--out", w / "scores"], "--out",
        setup=folder("scores")),
    bad("embeddings-out-is-a-folder", lambda w: ["inspect", "embeddings", w.base, "--out", w / "pic.png"], "--out",
        setup=folder("pic.png")),
    bad("tokenizer-train-out-is-a-file",
        lambda w: ["tokenizer", "train", "--data", w.corpus, "--vocab-size", 300, "--out", w / "file.txt"], "--out",
        setup=text_file("file.txt", "a file, not a folder\n")),
    bad("tokenizer-train-out-symlink-loop",
        lambda w: ["tokenizer", "train", "--data", w.corpus, "--vocab-size", 300, "--out", w / "loop"], "--out",
        setup=symlink_loop("loop")),
    bad("pretrain-out-symlink-loop", lambda w: ["pretrain", "--data", w.data, "--out", w / "loop", *PRETRAIN],
        "--out", setup=symlink_loop("loop")),
    bad("to-hf-out-symlink-loop", lambda w: ["convert", "to-hf", w.base, w / "loop"], "loop",
        setup=symlink_loop("loop")),
    bad("eval-tasks-json-symlink-loop", lambda w: eval_tasks(w, "--json", w / "loop.json"), "--json",
        setup=symlink_loop("loop.json")),
    bad("judge-out-symlink-loop", lambda w: ["eval", "judge", w.responses, *JUDGE, "--out", w / "loop.json"],
        "--out", setup=symlink_loop("loop.json")),
    bad("attention-out-symlink-loop",
        lambda w: ["inspect", "attention", w.base, "--prompt", "The", "--out", w / "loop.png"], "--out",
        setup=symlink_loop("loop.png")),
    bad("generate-checkpoint-symlink-loop", lambda w: ["generate", w / "loop", "--prompt", "The"], "loop",
        setup=symlink_loop("loop")),
    bad("tokenizer-train-out-in-read-only-folder",
        lambda w: ["tokenizer", "train", "--data", w.corpus, "--vocab-size", 300, "--out", w / "read-only" / "tok"],
        "--out", setup=read_only_folder, marks=NOT_ROOT),
    bad("eval-tasks-json-in-read-only-folder", lambda w: eval_tasks(w, "--json", w / "read-only" / "s.json"),
        "--json", setup=read_only_folder, marks=NOT_ROOT),
    bad("attention-out-in-read-only-folder",
        lambda w: ["inspect", "attention", w.base, "--prompt", "The", "--out", w / "read-only" / "a.png"], "--out",
        setup=read_only_folder, marks=NOT_ROOT),
]

SAMPLING = [  # (flag, value): out of range for generate, chat (and serve's own limits below)
    ("--temperature", -1), ("--temperature", "nan"), ("--top-k", -1), ("--top-p", 0), ("--top-p", 1.5),
    ("--top-p", -0.5), ("--max-new-tokens", 0), ("--max-new-tokens", CONTEXT * 20),
]
PRETRAIN_OPTIONS = [
    ("--train.grad_accum", 0), ("--train.eval_every", -1), ("--train.eval_every", 0), ("--train.warmup_steps", -1),
    ("--train.max_steps", 0), ("--train.batch_size", -1), ("--train.eval_batches", 0), ("--train.keep_last", -1),
    ("--train.min_lr_ratio", 1.5), ("--train.beta1", -0.1), ("--train.beta2", 1), ("--train.grad_clip", -1),
    ("--train.weight_decay", -0.1), ("--train.sample_every", -1), ("--train.max_minutes", 0),
    ("--train.precision", "fp4"), ("--train.device", "tpu"), ("--context-length", 0), ("--context-length", -8),
    ("--dropout", 1.5), ("--dropout", -0.1),
]
INSTRUCT_OPTIONS = [
    ("--max-length", 0), ("--epochs", -1), ("--val-fraction", 1.5), ("--test-fraction", -0.1),
    ("--max-new-tokens", 0), ("--prompt-style", "nope"), ("--lora-rank", 0), ("--lora-rank", -2),
    ("--lora-dropout", 1.5), ("--train.grad_accum", 0), ("--train.lr", -1),
]
CLASSIFY_OPTIONS = [
    ("--max-steps", 0), ("--max-steps", -3), ("--max-length", 0), ("--epochs", -1), ("--trainable", "nope"),
    ("--train.eval_every", 0), ("--train.warmup_steps", -1),
]
DPO_OPTIONS = [
    ("--beta", 0), ("--beta", -0.1), ("--label-smoothing", 0.5), ("--label-smoothing", -0.1), ("--samples", -1),
    ("--max-length", 0), ("--max-new-tokens", 0),
]
SERVE_OPTIONS = [
    ("--max-batch", 0), ("--max-queue", -1), ("--prefill-tokens", 0), ("--max-prompt-tokens", 0),
    ("--max-tokens-cap", 0), ("--max-tokens-cap", CONTEXT * 20), ("--request-timeout", 0), ("--port", 70000),
    ("--dtype", "fp8"), ("--prefix-cache-rows", -1),
]


def _value_id(value) -> str:
    return str(value).replace("-", "minus").replace(".", "_")


def option_cases(verb: str, build, options) -> list:
    """One case per (flag, value): `build(w, flag, value)` refused with a line naming the flag."""
    return [bad(f"{verb}{flag}-{_value_id(value)}", lambda w, f=flag, v=value: build(w, f, v), flag)
            for flag, value in options]


SILENT_NONSENSE = [
    *option_cases("generate", generate, SAMPLING),
    *option_cases("chat", chat, SAMPLING),
    *option_cases("serve", serve, SERVE_OPTIONS),
    *option_cases("pretrain", pretrain, PRETRAIN_OPTIONS),
    *option_cases("instruct", instruct, INSTRUCT_OPTIONS),
    *option_cases("classify", classify, CLASSIFY_OPTIONS),
    *option_cases("dpo", dpo, DPO_OPTIONS),
    *option_cases("eval-tasks", eval_tasks, [("--max-new-tokens", 0), ("--max-new-tokens", CONTEXT * 20),
                                             ("--batch-size", 0), ("--limit", -1), ("--dtype", "fp8"),
                                             ("--prompt-style", "nope")]),
    *option_cases("judge", lambda w, *x: ["eval", "judge", w.responses, *JUDGE, *x],
                  [("--timeout", 0), ("--retries", -1)]),
    *option_cases("info", lambda w, *x: ["info", w.base, *x], [("--batch-size", -1), ("--batch-size", 0)]),
    *option_cases("prepare", lambda w, *x: ["prepare", "--data", w.corpus, "--tokenizer", w.tok, "--out",
                                            w / "prepared", *x], [("--val-fraction", 1.5), ("--val-fraction", -0.1)]),
    *option_cases("tokenizer-train", lambda w, *x: ["tokenizer", "train", "--data", w.corpus, "--out", w / "tok",
                                                    *x], [("--vocab-size", 100), ("--vocab-size", -1)]),
    *option_cases("synth-instruct", lambda w, *x: ["data", "synth-instruct", "--out", w / "synth", "--n-train", 5,
                                                   "--n-test", 2, *x],
                  [("--n-train", -1), ("--n-test", -1), ("--families", "nope"), ("--format", "xml")]),
    *option_cases("attention", lambda w, *x: ["inspect", "attention", w.base, "--prompt", "The module", "--out",
                                              w / "a.png", *x], [("--layers", 99), ("--heads", 99)]),
    *option_cases("embeddings", lambda w, *x: ["inspect", "embeddings", w.base, "--out", w / "e.png", *x],
                  [("--n", 1), ("--n", -5)]),
    *option_cases("from-hf", lambda w, *x: ["convert", "from-hf", w.hf, w / "new-ckpt", "--tokenizer", w.tok, *x],
                  [("--dtype", "fp8")]),
    *option_cases("download", lambda w, *x: ["download", "gpt2-124m", "--out", w / "dl", "--no-progress", *x],
                  [("--dtype", "fp8"), ("--source", "nope")]),
    *option_cases("quickstart", lambda w, *x: quickstart(w, "--out", w / "qs", *x),
                  [("--minutes", -1), ("--vocab-size", 100), ("--model", "gpt-huge"), ("--device", "tpu")]),
    *option_cases("generate", generate, [("--device", "tpu"), ("--dtype", "fp8")]),
    bad("instruct-lora-targets-unknown", lambda w: instruct(w, "--lora-rank", 2, "--lora-targets", "nope"),
        "--lora-targets"),
    bad("doctor-binary-config", lambda w: ["doctor", "--config", w / "settings.yaml"], ("--config", "settings.yaml"),
        setup=binary_file("settings.yaml")),
    bad("download-unknown-model", lambda w: ["download", "gpt-huge", "--out", w / "dl"], "gpt-huge"),
    # a classifier given to a generative verb, and the reverse
    bad("generate-with-a-classifier", lambda w: ["generate", w.clf, "--prompt", "The"], "spam-clf"),
    bad("chat-with-a-classifier", lambda w: ["chat", w.clf], "spam-clf"),
    bad("eval-tasks-on-a-classifier", lambda w: eval_tasks(w, model=w.clf), "spam-clf"),
    bad("instruct-from-a-classifier", lambda w: instruct(w, base=w.clf), "spam-clf"),
    bad("dpo-from-a-classifier", lambda w: dpo(w, base=w.clf), "spam-clf"),
    bad("classify-with-a-generative-model", lambda w: ["classify", w.base, "win cash now"], "base-ckpt"),
]

SMALLER = [
    bad("classify-csv-header-with-other-names",
        lambda w: classify(w, data=w / "other.csv"), "other.csv", ("--text-column", "--label-column", "column"),
        setup=text_file("other.csv", "kind,message\n" + "".join(f"{lab},{txt}\n" for lab, txt in SPAM))),
    bad("from-hf-shard-outside-its-folder",
        lambda w: ["convert", "from-hf", w / "sharded-hf", w / "new-ckpt", "--tokenizer", w.tok],
        ("outside", "model.safetensors.index.json"), setup=lambda w: sharded_hf(w, outside=True)),
    bad("merge-adapter-rank-0", lambda w: ["lora", "merge", w.adapter, w / "merged"], "adapter_config.json",
        setup=edit_adapter(rank=0)),
    bad("merge-adapter-unknown-module", lambda w: ["lora", "merge", w.adapter, w / "merged"], "adapter_config.json",
        setup=edit_adapter(modules=["no.such.module"])),
    bad("merge-adapter-base-missing", lambda w: ["lora", "merge", w.adapter, w / "merged"], "adapter_config.json",
        setup=edit_adapter(base={"path": "/nonexistent/base-ckpt", "sha256": "0" * 64, "config": {}})),
    bad("generate-adapter-config-not-json", lambda w: ["generate", w.adapter, "--prompt", "The"],
        "adapter_config.json", setup=lambda w: (w.adapter / "adapter_config.json").write_text("{not json")),
    # refusals that come after the stage has started: still nothing left behind (no --out, no lone metrics.csv)
    bad("dpo-batch-larger-than-the-data-leaves-no-out", lambda w: dpo(w, "--train.batch_size", 64),
        ("--train.batch_size", "batch")),
    bad("classify-one-class-leaves-no-out", lambda w: classify(w, data=w / "one-class.csv"),
        ("one-class.csv", "class"), setup=text_file("one-class.csv", "label,text\n" + "ham,see you soon\n" * 30)),
    bad("instruct-malformed-records-leave-no-out", lambda w: instruct(w, data=w / "broken.jsonl"), "broken.jsonl",
        setup=text_file("broken.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": \n')),
]


def _no_binding(self, address):
    raise AssertionError(f"bound a socket to {address} before refusing the options")


@pytest.mark.parametrize("case", DESTROYS_WORK + TRACEBACKS + SILENT_NONSENSE + SMALLER)
def test_refused_in_one_line_touching_nothing(case, ws, capsys, monkeypatch):
    argv = case.argv(ws)
    if case.setup is not None:
        case.setup(ws)
    before = snapshot(ws.root)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))  # chat: a message to answer should it not refuse
    monkeypatch.setattr(socket.socket, "bind", _no_binding)  # serve must refuse before it listens
    with time_limit(LIMIT_S):
        code, _, err = run(argv, capsys)
    assert_user_error(code, err, *case.needles)
    assert_same_files(before, snapshot(ws.root))


# --- positive controls: the legitimate form of each refusal works -----------------------------------------------
def _mine(out: Path) -> dict[str, str]:
    """Put files of the user's into `out` (made if needed) that no verb writes; returns their snapshot."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "notes.txt").write_text("my notes\n")
    (out / "mine").mkdir(exist_ok=True)
    (out / "mine" / "data.bin").write_bytes(bytes(range(256)))
    return {k: v for k, v in snapshot(out).items() if k == "notes.txt" or k.startswith("mine")}


def _vocab_size(folder: Path) -> int:
    from llmscratch.tokenizer import load_tokenizer

    return load_tokenizer(folder).vocab_size


OVERWRITES = {  # verb → (argv writing into out, check of the second run's result)
    "tokenizer-train": (lambda w, out, n: ["tokenizer", "train", "--data", w.corpus, "--vocab-size", 280 + n,
                                           "--out", out],
                        lambda out: _vocab_size(out) == 281),
    "pretrain": (lambda w, out, n: ["pretrain", "--data", w.data, "--out", out, *PRETRAIN, "--train.max_steps",
                                    4 - n, "--train.save_every", 2 + n],
                 lambda out: sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000003"]),
    "finetune-instruct": (lambda w, out, n: instruct(w, "--train.max_steps", 2 + n, "--train.save_every", 2 + n,
                                                     out=out),
                          lambda out: sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000003"]),
    "finetune-classify": (lambda w, out, n: classify(w, out=out), lambda out: (out / "labels.json").is_file()),
    "synth-instruct": (lambda w, out, n: ["data", "synth-instruct", "--out", out, "--n-train", 5 + n, "--n-test", 2],
                       lambda out: len((out / "train.jsonl").read_text().splitlines()) == 6 * 5),
    "to-hf": (lambda w, out, n: ["convert", "to-hf", w.base, out], lambda out: (out / "config.json").is_file()),
    "lora-merge": (lambda w, out, n: ["lora", "merge", w.adapter, out],
                   lambda out: (out / "model.safetensors").is_file()),
}


@pytest.mark.parametrize("verb", list(OVERWRITES))
def test_overwrite_replaces_the_verbs_own_files_and_keeps_the_users(verb, ws, capsys):
    argv, check = OVERWRITES[verb]
    out = ws / "out-dir"
    code, _, err = run(argv(ws, out, 0), capsys)
    assert code == 0, err
    mine = _mine(out)
    code, _, err = run([*argv(ws, out, 1), "--overwrite"], capsys)
    assert code == 0, err
    assert check(out)
    assert {k: v for k, v in snapshot(out).items() if k in mine} == mine


def test_quickstart_overwrite_keeps_unrelated_files_beside_a_checkpoints_folder(ws, capsys):
    """The issue's case: a folder that merely contains checkpoints/ must not be deleted whole."""
    out = ws / "qs"
    mine = _mine(out)
    (out / "checkpoints").mkdir()
    code, _, err = run([*quickstart(ws, "--out", out), "--overwrite"], capsys)
    assert code == 0, err
    assert (out / "model.safetensors").is_file()
    assert {k: v for k, v in snapshot(out).items() if k in mine} == mine


@pytest.mark.parametrize("verb", ["tokenizer-train", "pretrain", "to-hf"])
def test_an_empty_out_folder_is_fine(verb, ws, capsys):
    out = ws / "empty"
    out.mkdir()
    code, _, err = run(OVERWRITES[verb][0](ws, out, 0), capsys)
    assert code == 0, err


def test_resume_continues_and_keeps_the_metrics_written_so_far(ws, capsys):
    """`--resume` is the legitimate form of `pretrain --out RUN`; the rows metrics.csv held stay byte-identical,
    as a prefix of the resumed run's file."""
    before = (ws.run / "metrics.csv").read_bytes()
    code, out, err = run(["pretrain", "--data", ws.data, "--out", ws.run, "--resume", *PRETRAIN,
                          "--train.max_steps", 6], capsys)
    assert code == 0, err
    assert "stopped at step 6" in out
    after = (ws.run / "metrics.csv").read_bytes()
    assert after.startswith(before) and len(after) > len(before)


@pytest.mark.parametrize("extra", [["--temperature", 0, "--top-k", 0, "--top-p", 1],
                                   ["--temperature", 1.5, "--top-k", 1, "--top-p", 0.01],
                                   ["--max-new-tokens", 1]])
def test_sampling_options_at_their_bounds_are_accepted(extra, ws, capsys, monkeypatch):
    code, out, err = run(generate(ws, *extra, "--seed", 0), capsys)
    assert code == 0, err
    assert out.startswith("The module")
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    code, out, err = run(chat(ws, *extra, "--seed", 0), capsys)
    assert code == 0, err


def test_merged_adapter_and_finite_weights_generate(ws, capsys):
    code, _, err = run(["lora", "merge", ws.adapter, ws / "merged"], capsys)
    assert code == 0, err
    code, out, err = run(["generate", ws / "merged", "--prompt", "Say hi.", "--max-new-tokens", 4,
                          "--temperature", 0], capsys)
    assert code == 0, err


def test_each_model_on_its_own_verbs(ws, capsys):
    code, out, err = run(["classify", ws.clf, "win free cash", "see you at lunch"], capsys)
    assert code == 0, err
    assert [line.split("\t")[0] in ("spam", "ham") for line in out.strip().splitlines()] == [True, True]
    code, out, err = run(eval_tasks(ws, "--json", ws / "scores.json"), capsys)
    assert code == 0, err
    assert json.loads((ws / "scores.json").read_text())["overall"]["n"] == len(RECORDS)


def test_a_csv_header_named_by_the_flags_is_read_as_a_header(ws, capsys):
    (ws / "other.csv").write_text("kind,message\n" + "".join(f"{lab},{txt}\n" for lab, txt in SPAM))
    code, _, err = run(classify(ws, "--text-column", "message", "--label-column", "kind", data=ws / "other.csv"),
                       capsys)
    assert code == 0, err
    assert set(json.loads((ws / "tuned" / "labels.json").read_text())) == {"spam", "ham"}  # no class "kind"


def test_a_shard_index_inside_its_folder_converts(ws, capsys):
    folder = sharded_hf(ws, outside=False)
    code, _, err = run(["convert", "from-hf", folder, ws / "ours", "--tokenizer", ws.tok], capsys)
    assert code == 0, err
    code, out, err = run(["generate", ws / "ours", "--prompt", "The", "--max-new-tokens", 3], capsys)
    assert code == 0, err


@pytest.mark.parametrize("pattern", ["{dir}", "{dir}/**/*.txt"])
def test_a_folder_linked_into_itself_is_read_once(pattern, ws, capsys):
    os.symlink(".", ws.corpus_dir / "again")
    counts = []
    for data, out in ((pattern.format(dir=ws.corpus_dir), ws / "linked"), (ws.corpus, ws / "plain")):
        code, _, err = run(["prepare", "--data", data, "--tokenizer", ws.tok, "--out", out], capsys)
        assert code == 0, err
        meta = json.loads((out / "meta.json").read_text())
        counts.append(meta["train_tokens"] + meta["val_tokens"])
    assert counts[0] == counts[1]
