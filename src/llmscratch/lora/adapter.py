"""Adapter folders: a LoRA run's trained tensors and a reference to its base checkpoint (layout below), written
after training, read back onto the base, and merged into a full checkpoint folder.

    adapter.safetensors    lora_A / lora_B of each wrapped layer (+ fully trained modules, e.g. a class head)
    adapter_config.json    rank, alpha, dropout, targets, the tuned model's config, and the base checkpoint's
                           path and sha256
    tokenizer files, and what the stage adds (prompt_style.json, labels.json, hyperparameters.yaml)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import yaml
from torch import nn

from llmscratch.checkpoint import load_model, load_state_dict, model_state, raise_if_unfit, save_model
from llmscratch.config import ModelConfig
from llmscratch.errors import UserError, read_json
from llmscratch.fileio import atomic_write, atomic_write_text, sha256_of
from llmscratch.lora.layers import LoRAApplied, apply_lora, in_adapter, lora_state_dict, merge_lora
from llmscratch.model import GPT
from llmscratch.runs import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    CONFIG,
    HPARAMS,
    LABELS,
    PROMPT_STYLE,
    WEIGHTS,
    check_out_folder,
    find_model_folder,
    write_folder,
)
from llmscratch.tokenizer import load_tokenizer

FORMAT = "llmscratch-lora"
_REQUIRED = ("rank", "alpha", "modules", "trainable_modules", "base", "model")

# ---------------------------------------------------------------------------------------------------------
# writing


def adapter_config(model: nn.Module, applied: LoRAApplied, base_folder: Path) -> dict:
    """The contents of adapter_config.json for `model` adapted as `applied` on the checkpoint `base_folder`."""
    return {
        "format": FORMAT, "version": 1,
        "rank": applied.rank, "alpha": applied.alpha, "dropout": applied.dropout,
        "targets": applied.targets, "modules": list(applied.modules), "trainable_modules": list(applied.trainable),
        "base": {"path": str(base_folder), "sha256": sha256_of(base_folder / WEIGHTS),
                 "config": json.loads((base_folder / CONFIG).read_text())},
        "model": model.config.to_dict(),  # the tuned model's config (a classifier's differs from its base's)
    }


def save_adapter(directory: str | Path, model: nn.Module, base: str | Path, tokenizer=None,
                 hyperparameters: dict | None = None, trainable: tuple[str, ...] = ()) -> Path:
    """Write the adapter of `model` (adapter.safetensors + adapter_config.json, the tokenizer, and
    hyperparameters.yaml) into `directory`; `base` is the checkpoint folder the adapter was trained on, and
    `trainable` the modules trained in full beside the adapters (as given to `apply_lora`)."""
    from safetensors.torch import save_file

    applied = LoRAApplied.of(model, trainable)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = adapter_config(model, applied, find_model_folder(base).resolve())
    tensors = lora_state_dict(model, trainable)
    atomic_write(directory / ADAPTER_WEIGHTS, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    atomic_write_text(directory / ADAPTER_CONFIG, json.dumps(config, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save(directory)
    if hyperparameters is not None:
        atomic_write_text(directory / HPARAMS, yaml.safe_dump(hyperparameters, sort_keys=False))
    return directory


def finish_adapter_run(out: str | Path, model: nn.Module, base: str | Path, tokenizer=None,
                       trainable: tuple[str, ...] = ()) -> Path:
    """After a LoRA training run: `out` becomes an adapter folder. The trainer wrote the full adapted model
    there (and hyperparameters.yaml, kept); the model is replaced by the adapter alone (the resumable
    checkpoints/ keep the full state). `trainable`: as for `save_adapter`."""
    out = Path(out)
    save_adapter(out, model, base, tokenizer, trainable=trainable)
    for name in (WEIGHTS, CONFIG):
        (out / name).unlink(missing_ok=True)
    return out


# ---------------------------------------------------------------------------------------------------------
# reading


def read_adapter_config(folder: str | Path) -> dict:
    folder = Path(folder)
    path = folder / ADAPTER_CONFIG
    if not path.is_file():
        raise UserError(f"{folder}: no {ADAPTER_CONFIG}; point at a LoRA adapter folder written by a "
                        "`llmscratch finetune ... --lora-rank R` run")
    cfg = read_json(path)
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise UserError(f"{path}: not an llmscratch LoRA adapter config (format {FORMAT!r}); a PEFT adapter is "
                        "loaded by peft, not by llmscratch")
    missing = [k for k in _REQUIRED if k not in cfg]
    if missing:
        raise UserError(f"{path}: missing key(s) {', '.join(missing)}")
    rank, alpha = cfg["rank"], cfg["alpha"]
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise UserError(f"{path}: rank {rank!r} is not a positive integer; the file is corrupt")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise UserError(f"{path}: alpha {alpha!r} is not a positive number; the file is corrupt")
    if not isinstance(cfg["base"], dict) or not isinstance(cfg["base"].get("path"), str):
        raise UserError(f"{path}: base must be an object with the base checkpoint's path; the file is corrupt")
    return cfg


def _base_folder(folder: Path, cfg: dict, base: str | Path | None, check_base: bool) -> Path:
    """The base checkpoint's model folder: the recorded one, or `base`; its weights' sha256 checked."""
    base_path = Path(base) if base is not None else Path(cfg["base"]["path"])
    if not base_path.exists():
        raise UserError(f"{folder / ADAPTER_CONFIG}: base checkpoint {base_path} not found; pass the base "
                        "folder's new location with --base")
    base_folder = find_model_folder(base_path)
    if check_base and cfg["base"].get("sha256") and sha256_of(base_folder / WEIGHTS) != cfg["base"]["sha256"]:
        raise UserError(f"{base_folder / WEIGHTS}: not the weights this adapter was trained on (sha256 differs "
                        f"from {folder / ADAPTER_CONFIG}); point --base at the original base checkpoint")
    return base_folder


def _tuned_model(folder: Path, cfg: dict, base_folder: Path) -> nn.Module:
    """The model the adapter was trained on, before its adapters: the base model, or, where the stage changed
    the model around the base (e.g. a class head), the tuned config with the base weights where they fit
    (the modules trained in full stay on the meta device until the adapter file fills them)."""
    base_model = load_model(base_folder)
    tuned_cfg = ModelConfig.from_dict(cfg["model"], source=f"{folder / ADAPTER_CONFIG} (model)")
    if tuned_cfg.to_dict() == base_model.config.to_dict():
        return base_model
    if (tuned_cfg.d_model, tuned_cfg.n_layers) != (base_model.config.d_model, base_model.config.n_layers):
        raise UserError(f"{folder}: the adapter's model ({tuned_cfg.d_model} wide, {tuned_cfg.n_layers} "
                        f"layers) does not fit the base {base_folder}")
    with torch.device("meta"):
        model = GPT(tuned_cfg)
    trainable = cfg["trainable_modules"]
    state = {k: v for k, v in model_state(base_model).items() if not in_adapter(k, trainable)}
    model.load_state_dict(state, strict=False, assign=True)
    return model


def _load_adapter_tensors(model: nn.Module, folder: Path, trainable: tuple[str, ...]) -> None:
    """Fill the adapters (and the modules trained in full) of `model` from the folder's adapter file."""
    tensors = load_state_dict(folder / ADAPTER_WEIGHTS)
    expected = {k: v.shape for k, v in model.state_dict().items() if in_adapter(k, trainable)}
    mismatched = [f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(expected[k])}"
                  for k in expected if k in tensors and tensors[k].shape != expected[k]]
    raise_if_unfit(f"{folder / ADAPTER_WEIGHTS}: does not fit {ADAPTER_CONFIG}", mismatched,
                   sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected)))
    model.load_state_dict(tensors, strict=False, assign=any(t.is_meta for t in model.parameters()))
    if model.config.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight


