"""The on-disk layout of checkpoint and run folders: every file name, the `checkpoints/step-N` naming,
discovery, and the guards that keep an output folder from being half-written or overwritten by mistake.

A **checkpoint folder** is self-contained: weights, model config and tokenizer, plus what a stage adds::

    model.safetensors      the weights (safetensors: no pickle)
    config.json            our ModelConfig
    tokenizer.json         the tokenizer (a Hugging Face tokenizer folder keeps its own files beside it)
    hyperparameters.yaml   how it was made
    prompt_style.json      an instruction-tuned model's prompt style
    labels.json            a classifier's label names

A **run folder** (`pretrain`, `finetune ...`) is a checkpoint folder of its final model with the run's
history beside it: `metrics.csv`, `loss.png`, the stage's own reports, and resumable checkpoints under
`checkpoints/step-NNNNNNN/`, each a checkpoint folder plus `train_state.pt` (optimizer, RNG states, data
position; read with `weights_only=True`). A run trained with LoRA ends as an **adapter folder**:
`adapter.safetensors` + `adapter_config.json` instead of the full weights.

This module is the one place that spells these names; every other module asks it.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from llmscratch.errors import UserError

# --- a checkpoint folder ------------------------------------------------------------------------------------
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
HPARAMS = "hyperparameters.yaml"
PROMPT_STYLE = "prompt_style.json"
LABELS = "labels.json"

# --- a run folder -------------------------------------------------------------------------------------------
METRICS_CSV = "metrics.csv"
LOSS_PLOT = "loss.png"
CHECKPOINTS = "checkpoints"
TRAIN_STATE = "train_state.pt"
DATA = "data"  # the run's prepared token files, when `pretrain` tokenized the corpus itself
TEST_RESPONSES = "test_responses.json"  # instruct / DPO: the test split answered after training
CLASSIFY_METRICS = "metrics.json"  # classify: accuracy and loss per split, confusion matrix
ACCURACY_PLOT = "accuracy.png"
CONFUSION_PLOT = "confusion.png"
DPO_METRICS = "dpo_metrics.json"  # DPO: validation metrics and sample answers before and after
DPO_PLOT = "dpo.png"

# --- an adapter folder (ours) and a PEFT export -------------------------------------------------------------
ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"  # (Hugging Face PEFT uses the same name for its own format)
PEFT_WEIGHTS = "adapter_model.safetensors"

# --- prepared token files (`llmscratch prepare`) ------------------------------------------------------------
TOKENS_META = "meta.json"
TOKEN_SPLITS = ("train", "val")


def token_file(split: str) -> str:
    """The name of a split's token file: train.bin, val.bin."""
    return f"{split}.bin"


# Hugging Face model folders use the same two names for weights and config as ours.
HF_WEIGHTS, HF_CONFIG = WEIGHTS, CONFIG
HF_WEIGHTS_INDEX = "model.safetensors.index.json"

_STEP = re.compile(r"step-(\d+)$")


# --- checkpoints inside a run -------------------------------------------------------------------------------
def step_folder(run: str | Path, step: int) -> Path:
    """`run/checkpoints/step-NNNNNNN` (zero-padded, so names sort in step order)."""
    return Path(run) / CHECKPOINTS / f"step-{step:07d}"


def step_of(folder: str | Path) -> int | None:
    """The step a `checkpoints/step-N` folder holds, or None for any other folder."""
    folder = Path(folder)
    match = _STEP.match(folder.name)
    return int(match.group(1)) if match and folder.parent.name == CHECKPOINTS else None


def run_of(folder: str | Path) -> Path:
    """The run folder a `checkpoints/step-N` folder belongs to; any other folder is its own run."""
    folder = Path(folder)
    return folder.parent.parent if step_of(folder) is not None else folder


def checkpoints(run: str | Path, resumable: bool = False) -> list[Path]:
    """The run's step folders, oldest first; `resumable`: only those with a training state."""
    root = Path(run) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = sorted(p for p in root.iterdir() if p.is_dir() and _STEP.match(p.name))
    return [p for p in found if (p / TRAIN_STATE).is_file()] if resumable else found


def latest_checkpoint(run: str | Path) -> Path | None:
    """The newest resumable checkpoint of a run folder, or None."""
    found = checkpoints(run, resumable=True)
    return found[-1] if found else None


def holds_run(folder: str | Path) -> bool:
    """Whether `folder` holds a training run (a `checkpoints/` folder)."""
    return (Path(folder) / CHECKPOINTS).is_dir()


@contextmanager
def _temp_beside(final: Path, suffix: str = "") -> Iterator[Path]:
    """A new temporary folder beside `final` (on the same file system, so one rename moves it into place),
    removed again when the body fails or is interrupted."""
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=suffix, dir=final.parent))
    except OSError as exc:
        raise UserError(f"{final}: cannot create the folder ({exc.strerror}); choose a folder you can write to") \
            from None
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def new_step_folder(run: str | Path, step: int) -> Iterator[Path]:
    """Yield a temporary folder beside the run's checkpoints to write step `step` into; on success it replaces
    `checkpoints/step-N` in one rename, on failure it is removed, so a crash never leaves a half-written
    checkpoint under a real name."""
    final = step_folder(run, step)
    with _temp_beside(final) as tmp:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)


