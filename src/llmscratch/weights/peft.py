"""Our LoRA adapter folder → Hugging Face PEFT's `adapter_config.json` + `adapter_model.safetensors`, for the base
model exported by `llmscratch convert to-hf` (GPT-2, Llama and Qwen3 layouts): `llmscratch lora export-peft`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from llmscratch.errors import UserError
from llmscratch.runs import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_WEIGHTS, check_out_folder, write_folder

# Our module suffix → (PEFT module suffix under the HF model, its name in target_modules). GPT-2's layers are
# Conv1D (weights stored (in, out)); PEFT keeps lora_A (r, in) and lora_B (out, r) for them as for nn.Linear and
# transposes the product itself (fan_in_fan_out), so our A and B go over unchanged.
_GPT2_PEFT = {"attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj", "mlp.fc": "mlp.c_fc", "mlp.proj": "mlp.c_proj"}
_LLAMA_PEFT = {"attn.proj": "self_attn.o_proj", "mlp.gate": "mlp.gate_proj", "mlp.up": "mlp.up_proj",
               "mlp.proj": "mlp.down_proj"}
_LLAMA_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_PREFIX = {"gpt2": "base_model.model.transformer.h", "llama": "base_model.model.model.layers"}


def _peft_family(cfg) -> str:
    if cfg.n_experts or cfg.attention != "standard" or "sliding" in cfg.sliding_layers:
        raise UserError(f"{cfg.name}: PEFT export knows the dense GPT-2 and Llama/Qwen3 layouts only (not a mixture "
                        "of experts, latent or sliding-window attention); merge the adapter with `llmscratch lora "
                        "merge` instead")
    if (cfg.norm, cfg.mlp, cfg.position) == ("layernorm", "gelu", "learned"):
        return "gpt2"
    if (cfg.norm, cfg.mlp, cfg.position) == ("rmsnorm", "swiglu", "rope"):
        return "llama"
    raise UserError(f"{cfg.name}: PEFT export knows the GPT-2 and Llama/Qwen3 layouts only; merge the adapter with "
                    "`llmscratch lora merge` instead")


def _peft_modules(module: str, family: str, cfg, a: torch.Tensor, b: torch.Tensor):
    """(PEFT module path, its target_modules name, A, B) for our wrapped module `module` ("blocks.3.attn.qkv")."""
    if module == "lm_head":
        return [("base_model.model.lm_head", "lm_head", a, b)]
    _, i, suffix = module.split(".", 2)
    prefix = f"{_PREFIX[family]}.{i}"
    if family == "gpt2":
        return [(f"{prefix}.{_GPT2_PEFT[suffix]}", _GPT2_PEFT[suffix], a, b)]
    if suffix == "attn.qkv":
        q_dim, kv_dim = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        return [(f"{prefix}.{name}", name, a.clone(), rows)
                for name, rows in zip(_LLAMA_QKV, b.split([q_dim, kv_dim, kv_dim]))]
    return [(f"{prefix}.{_LLAMA_PEFT[suffix]}", _LLAMA_PEFT[suffix], a, b)]


def peft_tensors(adapter_cfg: dict, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str],
                                                                               bool]:
    """Our adapter tensors → (PEFT's tensors, target_modules, fan_in_fan_out) for the Hugging Face model that
    `convert to-hf` writes. Llama/Qwen3 split our fused qkv into q/k/v_proj: each gets the same A and its rows
    of B, which is exactly the same update (B A split by rows) at the same rank."""
    from llmscratch.config import ModelConfig

    cfg = ModelConfig.from_dict(adapter_cfg["model"], source=f"{ADAPTER_CONFIG} (model)")
    if adapter_cfg["trainable_modules"] or cfg.n_classes is not None:
        raise UserError("this adapter also trains modules in full (e.g. a class head); Hugging Face's causal-LM "
                        "export has no place for them — merge it with `llmscratch lora merge` instead")
    family = _peft_family(cfg)
    out: dict[str, torch.Tensor] = {}
    targets: list[str] = []
    for module in adapter_cfg["modules"]:
        a, b = tensors[f"{module}.lora_A"], tensors[f"{module}.lora_B"]
        for theirs, target, a_part, b_part in _peft_modules(module, family, cfg, a, b):
            out[f"{theirs}.lora_A.weight"] = a_part.contiguous()
            out[f"{theirs}.lora_B.weight"] = b_part.contiguous()
            if target not in targets:
                targets.append(target)
    return out, targets, family == "gpt2"


def peft_config(adapter_cfg: dict, targets: list[str], fan_in_fan_out: bool, base_hf: str | None) -> dict:
    """PEFT's adapter_config.json for our adapter config (inference mode, plain LoRA)."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": int(adapter_cfg["rank"]),
        "lora_alpha": adapter_cfg["alpha"], "lora_dropout": adapter_cfg.get("dropout", 0.0),
        "target_modules": targets, "fan_in_fan_out": fan_in_fan_out,
        "bias": "none", "modules_to_save": None, "init_lora_weights": True, "use_rslora": False,
        "use_dora": False, "inference_mode": True, "rank_pattern": {}, "alpha_pattern": {},
        "layers_to_transform": None, "layers_pattern": None,
        "base_model_name_or_path": base_hf or adapter_cfg["base"]["path"],
    }


def export_peft(folder: str | Path, out: str | Path, base_hf: str | None = None, overwrite: bool = False) -> Path:
    """`llmscratch lora export-peft`: PEFT's adapter_config.json + adapter_model.safetensors in `out`, to load
    with `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE_HF), out)` where BASE_HF is the
    base checkpoint exported by `llmscratch convert to-hf`."""
    from safetensors.torch import save_file

    from llmscratch.checkpoint import load_state_dict
    from llmscratch.fileio import atomic_write, atomic_write_text
    from llmscratch.lora.adapter import read_adapter_config

    folder = Path(folder)
    check_out_folder(out, overwrite, inputs=(folder,))
    cfg = read_adapter_config(folder)
    tensors, targets, fan_in_fan_out = peft_tensors(cfg, load_state_dict(folder / ADAPTER_WEIGHTS))
    config = peft_config(cfg, targets, fan_in_fan_out, base_hf)

    def write(tmp: Path) -> None:
        atomic_write(tmp / PEFT_WEIGHTS, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
        atomic_write_text(tmp / ADAPTER_CONFIG, json.dumps(config, indent=2) + "\n")

    return write_folder(out, write, overwrite, inputs=(folder,))
