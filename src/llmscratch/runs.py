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
from collections.abc import Callable, Iterable, Iterator
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
SHARDED = "sharded"  # a step folder of an FSDP2 run: each rank's weights and optimizer state (llmscratch.sharded)
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


def _missing_top(path: Path) -> Path | None:
    """The outermost ancestor of `path` (or `path` itself) that does not exist yet, or None when it exists."""
    top = None
    for candidate in (path, *path.parents):
        if candidate.exists() or candidate.is_symlink():
            break
        top = candidate
    return top


@contextmanager
def _temp_beside(final: Path, suffix: str = "") -> Iterator[Path]:
    """A new temporary folder beside `final` (on the same file system, so one rename moves it into place),
    removed again — with any parent folders made for it — when the body fails or is interrupted."""
    made = _missing_top(final.parent)
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
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
        raise


def remove_stale_temps(folder: str | Path, name: str) -> None:
    """Remove the temporary folders and files an interrupted write of `folder/name` left beside it (the
    `.NAME.*` entries `_temp_beside` and `fileio.atomic_write` create): a kill during a checkpoint save would
    otherwise leave a whole model's bytes behind under a hidden name, never cleaned."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for stale in folder.glob(f".{name}.*"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


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


# --- guards for outputs -------------------------------------------------------------------------------------
# One rule for every verb that writes: its output must be new (absent, or an empty folder), or be the run being
# resumed, or the user passed --overwrite — which replaces only the files that verb writes and never deletes
# any other. An input is never an output. Each guard runs before any work starts.

def _listing(folder: Path) -> list[str]:
    """The names in `folder`, hidden temporaries of interrupted writes left out."""
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def _same_path(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_not_input(out: str | Path, inputs: Iterable[str | Path | None], flag: str = "--out") -> None:
    """Refuse an output path that is one of the command's inputs (the same file or folder, links followed)."""
    out = Path(out)
    for given in inputs:
        if given is not None and _same_path(out, Path(given)):
            raise UserError(f"{flag} {out}: is also this command's input {given}; write to another path (inputs "
                            "are never overwritten)")


def _check_writable_path(path: Path, flag: str) -> None:
    """Fail now, not after the work, when `path` cannot be written: a symlink loop, or a nearest existing
    folder that is not writable."""
    try:
        path.resolve(strict=False)
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop on Python < 3.13
        raise UserError(f"{flag} {path}: a symbolic link loop; choose another path") from None
    if path.is_symlink() and not path.exists():
        raise UserError(f"{flag} {path}: a broken or looping symbolic link; choose another path")
    parent = next((p for p in (path if path.is_dir() else path.parent, *path.parents) if p.exists()), Path("."))
    if not parent.is_dir():
        raise UserError(f"{flag} {path}: {parent} is a file, not a folder; choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: {parent} is not writable (permission denied); choose a folder you can "
                        "write to")


def check_out_folder(out: str | Path, overwrite: bool = False, inputs: Iterable[str | Path | None] = (),
                     flag: str = "--out") -> Path:
    """The guard of a verb that writes a folder in one go: `out` as a Path, after checking it is absent or an
    empty folder — or, with `overwrite`, any folder (the verb then replaces its own files there, see
    `write_folder`) — that it is none of `inputs`, and that it can be written."""
    out = Path(out)
    check_not_input(out, inputs, flag)
    _check_writable_path(out, flag)
    if out.exists() and not out.is_dir():
        raise UserError(f"{flag} {out}: exists and is not a folder; choose a folder path")
    if out.is_dir() and _listing(out) and not overwrite:
        raise UserError(f"{flag} {out}: already exists and is not empty; choose a new folder, or pass --overwrite "
                        "to replace the files this command writes there (other files are kept)")
    return out



def check_out_file(path: str | Path, overwrite: bool = False, inputs: Iterable[str | Path | None] = (),
                   flag: str = "--out") -> Path:
    """The guard of a verb that writes one file: absent, or replaced with `overwrite`; never a folder, never one
    of `inputs`, and writable. The file itself is written later with `fileio.atomic_write`."""
    path = Path(path)
    check_not_input(path, inputs, flag)
    _check_writable_path(path, flag)
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a folder; give a file path")
    if path.exists() and not overwrite:
        raise UserError(f"{flag} {path}: already exists; choose a new file name, or pass --overwrite to replace it")
    return path


