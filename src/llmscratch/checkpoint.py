"""Saving and loading a checkpoint folder: weights + model config + tokenizer (+ hyperparameters).

Every folder is self-contained: `load(folder)` rebuilds the model and its tokenizer from it alone. Weights
are stored with safetensors (no pickle); files are written to a temporary name and renamed into place, so a
crash never leaves a half-written file under the real name. The folder's file names and discovery (a run's
newest checkpoint, adapter folders) belong to `llmscratch.runs`.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from llmscratch.config import ModelConfig
from llmscratch.errors import UserError, one_line
from llmscratch.fileio import atomic_write
from llmscratch.runs import CONFIG, HPARAMS, SHARDED, WEIGHTS, find_model_folder

__all__ = ["CONFIG", "HPARAMS", "WEIGHTS", "assign_weights", "check_finite", "check_state_dict", "find_model_folder",
           "load", "load_model", "load_state_dict", "model_state", "raise_if_unfit", "save_model"]


def model_state(model: torch.nn.Module, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The state dict to save (`model`'s, or the `state` given for it, e.g. gathered from the shards of a
    sharded run): a tied LM head is dropped (it is the embedding; safetensors refuses aliases)."""
    state = dict(model.state_dict() if state is None else state)
    if getattr(model.config, "tie_embeddings", False):
        state.pop("lm_head.weight", None)
    return {k: v.detach().contiguous() for k, v in state.items()}


def save_model(directory: str | Path, model, tokenizer=None, hyperparameters: dict | None = None,
               state: dict[str, torch.Tensor] | None = None, weights: bool = True) -> Path:
    """Write the checkpoint files of `model` (and `tokenizer`) into `directory`; `state`: its weights when they are
    not the model's own tensors (a sharded run gathers them first). `weights=False`: every file but the weights
    (a sharded checkpoint's processes write those themselves: llmscratch.sharded)."""
    from safetensors.torch import save_file

    from llmscratch.model.packed import is_packed

    if is_packed(model):
        raise ValueError("this model's linear weights were packed for CPU inference; save the unpacked model")
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create checkpoint folder {directory}: {exc.strerror}") from None
    if weights:
        state = {k: v.cpu() for k, v in model_state(model, state).items()}
        atomic_write(directory / WEIGHTS, lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    atomic_write(directory / CONFIG, model.config.save)
    if tokenizer is not None:
        tokenizer.save(directory)
    if hyperparameters is not None:
        text = yaml.safe_dump(hyperparameters, sort_keys=False)
        atomic_write(directory / HPARAMS, lambda p: p.write_text(text))
    return directory


def load_state_dict(file: Path, device="cpu") -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not file.is_file():
        raise UserError(f"{file}: weights file missing; the checkpoint folder is incomplete")
    try:
        state = load_file(str(file), device=str(device))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{file}: cannot read weights ({one_line(exc)}); the file is truncated or not safetensors — "
                        "re-save or re-download the checkpoint") from None
    check_finite(state, file)
    return state


def check_finite(tensors: dict[str, torch.Tensor], source: str | Path) -> None:
    """UserError naming `source` and the first floating tensor that holds a NaN or an infinity.

    A model with one NaN weight produces NaN logits everywhere; saying so at load beats a loss of nan or
    garbage text later. A tensor's sum is finite exactly when all its values are, unless finite values overflow
    it; only a non-finite sum (10x cheaper than a mask) is checked element by element, in slices of 16M so the
    scratch mask stays small.
    """
    for name, t in tensors.items():
        if not t.is_floating_point() or t.is_meta or bool(torch.isfinite(t.sum(dtype=torch.float32))):
            continue
        flat = t.reshape(-1)
        if not all(bool(torch.isfinite(part).all()) for part in flat.split(1 << 24)):
            raise UserError(f"{source}: tensor {name} holds NaN/Inf values; the checkpoint is corrupt or training "
                            "diverged — use an earlier checkpoint (checkpoints/step-*), lower the learning rate, or "
                            "re-download the weights")


def check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise UserError naming the first missing/unexpected keys or shape mismatches (with both shapes)."""
    expected = model_state(model)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in expected if k in state and state[k].shape != expected[k].shape]
    raise_if_unfit(f"{source}: weights do not fit config.json", mismatched, missing, unexpected)


def raise_if_unfit(context: str, mismatched: list[str], missing: list[str], unexpected: list[str]) -> None:
    """One UserError, `context` then the first few shape mismatches (described by the caller, with both
    shapes), missing and unexpected tensors; nothing when all three lists are empty. Every weight loader
    reports through this, so the messages read alike."""
    problems = []
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es), first: " + "; ".join(mismatched[:3]))
    if missing:
        problems.append(f"{len(missing)} missing tensor(s), first: {', '.join(missing[:3])}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s), first: {', '.join(unexpected[:3])}")
    if problems:
        raise UserError(f"{context} — " + "; ".join(problems))


def assign_weights(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Fill a model built on the meta device with `state`'s tensors in place (no copies; memory-mapped
    tensors stay mapped), then re-tie a tied LM head to the token embedding."""
    model.load_state_dict(state, strict=False, assign=True)
    if model.config.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    return model


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Build the model from `config.json` and fill it from `model.safetensors` — or, in a step folder of a run
    trained with FSDP2, from its shards (`sharded/`, read in this one process)."""
    from llmscratch.model import GPT

    folder = find_model_folder(path)
    cfg = ModelConfig.load(folder / CONFIG)
    if not (folder / WEIGHTS).exists() and (folder / SHARDED).is_dir():  # a step of an FSDP2 run: read its shards
        from llmscratch import sharded

        with torch.device("meta"):
            model = GPT(cfg)
        model = model.to_empty(device="cpu")  # storage for the shards to be read into (no random init to pay)
        if cfg.tie_embeddings:
            model.lm_head.weight = model.tok_emb.weight
        sharded.load(folder / SHARDED, model)
        model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
        return model.eval()
    state = load_state_dict(folder / WEIGHTS)
    with torch.device("meta"):
        model = GPT(cfg)
    check_state_dict(model, state, str(folder / WEIGHTS))
    assign_weights(model, state)
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    return model.eval()


def load(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """(model, tokenizer) from a checkpoint folder — the package's front door."""
    from llmscratch.tokenizer import load_tokenizer

    folder = find_model_folder(path)
    model, tok = load_model(folder, device, dtype), load_tokenizer(folder)
    if tok.vocab_size > model.config.vocab_size:  # its ids past the embedding table would crash mid-run
        raise UserError(f"{folder}: the tokenizer has {tok.vocab_size} ids but the model only "
                        f"{model.config.vocab_size} embeddings; the folder mixes files of different models")
    return model, tok