def load_adapter(folder: str | Path, base: str | Path | None = None, device: str | torch.device = "cpu",
                 check_base: bool = True):
    """(model with the adapter applied, unmerged; tokenizer; adapter config) from an adapter folder.

    The base checkpoint is the one recorded in adapter_config.json, or `base` when given (a moved copy). When
    its weights' sha256 differs from the recorded one, a UserError says so (`check_base=False` skips that)."""
    folder = Path(folder)
    cfg = read_adapter_config(folder)
    base_folder = _base_folder(folder, cfg, base, check_base)
    model = _tuned_model(folder, cfg, base_folder)
    trainable = tuple(cfg["trainable_modules"])
    applied = apply_lora(model, list(cfg["targets"]), int(cfg["rank"]), float(cfg["alpha"]),
                         float(cfg.get("dropout", 0.0)), trainable=trainable)
    if list(applied.modules) != list(cfg["modules"]):
        raise UserError(f"{folder / ADAPTER_CONFIG}: its layers do not match the base model's "
                        f"(first expected {cfg['modules'][:2]}, got {list(applied.modules[:2])})")
    _load_adapter_tensors(model, folder, trainable)
    try:  # the adapter folder keeps a copy of the tokenizer; an adapter saved without one uses the base's
        tok = load_tokenizer(folder)
    except UserError:
        tok = load_tokenizer(base_folder)
    return model.to(device).eval(), tok, cfg


# ---------------------------------------------------------------------------------------------------------
# merging


def load_merged(folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                base: str | Path | None = None):
    """(plain merged model, tokenizer) from an adapter folder: what `llmscratch generate ADAPTER_DIR` runs."""
    model, tok, _ = load_adapter(folder, base)
    model = merge_lora(model)
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    return model.eval(), tok


def merge_adapter_folder(folder: str | Path, out: str | Path, base: str | Path | None = None,
                         overwrite: bool = False) -> Path:
    """`llmscratch lora merge`: base + adapter → a full checkpoint folder at `out` (new or empty), with the
    adapter folder's prompt style, labels and hyperparameters; written beside `out` and renamed when complete."""
    folder = Path(folder)
    check_out_folder(out, overwrite, inputs=(folder, base))
    model, tok, cfg = load_adapter(folder, base)
    merge_lora(model)
    hp = {}
    if (folder / HPARAMS).is_file():
        hp = yaml.safe_load((folder / HPARAMS).read_text()) or {}
    hp["merged_from"] = {"adapter": str(folder.resolve()), "base": str(Path(base or cfg["base"]["path"]))}

    def write(tmp: Path) -> None:
        save_model(tmp, model, tok, hp)
        for extra in (PROMPT_STYLE, LABELS):
            if (folder / extra).is_file():
                shutil.copy2(folder / extra, tmp / extra)

    return write_folder(out, write, overwrite, inputs=(folder, base, cfg["base"]["path"]))
