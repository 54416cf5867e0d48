"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"; the book's appendix E).

A frozen linear layer W (out, in) learns an update of rank r written as the product of two small matrices:

    y = x Wᵀ + b + (alpha / r) · dropout(x) Aᵀ Bᵀ,     A: (r, in), B: (out, r)

A starts Kaiming-uniform (as `nn.Linear` initialises its weight) and B starts at zero, so at initialisation the
update is exactly zero and the model computes exactly what the base model computes. Only A and B train: for
rank 8 on a 768×768 matrix that is 12,288 numbers instead of 589,824. `merge()` folds the update into W for
inference (no extra matmuls); `unmerge()` puts the original W back bit for bit.

  * `layers`: the `LoRALinear` layer and the module swap (`apply_lora`, `merge_lora`, `lora_disabled`, the
    report and the tensors an adapter file holds);
  * `adapter`: adapter folders — `save_adapter` / `finish_adapter_run` after training, `load_adapter` (base +
    adapter), `load_merged` and `merge_adapter_folder` (`llmscratch lora merge`);
  * Hugging Face PEFT export (`export_peft`, `llmscratch lora export-peft`) lives with the other format
    converters in `llmscratch.weights.peft`;
  * what a run asks for (`LoRASettings`, the target names) is in `llmscratch.lora_settings`, free of PyTorch
    so the command line can describe it.
"""

from llmscratch.lora.adapter import (
    FORMAT,
    adapter_config,
    finish_adapter_run,
    load_adapter,
    load_merged,
    merge_adapter_folder,
    read_adapter_config,
    save_adapter,
)
from llmscratch.lora.layers import (
    LoRAApplied,
    LoRALinear,
    LoRAReport,
    apply_lora,
    in_adapter,
    is_lora_key,
    lora_disabled,
    lora_layers,
    lora_report,
    lora_state_dict,
    merge_lora,
    resolve_targets,
    target_suffixes,
)
from llmscratch.lora_settings import ALIASES, GROUPS, TARGETS_HELP, LoRASettings
from llmscratch.runs import is_adapter_folder
from llmscratch.weights.peft import export_peft, peft_tensors

__all__ = [
    "ALIASES",
    "FORMAT",
    "GROUPS",
    "TARGETS_HELP",
    "LoRAApplied",
    "LoRALinear",
    "LoRAReport",
    "LoRASettings",
    "adapter_config",
    "apply_lora",
    "export_peft",
    "finish_adapter_run",
    "in_adapter",
    "is_adapter_folder",
    "is_lora_key",
    "load_adapter",
    "load_merged",
    "lora_disabled",
    "lora_layers",
    "lora_report",
    "lora_state_dict",
    "merge_adapter_folder",
    "merge_lora",
    "peft_tensors",
    "read_adapter_config",
    "resolve_targets",
    "save_adapter",
    "target_suffixes",
]
