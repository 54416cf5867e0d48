"""Hugging Face `GPT2LMHeadModel` folders ↔ our GPT.

The name table, the Conv1D transpose and the shape checks live in `gpt2_layout` (shared with OpenAI's
TensorFlow format); this module reads and writes the folder: config.json, model.safetensors (or a sharded
index, or a pytorch_model.bin read with weights_only), and for export the tokenizer files.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from llmscratch.checkpoint import check_finite
from llmscratch.config import ModelConfig
from llmscratch.errors import UserError, one_line, read_json
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


def shard_names(index: Path) -> list[str]:
    """The shard file names a `model.safetensors.index.json` lists, each checked to stay in the index's folder."""
    from llmscratch.fileio import safe_child

    data = read_json(index, "; delete it and download or copy the model folder again")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise UserError(f"{index}: not a safetensors index (no \"weight_map\" object of tensor -> shard file); "
                        "delete it and download or copy the model folder again")
    for name in weight_map.values():
        safe_child(index.parent, name, index)
    return sorted(set(weight_map.values()))


def _read_hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a HF folder: model.safetensors, a sharded index, or pytorch_model.bin (never unpickled
    beyond plain tensors); UserError for a file that cannot be read or holds NaN/Inf."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    single, index = folder / HF_WEIGHTS, folder / HF_WEIGHTS_INDEX
    pt = folder / "pytorch_model.bin"
    if single.is_file():
        files = [single]
    elif index.is_file():
        files = [folder / name for name in shard_names(index)]
    elif pt.is_file():
        files = [pt]
    else:
        raise UserError(f"{folder}: no {HF_WEIGHTS}, {HF_WEIGHTS_INDEX} or pytorch_model.bin")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            part = _read_pickled_bin(file) if file == pt else load_file(str(file))  # safetensors: memory-mapped
        except (SafetensorError, OSError, ValueError, KeyError, RuntimeError) as exc:
            raise UserError(f"{file}: cannot read the weights ({one_line(exc)}); re-download the model folder") \
                from None
        check_finite(part, file)
        tensors.update(part)
    return tensors


def _read_pickled_bin(pt: Path) -> dict[str, torch.Tensor]:
    """The tensors of a `pytorch_model.bin`, loaded with `weights_only=True`: a pickle that needs any other
    Python object is refused, never executed."""
    import pickle

    try:
        state = torch.load(pt, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"{pt}: refused by torch.load(weights_only=True): it pickles Python objects besides "
                        "tensors, or is damaged, and llmscratch never runs a pickle's code; get the model's "
                        "model.safetensors instead (or re-save it with transformers' save_pretrained, "
                        "safe_serialization=True, where you trust the file)") from None
    except EOFError:
        raise UserError(f"{pt}: empty or truncated; re-download the model folder") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{pt}: not a state dict of tensors; get the model's model.safetensors instead")
    return state


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
