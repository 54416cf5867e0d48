"""Hugging Face `GPT2LMHeadModel` folders ↔ our GPT.

One declarative table maps each of our parameter names to Hugging Face's; GPT-2's `Conv1D` layers store
their weights as (in, out) — the transpose of `nn.Linear`'s (out, in) — and that transpose happens in one
place (`_CONV1D`). Shapes are checked against our model before anything is assigned.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from llmscratch.config import ModelConfig
from llmscratch.errors import UserError
from llmscratch.fileio import atomic_write, atomic_write_text

# ours → Hugging Face, with {i} the block index. Keys may carry a "transformer." prefix or not (OpenAI's
# original upload on the hub has none; `save_pretrained` writes it).
_GLOBAL = {
    "tok_emb.weight": "wte.weight",
    "pos_emb.weight": "wpe.weight",
    "norm.weight": "ln_f.weight",
    "norm.bias": "ln_f.bias",
}
_BLOCK = {
    "norm1.weight": "ln_1.weight", "norm1.bias": "ln_1.bias",
    "attn.qkv.weight": "attn.c_attn.weight", "attn.qkv.bias": "attn.c_attn.bias",
    "attn.proj.weight": "attn.c_proj.weight", "attn.proj.bias": "attn.c_proj.bias",
    "norm2.weight": "ln_2.weight", "norm2.bias": "ln_2.bias",
    "mlp.fc.weight": "mlp.c_fc.weight", "mlp.fc.bias": "mlp.c_fc.bias",
    "mlp.proj.weight": "mlp.c_proj.weight", "mlp.proj.bias": "mlp.c_proj.bias",
}
_CONV1D = {"attn.qkv.weight", "attn.proj.weight", "mlp.fc.weight", "mlp.proj.weight"}  # stored (in, out)


def name_map(n_layers: int) -> dict[str, str]:
    """Our parameter name → Hugging Face's (without the "transformer." prefix)."""
    names = dict(_GLOBAL)
    for i in range(n_layers):
        names.update({f"blocks.{i}.{ours}": f"h.{i}.{theirs}" for ours, theirs in _BLOCK.items()})
    return names


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

    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
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
    raise UserError(f"{folder}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def load_hf_gpt2(folder: str | Path, dtype: torch.dtype | None = None):
    """(model, config) from a Hugging Face GPT-2 folder, built on the meta device and filled in place."""
    from llmscratch.model import GPT

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder}: no config.json; point at a Hugging Face GPT-2 model folder")
    try:
        hf_cfg = json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{folder / 'config.json'}: not valid JSON ({exc})") from None
    cfg = config_from_hf(hf_cfg, str(folder / "config.json"))
    raw = {k.removeprefix("transformer."): v for k, v in _read_hf_tensors(folder).items()}
    with torch.device("meta"):
        model = GPT(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    state, problems = {}, []
    for ours, theirs in name_map(cfg.n_layers).items():
        if theirs not in raw:
            problems.append(f"missing {theirs}")
            continue
        t = raw[theirs]
        if ours.split(".", 2)[-1] in _CONV1D:
            t = t.t()
        if t.shape != expected[ours]:
            problems.append(f"{theirs}: {tuple(t.shape)} vs expected {tuple(expected[ours])}")
            continue
        state[ours] = t.contiguous().to(dtype) if dtype else t.contiguous()
    if not cfg.tie_embeddings:
        if "lm_head.weight" in raw:
            state["lm_head.weight"] = raw["lm_head.weight"].to(dtype) if dtype else raw["lm_head.weight"]
        else:
            problems.append("missing lm_head.weight (config says the head is not tied)")
    if problems:
        raise UserError(f"{folder}: weights do not fit config.json — {len(problems)} problem(s), first: "
                        + "; ".join(problems[:3]))
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    return model.eval(), cfg


def export_hf_gpt2(model, out: str | Path) -> Path:
    """Write `model` as a folder `transformers.GPT2LMHeadModel.from_pretrained` loads with equal logits."""
    from safetensors.torch import save_file

    cfg: ModelConfig = model.config
    unsupported = [why for bad, why in ((cfg.n_kv_heads != cfg.n_heads, "grouped-query attention"),
                                        (not cfg.qkv_bias, "no q/k/v bias"), (not cfg.bias, "no biases"))
                   if bad]
    if unsupported:
        raise UserError(f"GPT-2 format cannot hold this model ({', '.join(unsupported)})")
    out = Path(out)
    ours = model.state_dict()
    tensors = {}
    for name, theirs in name_map(cfg.n_layers).items():
        t = ours[name].detach().cpu()
        if name.split(".", 2)[-1] in _CONV1D:
            t = t.t()
        tensors[f"transformer.{theirs}"] = t.contiguous()
    if not cfg.tie_embeddings:
        tensors["lm_head.weight"] = ours["lm_head.weight"].detach().cpu().contiguous()
    hf_config = {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
        "n_positions": cfg.context_length, "n_ctx": cfg.context_length, "n_embd": cfg.d_model,
        "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_inner": cfg.d_ff, "activation_function": "gelu_new",
        "layer_norm_epsilon": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        "bos_token_id": cfg.vocab_size - 1, "eos_token_id": cfg.vocab_size - 1,
        "torch_dtype": str(next(iter(tensors.values())).dtype).removeprefix("torch."),
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "model.safetensors", lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    atomic_write_text(out / "config.json", json.dumps(hf_config, indent=2) + "\n")
    return out