def write_folder(out: str | Path, write: Callable[[Path], None], overwrite: bool = False,
                 inputs: Iterable[str | Path | None] = ()) -> Path:
    """Run `write(tmp)` on a fresh temporary folder beside `out`, then move the result into place: a new or empty
    `out` becomes the folder in one rename; with `overwrite`, each file written replaces the one of its name in
    `out` and every other file there is kept. On any failure the temporary folder is removed and `out` is left
    as it was. (Guards as `check_out_folder`.)"""
    inputs = list(inputs)
    out = check_out_folder(out, overwrite, inputs)
    remove_stale_temps(out.parent, out.name)
    with _temp_beside(out, ".tmp") as tmp:
        write(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a model folder is meant to be shared
        if not out.is_dir() or not any(out.iterdir()):
            if out.is_dir():
                out.rmdir()
            os.rename(tmp, out)
            return out
        written = sorted(tmp.iterdir())
        for new in written:  # checked in full before anything is replaced
            check_not_input(out / new.name, inputs)
        for new in written:
            old = out / new.name
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old)
            os.replace(new, old)
        tmp.rmdir()
    return out


def check_out_dir(out: str | Path) -> frozenset[str] | None:
    """Create `out` if needed and check it is writable; returns the names it held before (None when this call
    created it), for `removed_on_failure`."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder; choose another path")
    before = frozenset(p.name for p in out.iterdir()) if out.is_dir() else None
    made = _missing_top(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
        raise UserError(f"--out {out}: not writable ({exc.strerror}); choose a folder you can write to") from None
    return before


@contextmanager
def removed_on_failure(out: str | Path, before: frozenset[str] | None) -> Iterator[None]:
    """Run the body; if it fails or is interrupted before the run saved a resumable checkpoint, remove what it
    added to `out` (all of `out` when `check_out_dir` created it; else the names not in `before`), so a failed
    start leaves nothing half-written behind (`--resume` needs a checkpoint)."""
    try:
        yield
    except BaseException:
        out = Path(out)
        if latest_checkpoint(out) is None and out.is_dir():
            if before is None:
                shutil.rmtree(out, ignore_errors=True)
            else:
                for p in out.iterdir():
                    if p.name not in before:
                        shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink()
        raise


def check_run_folder(out: str | Path, resume: bool, overwrite: bool = False,
                     inputs: Iterable[str | Path | None] = (), resumable: bool = True) -> bool:
    """The guard every training stage runs before reading data. `out` is never one of `inputs`. With `resume`,
    `out` must hold a resumable checkpoint (stale temporaries of an interrupted save are removed). Without it,
    `out` must be absent or empty unless `overwrite`: then the old run's checkpoints and history are removed
    once the new run is known to start (`clear_run`), and the files the run writes replace theirs; other files
    stay. Returns whether `out` holds files the run replaces. (`resumable`: whether the verb has --resume, for
    the message.)"""
    out = Path(out)
    check_not_input(out, inputs)
    _check_writable_path(out, "--out")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder; choose a folder path")
    if resume:
        if overwrite:
            raise UserError("--resume and --overwrite contradict each other; pass one of them")
        if latest_checkpoint(out) is None:
            raise UserError(f"--resume: no checkpoint with {TRAIN_STATE} under {out / CHECKPOINTS}; start "
                            "without --resume")
        remove_stale_temps(out / CHECKPOINTS, "step-*")
        for name in (WEIGHTS, CONFIG, TOKENIZER, HPARAMS, METRICS_CSV, LOSS_PLOT):  # a kill mid final save
            remove_stale_temps(out, name)
        return False
    if not out.is_dir() or not _listing(out):
        return False
    if not overwrite:
        what = f"files ({', '.join(_listing(out)[:4])}); pass"
        if holds_run(out):
            what = "a training run; pass --resume to continue it," if resumable else "a training run; pass"
        raise UserError(f"--out {out}: already holds {what} --overwrite to replace what this run writes (other "
                        "files are kept), or choose a new folder")
    return True


def clear_run(out: str | Path) -> None:
    """Remove a previous run's checkpoints and history from `out` (for `--overwrite`), keeping other files."""
    out = Path(out)
    shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
    for name in (METRICS_CSV, LOSS_PLOT):
        (out / name).unlink(missing_ok=True)
