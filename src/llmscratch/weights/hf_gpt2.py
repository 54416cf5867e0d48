"""Hugging Face `GPT2LMHeadModel` folders ↔ our GPT.

The name table, the Conv1D transpose and the shape checks live in `gpt2_layout` (shared with OpenAI's
TensorFlow format); this module reads and writes the folder: config.json, model.safetensors (or a sharded
index, or a pytorch_model.bin read with weights_only), and for export the tokenizer files.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from llmscratch.config import ModelConfig
from llmscratch.errors import UserError, read_json
from llmscratch.fileio import atomic_write, atomic_write_text
from llmscratch.runs import HF_CONFIG, HF_WEIGHTS, HF_WEIGHTS_INDEX
from llmscratch.weights.gpt2_layout import fill_gpt, name_map, to_conv1d
from llmscratch.weights.hf_tokenizer import EOT, write_hf_tokenizer


def config_from_hf(hf: dict, source: str) -> ModelConfig:
    """Our ModelConfig from a GPT-2 `config.json`."""
    if hf.get("model_type") not in (None, "gpt2"):
        raise UserError(f"{source}: model_type is {hf.get('model_type')!r}; this converter reads GPT-2 only")
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise UserError(f"{source}: activation_function {act!r} is not GPT-2's tanh GELU; cannot convert")
    try:
        return ModelConfig(name=hf.get("_name_or_path") or "gpt2-hf", vocab_size=hf["vocab_size"],
                           context_length=hf["n_positions"], d_model=hf["n_embd"], n_layers=hf["n_layer"],
                           n_heads=hf["n_head"], d_ff=hf.get("n_inner") or 4 * hf["n_embd"],
                           norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                           tie_embeddings=hf.get("tie_word_embeddings", True))
    except KeyError as exc:
        raise UserError(f"{source}: missing field {exc.args[0]!r} of a GPT-2 config") from None


def _read_hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a HF folder: model.safetensors, a sharded index, or pytorch_model.bin (never unpickled)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    single, index = folder / HF_WEIGHTS, folder / HF_WEIGHTS_INDEX
    pt = folder / "pytorch_model.bin"
    try:
        if single.is_file():
            return load_file(str(single))  # memory-mapped
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            tensors: dict[str, torch.Tensor] = {}
            for shard in shards:
                tensors.update(load_file(str(folder / shard)))
            return tensors
        if pt.is_file():
            return torch.load(pt, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, ValueError, KeyError, RuntimeError) as exc:
        raise UserError(f"{folder}: cannot read the weights ({exc}); re-download the model folder") from None
    raise UserError(f"{folder}: no {HF_WEIGHTS}, {HF_WEIGHTS_INDEX} or pytorch_model.bin")


def write_hf_folder(out: Path, tensors: dict[str, torch.Tensor], hf_config: dict) -> None:
    """The two files every Hugging Face model folder has: the weights and `config.json`, each written atomically."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / HF_WEIGHTS, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    atomic_write_text(out / HF_CONFIG, json.dumps(hf_config, indent=2) + "\n")


def load_hf_gpt2(folder: str | Path, dtype: torch.dtype | None = None):
    """(model, config) from a Hugging Face GPT-2 folder, built on the meta device and filled in place."""
    folder = Path(folder)
    if not (folder / HF_CONFIG).is_file():
        raise UserError(f"{folder}: no {HF_CONFIG}; point at a Hugging Face GPT-2 model folder")
    hf_cfg = read_json(folder / HF_CONFIG)
    cfg = config_from_hf(hf_cfg, str(folder / HF_CONFIG))
    # Keys may carry a "transformer." prefix or not (OpenAI's upload on the hub has none; save_pretrained
    # writes it). Older checkpoints also hold the causal-mask buffers attn.bias / attn.masked_bias.
    raw = {k.removeprefix("transformer."): v for k, v in _read_hf_tensors(folder).items()}
    model = fill_gpt(cfg, raw, name_map(cfg.n_layers, "hf"), f"{folder} ({HF_CONFIG})", dtype,
                     lm_head="lm_head.weight", ignore=(".attn.bias", ".attn.masked_bias"))
    return model, cfg


def export_hf_gpt2(model, out: str | Path, tokenizer=None) -> Path:
    """Write `model` as a folder `transformers.GPT2LMHeadModel.from_pretrained` loads with equal logits, and
    `tokenizer` (a byte-level BPE with GPT-2's regex) as files `AutoTokenizer.from_pretrained` loads."""
    cfg: ModelConfig = model.config
    if cfg.n_classes is not None:
        raise UserError(f"this is a classifier (n_classes={cfg.n_classes}): its head maps to classes, not to the "
                        "vocabulary, so GPT2LMHeadModel cannot hold it; export the base model it was tuned from")
    unsupported = [why for bad, why in ((cfg.n_kv_heads != cfg.n_heads, "grouped-query attention"),
                                        (not cfg.qkv_bias, "no q/k/v bias"), (not cfg.bias, "no biases"))
                   if bad]
    if unsupported:
        raise UserError(f"GPT-2 format cannot hold this model ({', '.join(unsupported)})")
    out = Path(out)
    ours = model.state_dict()
    tensors = {f"transformer.{theirs}": to_conv1d(name, ours[name].detach().cpu()).contiguous()
               for name, theirs in name_map(cfg.n_layers, "hf").items()}
    if not cfg.tie_embeddings:
        tensors["lm_head.weight"] = ours["lm_head.weight"].detach().cpu().contiguous()
    eot = (tokenizer.special_tokens.get(EOT) if tokenizer is not None else None)
    eot = cfg.vocab_size - 1 if eot is None else eot  # GPT-2's <|endoftext|> is its last id
    hf_config = {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
        "n_positions": cfg.context_length, "n_ctx": cfg.context_length, "n_embd": cfg.d_model,
        "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_inner": cfg.d_ff, "activation_function": "gelu_new",
        "layer_norm_epsilon": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        "bos_token_id": eot, "eos_token_id": eot,
        "torch_dtype": str(next(iter(tensors.values())).dtype).removeprefix("torch."),
    }
    write_hf_folder(out, tensors, hf_config)
    if tokenizer is not None:
        write_hf_tokenizer(tokenizer, out, model_max_length=cfg.context_length)
    return out
