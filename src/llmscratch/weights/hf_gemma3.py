"""Hugging Face `Gemma3ForCausalLM` folders (model_type "gemma3_text": Gemma 3 270M, 1B) ↔ our GPT configured as
Gemma 3.

The layout is Llama's with four norms per block (input, post-attention, pre- and post-feedforward), QK-norm, a
GeGLU MLP, and a local:global layer pattern that `layer_types` spells out (older config.json files give only
`sliding_window_pattern`). Two things are reshaped besides fusing q/k/v into our `attn.qkv`:

- Gemma's RMSNorm multiplies by (1 + w) and stores w (zero-centred); ours multiplies by its weight, so loading
  adds 1 to every norm weight and exporting subtracts it.
- The softmax scale is query_pre_attn_scalar^-1/2 (`ModelConfig.attn_scale`), stored back as that scalar.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from llmscratch.config import ModelConfig
from llmscratch.errors import UserError
from llmscratch.runs import HF_CONFIG
from llmscratch.weights.hf_gpt2 import _read_hf_tensors, write_hf_folder
from llmscratch.weights.hf_llama import fill_from_hf, hf_layout, read_hf_config

MODEL_TYPE = "gemma3_text"
ARCHITECTURE = "Gemma3ForCausalLM"

_GLOBAL = {"tok_emb.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
_BLOCK = {  # ours → theirs under model.layers.{i}.
    "norm1.weight": "input_layernorm.weight",
    "attn.q_norm.weight": "self_attn.q_norm.weight",
    "attn.k_norm.weight": "self_attn.k_norm.weight",
    "attn.proj.weight": "self_attn.o_proj.weight",
    "post_attn_norm.weight": "post_attention_layernorm.weight",
    "norm2.weight": "pre_feedforward_layernorm.weight",
    "mlp.gate.weight": "mlp.gate_proj.weight",
    "mlp.up.weight": "mlp.up_proj.weight",
    "mlp.proj.weight": "mlp.down_proj.weight",
    "post_mlp_norm.weight": "post_feedforward_layernorm.weight",
}
_TYPES = {"sliding_attention": "sliding", "full_attention": "full"}

# What Gemma3TextConfig assumes when a config.json leaves a field out (Google's own files omit several).
_DEFAULTS = dict(head_dim=256, max_position_embeddings=131072, rms_norm_eps=1e-6, query_pre_attn_scalar=256,
                 sliding_window=4096, rope_theta=1e6, rope_local_base_freq=10000.0, sliding_window_pattern=6,
                 tie_word_embeddings=True)


def is_gemma3(cfg: ModelConfig) -> bool:
    """Whether `cfg` uses a part only Gemma 3 has among the families we export (sandwich norms, scaled
    embeddings, GeGLU, sliding-window layers): then `export_hf_gemma3` is the export that can carry it."""
    return cfg.post_norms or cfg.embed_scale or cfg.mlp == "geglu" or any(cfg.sliding_layers)


def _rope_thetas(hf: dict, source: str) -> tuple[float, float]:
    """(global theta, local theta) from transformers 5's per-layer-type `rope_parameters` or the older
    `rope_theta` + `rope_local_base_freq` (+ `rope_scaling`) keys. Scaled RoPE (the "linear" factor 8 of the
    4B-27B models' global layers) is refused."""
    params = hf.get("rope_parameters") or {}
    full, local = params.get("full_attention") or {}, params.get("sliding_attention") or {}
    for kind in (full.get("rope_type"), local.get("rope_type"), (hf.get("rope_scaling") or {}).get("rope_type")):
        if kind not in (None, "default"):
            raise UserError(f"{source}: rope type {kind!r} is not supported for Gemma 3 (only unscaled RoPE, as in "
                            "gemma-3-270m and gemma-3-1b)")
    return (float(full.get("rope_theta", hf.get("rope_theta", _DEFAULTS["rope_theta"]))),
            float(local.get("rope_theta", hf.get("rope_local_base_freq", _DEFAULTS["rope_local_base_freq"]))))


def _layer_types(hf: dict, n_layers: int, source: str) -> list[str]:
    types = hf.get("layer_types")
    if types is None:  # the older form: every `sliding_window_pattern`-th layer is global
        period = int(hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern")
                     or _DEFAULTS["sliding_window_pattern"])
        types = ["full_attention" if (i + 1) % period == 0 else "sliding_attention" for i in range(n_layers)]
    if len(types) != n_layers or set(types) - set(_TYPES):
        raise UserError(f"{source}: layer_types must list {n_layers} entries, each sliding_attention or "
                        "full_attention")
    return [_TYPES[t] for t in types]


def config_from_hf(hf: dict, source: str) -> ModelConfig:
    """Our ModelConfig from a Gemma 3 text `config.json`."""
    if hf.get("model_type") != MODEL_TYPE:
        raise UserError(f"{source}: model_type {hf.get('model_type')!r} is not {MODEL_TYPE!r} (Gemma3ForCausalLM)")
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise UserError(f"{source}: hidden_activation {act!r} is not GeGLU's tanh GELU; cannot convert")
    unsupported = [k for k in ("attention_bias", "final_logit_softcapping", "attn_logit_softcapping",
                               "use_bidirectional_attention") if hf.get(k)]
    if unsupported:
        raise UserError(f"{source}: {', '.join(unsupported)} set; Gemma 3 text models have none of these")
    def d(key: str):
        return hf[key] if hf.get(key) is not None else _DEFAULTS[key]

    try:
        theta, local_theta = _rope_thetas(hf, source)
        nh, n_layers = hf["num_attention_heads"], hf["num_hidden_layers"]
        return ModelConfig(
            name=hf.get("_name_or_path") or "gemma3-hf", vocab_size=hf["vocab_size"],
            context_length=d("max_position_embeddings"), d_model=hf["hidden_size"], n_layers=n_layers, n_heads=nh,
            n_kv_heads=hf.get("num_key_value_heads") or nh, d_ff=hf["intermediate_size"], head_dim=d("head_dim"),
            qkv_bias=False, bias=False, tie_embeddings=bool(d("tie_word_embeddings")),
            norm_eps=float(d("rms_norm_eps")), norm="rmsnorm", mlp="geglu", position="rope", rope_theta=theta,
            rope_local_theta=local_theta, qk_norm=True, post_norms=True, embed_scale=True,
            attn_scale=float(d("query_pre_attn_scalar")) ** -0.5, sliding_window=d("sliding_window"),
            layer_types=_layer_types(hf, n_layers, source), extra={"hf_model_type": MODEL_TYPE})
    except KeyError as exc:
        raise UserError(f"{source}: missing field {exc.args[0]!r} of a {MODEL_TYPE} config") from None


def _name_pairs(n_layers: int) -> Iterator[tuple[str, str]]:
    """(our tensor name, the Hugging Face name) of every tensor but the fused q/k/v weight and the LM head."""
    yield from _GLOBAL.items()
    for i in range(n_layers):
        for ours, theirs in _BLOCK.items():
            yield f"blocks.{i}.{ours}", f"model.layers.{i}.{theirs}"


def _is_norm(ours: str) -> bool:
    return ours.endswith(("norm.weight", "norm1.weight", "norm2.weight"))


def load_hf_gemma3(folder: str | Path, dtype: torch.dtype | None = None):
    """(model, config) from a Hugging Face Gemma 3 text folder, built on the meta device and filled in place.
    Missing/unexpected tensors and shape mismatches are collected and reported in one UserError."""
    folder = Path(folder)
    cfg = config_from_hf(read_hf_config(folder), str(folder / HF_CONFIG))

    def convert(ours: str, t: torch.Tensor) -> torch.Tensor:
        # Gemma's (1 + w) → our weight, added in fp32 and rounded once, to the output dtype
        return t.float() + 1.0 if _is_norm(ours) else t

    return fill_from_hf(folder, cfg, _read_hf_tensors(folder), lambda _: _name_pairs(cfg.n_layers), dtype,
                        convert)


def _check_exportable(cfg: ModelConfig) -> None:
    parts = {"norm=rmsnorm": cfg.norm == "rmsnorm", "mlp=geglu": cfg.mlp == "geglu", "position=rope":
             cfg.position == "rope", "no biases": not (cfg.bias or cfg.qkv_bias), "qk_norm": cfg.qk_norm,
             "post_norms": cfg.post_norms, "embed_scale": cfg.embed_scale, "no rope_scaling": cfg.rope_scaling is None,
             "attention=standard": cfg.attention == "standard", "no experts": not cfg.n_experts}
    lacking = [name for name, ok in parts.items() if not ok]
    if lacking:
        raise UserError(f"only Gemma 3-style models export to {ARCHITECTURE}; this one lacks: {', '.join(lacking)}")
    if cfg.n_classes is not None:
        raise UserError(f"this is a classifier (n_classes={cfg.n_classes}); export the base model instead")


def _hf_config(cfg: ModelConfig, dtype: torch.dtype) -> dict:
    scalar = (cfg.attn_scale or cfg.head_dim ** -0.5) ** -2
    local_theta = cfg.rope_local_theta if cfg.rope_local_theta is not None else cfg.rope_theta
    return {
        "architectures": [ARCHITECTURE], "model_type": MODEL_TYPE, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.context_length, "rms_norm_eps": cfg.norm_eps,
        "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": round(scalar) if
        abs(scalar - round(scalar)) < 1e-6 * scalar else scalar,
        "sliding_window": cfg.sliding_window or cfg.context_length,
        "layer_types": ["sliding_attention" if s else "full_attention" for s in cfg.sliding_layers],
        "rope_theta": cfg.rope_theta, "rope_local_base_freq": local_theta, "rope_scaling": None,
        "attention_bias": False, "final_logit_softcapping": None, "attn_logit_softcapping": None,
        "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": str(dtype).removeprefix("torch."),
    }


def export_hf_gemma3(model, out: str | Path) -> Path:
    """Write `model` (a Gemma 3-configured GPT) as a folder `transformers` loads into Gemma3ForCausalLM with equal
    logits."""
    cfg: ModelConfig = model.config
    _check_exportable(cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ours = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    named = {}
    for k, theirs in _name_pairs(cfg.n_layers):
        t = ours[k]
        named[theirs] = (t.float() - 1.0).to(t.dtype) if _is_norm(k) else t  # our weight → Gemma's (1 + w)
    tensors = hf_layout(cfg, ours, named)
    write_hf_folder(out, tensors, _hf_config(cfg, ours["tok_emb.weight"].dtype))
    return out
