"""Hugging Face `LlamaForCausalLM` / `Qwen3ForCausalLM` / `Qwen3MoeForCausalLM` folders ↔ our GPT configured as
Llama, Qwen3 or Qwen3-MoE.

The families share one layout: RMSNorm, rotary embeddings, grouped-query attention with separate q/k/v
projections, and a SwiGLU MLP; Qwen3 adds QK-norm. `_BLOCK` maps our names to theirs; our attention keeps q,
k and v in one matrix (`attn.qkv`, one matmul), so loading concatenates their three projections along the
output dimension and exporting splits it again — that is the only reshaping. Everything else is 1:1.
Qwen3-MoE replaces the MLP by a router (`mlp.gate`, our `mlp.router`) and per-expert SwiGLU nets
(`mlp.experts.{j}.gate_proj/up_proj/down_proj`, as save_pretrained writes them and the released checkpoints
hold them); transformers' in-memory layout, the experts fused into 3-D tensors, is read too.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from llmscratch.checkpoint import assign_weights, raise_if_unfit
from llmscratch.config import ModelConfig
from llmscratch.errors import UserError, read_json
from llmscratch.runs import HF_CONFIG
from llmscratch.weights.hf_gpt2 import _read_hf_tensors, write_hf_folder

FAMILIES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}

_GLOBAL = {"tok_emb.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
_BLOCK = {  # ours → theirs under model.layers.{i}.
    "norm1.weight": "input_layernorm.weight",
    "attn.proj.weight": "self_attn.o_proj.weight",
    "attn.q_norm.weight": "self_attn.q_norm.weight",
    "attn.k_norm.weight": "self_attn.k_norm.weight",
    "norm2.weight": "post_attention_layernorm.weight",
    "mlp.gate.weight": "mlp.gate_proj.weight",
    "mlp.up.weight": "mlp.up_proj.weight",
    "mlp.proj.weight": "mlp.down_proj.weight",
}
_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")  # fused into our attn.qkv, in this order
_ROUTER = ("mlp.router.weight", "mlp.gate.weight")  # Qwen3-MoE: ours, theirs
_EXPERT = {"gate.weight": "gate_proj.weight", "up.weight": "up_proj.weight", "proj.weight": "down_proj.weight"}


def _rope_settings(hf: dict) -> tuple[float, dict | None]:
    """(theta, llama3 scaling) from either layout: transformers 5's `rope_parameters`, or the `rope_theta` +
    `rope_scaling` keys of the released Llama 3.2 / Qwen3 config.json files."""
    params = dict(hf.get("rope_parameters") or {})
    theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling") or params
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if kind == "default":
        return float(theta), None
    if kind != "llama3":
        raise UserError(f"rope scaling type {kind!r} is not supported (default and llama3 are)")
    return float(theta), {"factor": float(scaling["factor"]), "low_freq_factor": float(scaling["low_freq_factor"]),
                          "high_freq_factor": float(scaling["high_freq_factor"]),
                          "original_context_length": int(scaling["original_max_position_embeddings"])}


def _moe_settings(hf: dict, source: str) -> dict:
    """The mixture-of-experts fields of our config from a Qwen3-MoE `config.json` (transformers 5 writes the
    expert count as `num_local_experts`, the released files as `num_experts`)."""
    if hf.get("mlp_only_layers") or hf.get("decoder_sparse_step", 1) != 1:
        raise UserError(f"{source}: dense layers among the MoE ones (mlp_only_layers, decoder_sparse_step != 1) "
                        "are not supported; every layer must be a mixture of experts")
    if hf.get("use_sliding_window"):
        raise UserError(f"{source}: use_sliding_window is not supported for Qwen3-MoE; set it to false")
    return dict(n_experts=hf.get("num_experts") or hf["num_local_experts"],
                n_experts_per_token=hf["num_experts_per_tok"], moe_d_ff=hf["moe_intermediate_size"],
                moe_normalize_topk=bool(hf.get("norm_topk_prob", False)),
                router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)))


def config_from_hf(hf: dict, source: str) -> ModelConfig:
    """Our ModelConfig from a Llama, Qwen3 or Qwen3-MoE `config.json`."""
    family = hf.get("model_type")
    if family not in FAMILIES:
        raise UserError(f"{source}: model_type {family!r} is not one this converter reads ({', '.join(FAMILIES)})")
    if hf.get("hidden_act", "silu") != "silu":
        raise UserError(f"{source}: hidden_act {hf['hidden_act']!r} is not SwiGLU's silu; cannot convert")
    if hf.get("mlp_bias") or hf.get("attention_bias"):
        raise UserError(f"{source}: biases (mlp_bias/attention_bias) are not supported; Llama 3.2 and Qwen3 "
                        "have none")
    try:
        theta, scaling = _rope_settings(hf)
        moe = _moe_settings(hf, source) if family == "qwen3_moe" else {}
        d, nh = hf["hidden_size"], hf["num_attention_heads"]
        return ModelConfig(
            name=hf.get("_name_or_path") or f"{family}-hf", vocab_size=hf["vocab_size"],
            context_length=hf["max_position_embeddings"], d_model=d, n_layers=hf["num_hidden_layers"],
            n_heads=nh, n_kv_heads=hf.get("num_key_value_heads") or nh, d_ff=hf["intermediate_size"],
            head_dim=hf.get("head_dim") or d // nh, qkv_bias=False, bias=False,
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)), norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            norm="rmsnorm", mlp="swiglu", position="rope", rope_theta=theta, rope_scaling=scaling,
            qk_norm=family in ("qwen3", "qwen3_moe"), extra={"hf_model_type": family}, **moe)
    except KeyError as exc:
        raise UserError(f"{source}: missing field {exc.args[0]!r} of a {family} config") from None


def _family(cfg: ModelConfig) -> str:
    if (cfg.norm, cfg.mlp, cfg.position) != ("rmsnorm", "swiglu", "rope") or cfg.bias or cfg.qkv_bias:
        raise UserError("only Llama/Qwen3-style models (RMSNorm, SwiGLU, RoPE, no biases) export to "
                        "LlamaForCausalLM / Qwen3ForCausalLM / Qwen3MoeForCausalLM")
    if cfg.attention != "standard" or "sliding" in cfg.sliding_layers:
        raise UserError(f"{cfg.name}: multi-head latent or sliding-window attention has no Llama/Qwen3 "
                        "counterpart in transformers; this model does not export to a Hugging Face folder")
    if cfg.n_experts:
        if not cfg.qk_norm or cfg.shared_expert_d_ff:
            raise UserError("a mixture of experts exports to Qwen3MoeForCausalLM only with qk_norm and without a "
                            f"shared expert (this one: qk_norm={cfg.qk_norm}, "
                            f"shared_expert_d_ff={cfg.shared_expert_d_ff})")
        return "qwen3_moe"
    return "qwen3" if cfg.qk_norm else "llama"


def _name_pairs(cfg: ModelConfig, present) -> Iterator[tuple[str, str]]:
    """(our tensor name, the Hugging Face name) of every tensor but the fused q/k/v weight, for the tensors of
    ours in `present` (a layer's optional ones, such as QK-norm, exist in some configurations only)."""
    block = dict(_BLOCK)
    if cfg.n_experts:  # our dense mlp.* names are absent then, and the router takes HF's mlp.gate name
        block[_ROUTER[0]] = _ROUTER[1]
        block.update({f"mlp.experts.{j}.{ours}": f"mlp.experts.{j}.{theirs}"
                      for j in range(cfg.n_experts) for ours, theirs in _EXPERT.items()})
    yield from _GLOBAL.items()
    for i in range(cfg.n_layers):
        for ours, theirs in block.items():
            if f"blocks.{i}.{ours}" in present:
                yield f"blocks.{i}.{ours}", f"model.layers.{i}.{theirs}"


def _unfuse_experts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` with transformers' fused expert tensors — `mlp.experts.gate_up_proj` (E, 2·F, d), gate rows
    first, and `mlp.experts.down_proj` (E, d, F) — split into the per-expert names of the saved layout."""
    out = {}
    for name, t in tensors.items():
        prefix, _, kind = name.rpartition(".experts.")
        if kind == "gate_up_proj":
            for j, (gate, up) in enumerate(zip(*t.chunk(2, dim=1))):
                out[f"{prefix}.experts.{j}.gate_proj.weight"] = gate
                out[f"{prefix}.experts.{j}.up_proj.weight"] = up
        elif kind == "down_proj":
            out.update({f"{prefix}.experts.{j}.down_proj.weight": w for j, w in enumerate(t)})
        else:
            out[name] = t
    return out


def load_hf_llama(folder: str | Path, dtype: torch.dtype | None = None):
    """(model, config) from a Hugging Face Llama, Qwen3 or Qwen3-MoE folder, built on the meta device and filled
    in place. Missing/unexpected tensors and shape mismatches are collected and reported in one UserError."""
    folder = Path(folder)
    cfg = config_from_hf(read_hf_config(folder), str(folder / HF_CONFIG))
    tensors = _unfuse_experts(_read_hf_tensors(folder)) if cfg.n_experts else _read_hf_tensors(folder)
    return fill_from_hf(folder, cfg, tensors, lambda ours: _name_pairs(cfg, ours), dtype)


def read_hf_config(folder: Path) -> dict:
    """The `config.json` of a Hugging Face model folder, as a dict; UserError when it is missing."""
    if not (folder / HF_CONFIG).is_file():
        raise UserError(f"{folder}: no {HF_CONFIG}; point at a Hugging Face model folder")
    return read_json(folder / HF_CONFIG)


def fill_from_hf(folder: Path, cfg: ModelConfig, tensors: dict[str, torch.Tensor], pairs, dtype=None,
                 convert=None):
    """(model, cfg): our GPT for `cfg`, built on the meta device and filled in place from a Llama-layout
    folder's `tensors`: each (our name, their name) that `pairs(our tensor names)` gives, each block's q, k and v
    projections concatenated into our fused `attn.qkv`, and an untied LM head. `convert(our name, tensor)`
    changes a tensor on the way in (Gemma's norm weights) or returns it as it is. Every missing or unexpected
    tensor and shape mismatch is reported in one UserError naming `folder`."""
    from llmscratch.model import GPT

    with torch.device("meta"):
        model = GPT(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    state, missing, mismatched, used = {}, [], [], set()

    def take(ours: str, theirs: list[str]) -> None:
        if any(t not in tensors for t in theirs):
            missing.extend(t for t in theirs if t not in tensors)
            return
        used.update(theirs)
        t = torch.cat([tensors[n] for n in theirs]) if len(theirs) > 1 else tensors[theirs[0]]
        if t.shape != expected[ours]:
            mismatched.append(f"{' + '.join(theirs)} is {tuple(t.shape)}, expected {tuple(expected[ours])}")
            return
        out_dtype = dtype or t.dtype
        t = convert(ours, t) if convert is not None else t
        state[ours] = t.to(out_dtype).contiguous()

    for ours, theirs in pairs(expected):
        take(ours, [theirs])
    for i in range(cfg.n_layers):
        take(f"blocks.{i}.attn.qkv.weight", [f"model.layers.{i}.{n}.weight" for n in _QKV])
    if not cfg.tie_embeddings:
        take("lm_head.weight", ["lm_head.weight"])
    unexpected = sorted(set(tensors) - used - ({"lm_head.weight"} if cfg.tie_embeddings else set()))
    raise_if_unfit(f"{folder}: weights do not fit {HF_CONFIG}", mismatched, missing, unexpected)
    assign_weights(model, state)
    return model.eval(), cfg


def hf_layout(cfg: ModelConfig, ours: dict[str, torch.Tensor], named: dict[str, torch.Tensor]) -> dict:
    """The tensors of a Llama-layout Hugging Face folder: `named` (their name → tensor, the 1:1 ones), plus each
    block's fused `attn.qkv` of `ours` split into q, k and v projections, and an untied LM head; contiguous."""
    tensors = dict(named)
    q_dim, kv_dim = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    for i in range(cfg.n_layers):
        pieces = ours[f"blocks.{i}.attn.qkv.weight"].split([q_dim, kv_dim, kv_dim])
        tensors.update({f"model.layers.{i}.{n}.weight": t for n, t in zip(_QKV, pieces)})
    if not cfg.tie_embeddings:
        tensors["lm_head.weight"] = ours["lm_head.weight"]
    return {k: v.contiguous() for k, v in tensors.items()}


def export_hf_llama(model, out: str | Path) -> Path:
    """Write `model` (a Llama-, Qwen3- or Qwen3-MoE-configured GPT) as a folder `transformers` loads with equal
    logits."""
    cfg: ModelConfig = model.config
    if cfg.n_classes is not None:
        raise UserError(f"this is a classifier (n_classes={cfg.n_classes}); export the base model instead")
    family = _family(cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ours = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    tensors = hf_layout(cfg, ours, {theirs: ours[k] for k, theirs in _name_pairs(cfg, ours)})
    rope = {"rope_theta": cfg.rope_theta, "rope_scaling": None}
    if cfg.rope_scaling:
        s = cfg.rope_scaling
        rope["rope_scaling"] = {"rope_type": "llama3", "factor": s["factor"], "low_freq_factor": s["low_freq_factor"],
                                "high_freq_factor": s["high_freq_factor"],
                                "original_max_position_embeddings": s["original_context_length"]}
    moe = {} if family != "qwen3_moe" else {
        "num_experts": cfg.n_experts, "num_experts_per_tok": cfg.n_experts_per_token,
        "moe_intermediate_size": cfg.moe_d_ff or cfg.d_ff, "norm_topk_prob": cfg.moe_normalize_topk,
        "router_aux_loss_coef": cfg.router_aux_loss_coef, "decoder_sparse_step": 1, "mlp_only_layers": []}
    hf_config = {
        "architectures": [FAMILIES[family]], "model_type": family, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.context_length, "rms_norm_eps": cfg.norm_eps, "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": cfg.tie_embeddings, **rope,
        "torch_dtype": str(next(iter(tensors.values())).dtype).removeprefix("torch."), **moe,
    }
    write_hf_folder(out, tensors, hf_config)
    return out