def prune_checkpoints(run: str | Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` step folders (none when `keep_last` <= 0)."""
    if keep_last <= 0:
        return
    for old in checkpoints(run)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


# --- what a folder is ---------------------------------------------------------------------------------------
def is_model_folder(path: str | Path) -> bool:
    """A folder with full model files (weights or config)."""
    path = Path(path)
    return (path / WEIGHTS).exists() or (path / CONFIG).exists()


def is_adapter_folder(path: str | Path) -> bool:
    """A LoRA adapter folder of ours (it may also hold full model files)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def is_adapter_only(path: str | Path) -> bool:
    """An adapter folder without full model files: loading it needs its base (merged in memory)."""
    return is_adapter_folder(path) and not (Path(path) / WEIGHTS).exists()


def is_prepared_data(path: str | Path) -> bool:
    """A folder of prepared token files (`llmscratch prepare`)."""
    return (Path(path) / TOKENS_META).is_file()


def find_model_folder(path: str | Path) -> Path:
    """The folder holding model files for `path`: itself, or for a training run its newest checkpoint."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: checkpoint folder not found")
    if not path.is_dir():
        raise UserError(f"{path}: expected a checkpoint folder (with {WEIGHTS} and {CONFIG}), got a file")
    if is_model_folder(path):
        return path
    if is_adapter_folder(path):
        raise UserError(f"{path}: a LoRA adapter, not a full checkpoint; `llmscratch generate` and "
                        f"`llmscratch classify` load it as is, elsewhere merge it first: "
                        f"llmscratch lora merge {path} MERGED_DIR")
    steps = checkpoints(path)
    if steps:
        return steps[-1]
    raise UserError(f"{path}: no {WEIGHTS} or {CONFIG} here; point at a checkpoint folder written by "
                    "`llmscratch pretrain` or `llmscratch download`")


def find_in_run(folder: str | Path, name: str) -> Path | None:
    """`folder/name`, or for a `checkpoints/step-N` folder the file of that name in its run folder (files such
    as prompt_style.json are written once per run, not into every checkpoint); None when neither exists."""
    folder = Path(folder)
    for candidate in (folder / name, run_of(folder) / name):
        if candidate.is_file():
            return candidate
    return None


def written_files(folder: str | Path) -> list[str]:
    """The names in `folder` (sub-folders with a trailing /), hidden temporary files left out: what a command
    reports it wrote."""
    return sorted(p.name + ("/" if p.is_dir() else "") for p in Path(folder).iterdir() if not p.name.startswith("."))


# --- guards for output folders ------------------------------------------------------------------------------
def check_out_dir(out: str | Path) -> bool:
    """Create `out` if needed and check it is writable; returns True when this call created it."""
    out = Path(out)
    created = not out.exists()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder; choose another path")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"--out {out}: not writable ({exc.strerror}); choose a folder you can write to") from None
    return created


@contextmanager
def removed_on_failure(out: str | Path, created: bool) -> Iterator[None]:
    """Run the body; if it fails or is interrupted, remove `out` again when this run created it and it holds no
    resumable checkpoint yet, so a failed start leaves nothing half-written behind (`--resume` needs one)."""
    try:
        yield
    except BaseException:
        if created and latest_checkpoint(out) is None:
            shutil.rmtree(out, ignore_errors=True)
        raise


def check_run_folder(out: str | Path, resume: bool, overwrite: bool = False) -> bool:
    """The guard every training stage runs before reading data: with `resume`, `out` must hold a resumable
    checkpoint; without it, `out` must not hold a run unless `overwrite` (then the old run is replaced once
    the new one is known to start: see `clear_run`). Returns whether an existing run is to be replaced."""
    out = Path(out)
    if resume:
        if overwrite:
            raise UserError("--resume and --overwrite contradict each other; pass one of them")
        if latest_checkpoint(out) is None:
            raise UserError(f"--resume: no checkpoint with {TRAIN_STATE} under {out / CHECKPOINTS}; start "
                            "without --resume")
        return False
    if holds_run(out):
        if not overwrite:
            raise UserError(f"--out {out}: already holds a training run; pass --resume to continue it, "
                            "--overwrite to replace it, or choose another folder")
        return True
    return False


def clear_run(out: str | Path) -> None:
    """Remove a previous run's checkpoints and history from `out` (for `--overwrite`), keeping other files."""
    out = Path(out)
    shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
    (out / METRICS_CSV).unlink(missing_ok=True)


def check_new_folder(out: str | Path) -> Path:
    """`out` as a Path, after checking it is free: absent or an empty folder (UserError otherwise)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: already exists and is not an empty folder; choose a new output folder or remove "
                        "this one")
    return out


def write_folder(out: str | Path, write: Callable[[Path], None]) -> Path:
    """Run `write(tmp)` on a fresh temporary folder beside `out`, then rename it to `out` (which must be free,
    see `check_new_folder`). On any failure the temporary folder is removed and `out` is left as it was."""
    out = check_new_folder(out)
    with _temp_beside(out, ".tmp") as tmp:
        write(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a model folder is meant to be shared
        if out.is_dir():
            out.rmdir()  # empty, as checked
        os.rename(tmp, out)
    return out
