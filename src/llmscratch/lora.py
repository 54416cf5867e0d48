"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"; the book's appendix E).

A frozen linear layer W (out, in) learns an update of rank r written as the product of two small matrices:

    y = x Wᵀ + b + (alpha / r) · dropout(x) Aᵀ Bᵀ,     A: (r, in), B: (out, r)

A starts Kaiming-uniform (as `nn.Linear` initialises its weight) and B starts at zero, so at initialisation the
update is exactly zero and the model computes exactly what the base model computes. Only A and B train: for
rank 8 on a 768×768 matrix that is 12,288 numbers instead of 589,824. `merge()` folds the update into W for
inference (no extra matmuls); `unmerge()` puts the original W back bit for bit.

LoRA enters the model by a module swap: `apply_lora` replaces chosen `nn.Linear` modules of the one `GPT` by a
`LoRALinear` that holds the original layer as `.base`; no second model class exists. An adapter folder
(`save_adapter`) holds only the trained tensors and a reference to the base checkpoint:

    adapter.safetensors    lora_A / lora_B of each wrapped layer (+ fully trained modules, e.g. a class head)
    adapter_config.json    rank, alpha, dropout, targets, the tuned model's config, and the base checkpoint's
                           path and sha256
    tokenizer files, and what the stage adds (prompt_style.json, labels.json, hyperparameters.yaml)

`load_adapter` rebuilds base + adapter; `merge_lora` turns that into a plain GPT (`llmscratch lora merge`);
`export_peft` writes Hugging Face PEFT's `adapter_config.json` + `adapter_model.safetensors` for the base
model exported by `llmscratch convert to-hf` (GPT-2, Llama and Qwen3 layouts).
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from llmscratch.errors import UserError, read_json
from llmscratch.fileio import sha256_of
from llmscratch.lora_settings import ALIASES, GROUPS, TARGETS_HELP, LoRASettings  # noqa: F401 (re-exported)

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
FORMAT = "llmscratch-lora"

# ---------------------------------------------------------------------------------------------------------
# the layer


class LoRALinear(nn.Module):
    """`base` (a frozen nn.Linear) plus a trainable rank-`rank` update scaled by alpha / rank.

    `weight` is the weight the layer applies (W + scale·B·A, or W when merged or disabled), so code that reads
    a linear layer's matrix directly — the fused LM-head loss does — sees the adapted one too."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 generator: torch.Generator | None = None):
        super().__init__()
        if rank <= 0:
            raise UserError(f"--lora-rank must be positive, got {rank}")
        self.base = base
        self.rank, self.alpha, self.scale = rank, float(alpha), float(alpha) / rank
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=w.dtype, device=w.device))
        # A as nn.Linear initialises its weight (Kaiming-uniform with a=√5, the LoRA paper's and PEFT's choice),
        # drawn in fp32 on the CPU so a seed gives the same A on any device; B = 0 makes the update exactly zero.
        a = torch.empty(rank, base.in_features)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        with torch.no_grad():
            self.lora_A.copy_(a)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False  # the update is folded into base.weight
        self.disabled = False  # the update is switched off (the base model's outputs)
        self._unmerged: torch.Tensor | None = None  # the exact base weight while merged

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def bias(self):
        return self.base.bias

    @property
    def weight(self) -> torch.Tensor:
        if self.merged or self.disabled:
            return self.base.weight
        return self.base.weight + self.delta_weight().to(self.base.weight.dtype)

    def delta_weight(self) -> torch.Tensor:
        """scale · B A, the (out, in) update of the base weight."""
        return (self.lora_B @ self.lora_A) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged or self.disabled:
            return y
        # Two thin matmuls (in → r → out) instead of materialising the (out, in) update.
        return y + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scale

    @torch.no_grad()
    def merge(self, keep_original: bool = True) -> None:
        """Fold the update into the base weight (computed in fp32). With `keep_original`, the exact base weight
        is kept aside so `unmerge` restores it bit for bit (W + Δ - Δ is not W in floating point)."""
        if self.merged:
            return
        w = self.base.weight
        self._unmerged = w.detach().clone() if keep_original else None
        w.copy_((w.float() + self.delta_weight().float()).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo `merge`: the kept base weight comes back exactly (else the update is subtracted)."""
        if not self.merged:
            return
        w = self.base.weight
        if self._unmerged is not None:
            w.copy_(self._unmerged)
        else:
            w.copy_((w.float() - self.delta_weight().float()).to(w.dtype))
        self._unmerged = None
        self.merged = False

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"alpha={self.alpha:g}, merged={self.merged}")


# ---------------------------------------------------------------------------------------------------------
# applying LoRA to a model


def _suffix_match(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def resolve_targets(model: nn.Module, targets: str | list[str] | tuple[str, ...],
                    exclude: tuple[str, ...] = ()) -> list[str]:
    """The names of the `nn.Linear` modules of `model` that `targets` selects (see ALIASES), in model order.

    The LM head is left out of the groups when it is tied to the token embedding (merging an update into it
    would change the embedding too) or listed in `exclude` (a head trained in full); naming it explicitly
    then is a UserError."""
    tokens = [t.strip() for t in (targets.split(",") if isinstance(targets, str) else targets) if t.strip()]
    if not tokens:
        raise UserError(f"--lora-targets is empty; use {TARGETS_HELP}")
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    tied = bool(getattr(getattr(model, "config", None), "tie_embeddings", False))
    chosen: set[str] = set()
    for token in tokens:
        suffixes = ALIASES.get(token, (token,))
        found = [n for n in linears if any(_suffix_match(n, s) for s in suffixes)]
        head_named = token not in GROUPS and "lm_head" in found
        if "lm_head" in found and (tied or "lm_head" in exclude):
            if head_named:
                why = ("is tied to the token embedding (a merged update would change the embedding too)" if tied
                       else "is trained in full by this stage")
                raise UserError(f"--lora-targets {token}: the LM head {why}; drop it from the targets")
            found.remove("lm_head")
        if not found and token not in GROUPS:
            raise UserError(f"--lora-targets: {token!r} matches no linear layer of this model; use {TARGETS_HELP}")
        chosen.update(found)
    if not chosen:
        raise UserError(f"--lora-targets {','.join(tokens)}: no linear layer selected; use {TARGETS_HELP}")
    return [n for n in linears if n in chosen]


def target_suffixes(names: list[str]) -> list[str]:
    """Block-independent names of wrapped modules ("blocks.3.attn.qkv" → "attn.qkv"), in first-seen order."""
    out: list[str] = []
    for n in names:
        parts = n.split(".")
        s = ".".join(parts[2:]) if parts[0] == "blocks" and len(parts) > 2 else n
        if s not in out:
            out.append(s)
    return out


def apply_lora(model: nn.Module, targets: str | list[str] = "all", rank: int = 8, alpha: float = 16.0,
               dropout: float = 0.0, trainable: tuple[str, ...] = (), seed: int = 0) -> list[str]:
    """Freeze `model`, swap the selected linear layers for `LoRALinear`s, and leave trainable only their A and B
    and the parameters of the modules named in `trainable` (e.g. ("lm_head",) for a new class head, which is
    then saved in full with the adapter). Returns the wrapped module names; `model.lora` records the settings."""
    LoRASettings(rank, alpha, ",".join(targets) if not isinstance(targets, str) else targets, dropout).check()
    if getattr(model, "lora", None) is not None:
        raise ValueError("this model already has LoRA layers")
    names = resolve_targets(model, targets, exclude=trainable)
    model.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        layer = LoRALinear(base, rank, alpha, dropout, generator=g).train(base.training)  # keep eval/train mode
        setattr(parent, child, layer)
    for name in trainable:
        model.get_submodule(name).requires_grad_(True)
    model.lora = {"rank": rank, "alpha": float(alpha), "dropout": float(dropout), "modules": names,
                  "targets": target_suffixes(names), "trainable": list(trainable)}
    return names


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain `nn.Linear`s back: an ordinary GPT, the same
    function as the adapted one. (To merge and unmerge in place instead, call each layer's merge/unmerge.)"""
    for name, layer in lora_layers(model):
        layer.merge(keep_original=False)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.base)
    if getattr(model, "lora", None) is not None:
        del model.lora
    return model


@contextlib.contextmanager
def lora_disabled(model: nn.Module):
    """Inside the block the adapters are off: the model computes the base model's outputs (DPO uses this as its
    reference model, so no second copy of the weights is needed)."""
    layers = [m for _, m in lora_layers(model)]
    before = [m.disabled for m in layers]
    for m in layers:
        m.disabled = True
    try:
        yield model
    finally:
        for m, b in zip(layers, before):
            m.disabled = b


@dataclass
class LoRAReport:
    """Trainable vs total parameters of a model with adapters."""

    layers: int
    targets: list[str]
    rank: int
    alpha: float
    lora_params: int
    trainable: int
    total: int
    extra_trainable: list[str] = field(default_factory=list)

    @property
    def fraction(self) -> float:
        return self.trainable / max(1, self.total)

    def __str__(self) -> str:
        extra = f" + {', '.join(self.extra_trainable)} in full" if self.extra_trainable else ""
        return (f"LoRA rank {self.rank}, alpha {self.alpha:g} on {self.layers} layers "
                f"({', '.join(self.targets)}){extra}: {self.trainable:,} trainable of {self.total:,} parameters "
                f"({self.fraction:.2%}; adapters {self.lora_params:,})")


def lora_report(model: nn.Module) -> LoRAReport:
    """Counts of a model after `apply_lora` (distinct parameters: a tied head counts once)."""
    params = {id(p): p for p in model.parameters()}.values()
    layers = lora_layers(model)
    info = getattr(model, "lora", None) or {}
    return LoRAReport(
        layers=len(layers), targets=list(info.get("targets", [])), rank=int(info.get("rank", 0)),
        alpha=float(info.get("alpha", 0.0)),
        lora_params=sum(m.lora_A.numel() + m.lora_B.numel() for _, m in layers),
        trainable=sum(p.numel() for p in params if p.requires_grad), total=sum(p.numel() for p in params),
        extra_trainable=list(info.get("trainable", [])))


def is_lora_key(name: str) -> bool:
    return name.endswith((".lora_A", ".lora_B"))


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What an adapter file holds: every lora_A / lora_B, and the full tensors of the modules trained in full
    (`apply_lora(trainable=...)`), by their names in the model's state dict."""
    info = getattr(model, "lora", None)
    if info is None:
        raise ValueError("this model has no LoRA layers (apply_lora first)")
    keep = tuple(f"{m}." for m in info["trainable"])
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
            if is_lora_key(k) or k.startswith(keep)}


# ---------------------------------------------------------------------------------------------------------
# adapter folders


def is_adapter_folder(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def save_adapter(directory: str | Path, model: nn.Module, base: str | Path, tokenizer=None,
                 hyperparameters: dict | None = None) -> Path:
    """Write the adapter of `model` (adapter.safetensors + adapter_config.json, the tokenizer, and
    hyperparameters.yaml) into `directory`; `base` is the checkpoint folder the adapter was trained on."""
    import yaml
    from safetensors.torch import save_file

    from llmscratch.checkpoint import CONFIG, HPARAMS, WEIGHTS, find_model_folder
    from llmscratch.fileio import atomic_write, atomic_write_text

    info = getattr(model, "lora", None)
    if info is None:
        raise ValueError("this model has no LoRA layers (apply_lora first)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    base_folder = find_model_folder(base).resolve()
    tensors = lora_state_dict(model)
    config = {
        "format": FORMAT, "version": 1,
        "rank": info["rank"], "alpha": info["alpha"], "dropout": info["dropout"],
        "targets": info["targets"], "modules": info["modules"], "trainable_modules": info["trainable"],
        "base": {"path": str(base_folder), "sha256": sha256_of(base_folder / WEIGHTS),
                 "config": json.loads((base_folder / CONFIG).read_text())},
        "model": model.config.to_dict(),  # the tuned model's config (a classifier's differs from its base's)
    }
    atomic_write(directory / ADAPTER_WEIGHTS, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    atomic_write_text(directory / ADAPTER_CONFIG, json.dumps(config, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save(directory)
    if hyperparameters is not None:
        atomic_write_text(directory / HPARAMS, yaml.safe_dump(hyperparameters, sort_keys=False))
    return directory


def finish_adapter_run(out: str | Path, model: nn.Module, base: str | Path, tokenizer=None) -> Path:
    """After a LoRA training run: `out` becomes an adapter folder. The trainer wrote the full adapted model
    there (and hyperparameters.yaml, kept); the model is replaced by the adapter alone (the resumable
    checkpoints/ keep the full state)."""
    from llmscratch.checkpoint import CONFIG, WEIGHTS

    out = Path(out)
    save_adapter(out, model, base, tokenizer)
    for name in (WEIGHTS, CONFIG):
        (out / name).unlink(missing_ok=True)
    return out


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
    missing = [k for k in ("rank", "alpha", "modules", "trainable_modules", "base", "model") if k not in cfg]
    if missing:
        raise UserError(f"{path}: missing key(s) {', '.join(missing)}")
    return cfg


def load_adapter(folder: str | Path, base: str | Path | None = None, device: str | torch.device = "cpu",
                 check_base: bool = True):
    """(model with the adapter applied, unmerged; tokenizer; adapter config) from an adapter folder.

    The base checkpoint is the one recorded in adapter_config.json, or `base` when given (a moved copy). When
    its weights' sha256 differs from the recorded one, a UserError says so (`check_base=False` skips that)."""
    from llmscratch.checkpoint import (
        WEIGHTS,
        find_model_folder,
        load_model,
        load_state_dict,
        model_state,
        raise_if_unfit,
    )
    from llmscratch.config import ModelConfig
    from llmscratch.model import GPT
    from llmscratch.tokenizer import load_tokenizer

    folder = Path(folder)
    cfg = read_adapter_config(folder)
    base_path = Path(base) if base is not None else Path(cfg["base"]["path"])
    if not base_path.exists():
        raise UserError(f"{folder / ADAPTER_CONFIG}: base checkpoint {base_path} not found; pass the base "
                        "folder's new location with --base")
    base_folder = find_model_folder(base_path)
    if check_base and cfg["base"].get("sha256") and sha256_of(base_folder / WEIGHTS) != cfg["base"]["sha256"]:
        raise UserError(f"{base_folder / WEIGHTS}: not the weights this adapter was trained on (sha256 differs "
                        f"from {folder / ADAPTER_CONFIG}); point --base at the original base checkpoint")
    base_model = load_model(base_folder)
    tuned_cfg = ModelConfig.from_dict(cfg["model"], source=f"{folder / ADAPTER_CONFIG} (model)")
    trainable = tuple(cfg["trainable_modules"])
    if tuned_cfg.to_dict() == base_model.config.to_dict():
        model = base_model
    else:  # the stage changed the model around the base (e.g. a class head): base weights where they fit
        if (tuned_cfg.d_model, tuned_cfg.n_layers) != (base_model.config.d_model, base_model.config.n_layers):
            raise UserError(f"{folder}: the adapter's model ({tuned_cfg.d_model} wide, {tuned_cfg.n_layers} "
                            f"layers) does not fit the base {base_folder}")
        with torch.device("meta"):
            model = GPT(tuned_cfg)
        state = {k: v for k, v in model_state(base_model).items() if not k.startswith(tuple(f"{m}." for m in
                                                                                            trainable))}
        model.load_state_dict(state, strict=False, assign=True)
    apply_lora(model, list(cfg["targets"]), int(cfg["rank"]), float(cfg["alpha"]), float(cfg.get("dropout", 0.0)),
               trainable=trainable)
    if model.lora["modules"] != list(cfg["modules"]):
        raise UserError(f"{folder / ADAPTER_CONFIG}: its layers do not match the base model's "
                        f"(first expected {cfg['modules'][:2]}, got {model.lora['modules'][:2]})")
    tensors = load_state_dict(folder / ADAPTER_WEIGHTS)
    expected = {k: v.shape for k, v in model.state_dict().items()
                if is_lora_key(k) or k.startswith(tuple(f"{m}." for m in trainable))}
    mismatched = [f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(expected[k])}"
                  for k in expected if k in tensors and tensors[k].shape != expected[k]]
    raise_if_unfit(f"{folder / ADAPTER_WEIGHTS}: does not fit {ADAPTER_CONFIG}", mismatched,
                   sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected)))
    model.load_state_dict(tensors, strict=False, assign=any(t.is_meta for t in model.parameters()))
    if tuned_cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    try:  # the adapter folder keeps a copy of the tokenizer; an adapter saved without one uses the base's
        tok = load_tokenizer(folder)
    except UserError:
        tok = load_tokenizer(base_folder)
    return model.to(device).eval(), tok, cfg


def load_merged(folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                base: str | Path | None = None):
    """(plain merged model, tokenizer) from an adapter folder: what `llmscratch generate ADAPTER_DIR` runs."""
    model, tok, _ = load_adapter(folder, base)
    model = merge_lora(model)
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    return model.eval(), tok


def merge_adapter_folder(folder: str | Path, out: str | Path, base: str | Path | None = None) -> Path:
    """`llmscratch lora merge`: base + adapter → a full checkpoint folder at `out` (new or empty), with the
    adapter folder's prompt style, labels and hyperparameters; written beside `out` and renamed when complete."""
    import shutil

    import yaml

    from llmscratch.checkpoint import HPARAMS, save_model
    from llmscratch.weights.convert import check_new_folder, write_folder

    folder = Path(folder)
    check_new_folder(out)
    model, tok, cfg = load_adapter(folder, base)
    merge_lora(model)
    hp = {}
    if (folder / HPARAMS).is_file():
        hp = yaml.safe_load((folder / HPARAMS).read_text()) or {}
    hp["merged_from"] = {"adapter": str(folder.resolve()), "base": str(Path(base or cfg["base"]["path"]))}

    def write(tmp: Path) -> None:
        save_model(tmp, model, tok, hp)
        for extra in ("prompt_style.json", "labels.json"):
            if (folder / extra).is_file():
                shutil.copy2(folder / extra, tmp / extra)

    return write_folder(out, write)


# ---------------------------------------------------------------------------------------------------------
# Hugging Face PEFT export

# Our module suffix → (PEFT module suffix under the HF model, its name in target_modules). GPT-2's layers are
# Conv1D (weights stored (in, out)); PEFT keeps lora_A (r, in) and lora_B (out, r) for them as for nn.Linear and
# transposes the product itself (fan_in_fan_out), so our A and B go over unchanged.
_GPT2_PEFT = {"attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj", "mlp.fc": "mlp.c_fc", "mlp.proj": "mlp.c_proj"}
_LLAMA_PEFT = {"attn.proj": "self_attn.o_proj", "mlp.gate": "mlp.gate_proj", "mlp.up": "mlp.up_proj",
               "mlp.proj": "mlp.down_proj"}
_LLAMA_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")


def _peft_family(cfg) -> str:
    if (cfg.norm, cfg.mlp, cfg.position) == ("layernorm", "gelu", "learned"):
        return "gpt2"
    if (cfg.norm, cfg.mlp, cfg.position) == ("rmsnorm", "swiglu", "rope"):
        return "llama"
    raise UserError("PEFT export knows GPT-2 and Llama/Qwen3 layouts only")


def peft_tensors(adapter_cfg: dict, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str],
                                                                               bool]:
    """Our adapter tensors → (PEFT's tensors, target_modules, fan_in_fan_out) for the Hugging Face model that
    `convert to-hf` writes. Llama/Qwen3 split our fused qkv into q/k/v_proj: each gets the same A and its rows
    of B, which is exactly the same update (B A split by rows) at the same rank."""
    from llmscratch.config import ModelConfig

    cfg = ModelConfig.from_dict(adapter_cfg["model"], source="adapter_config.json (model)")
    if adapter_cfg["trainable_modules"] or cfg.n_classes is not None:
        raise UserError("this adapter also trains modules in full (e.g. a class head); Hugging Face's causal-LM "
                        "export has no place for them — merge it with `llmscratch lora merge` instead")
    family = _peft_family(cfg)
    prefix = "base_model.model.transformer.h" if family == "gpt2" else "base_model.model.model.layers"
    out: dict[str, torch.Tensor] = {}
    targets: list[str] = []

    def put(theirs: str, target: str, a: torch.Tensor, b: torch.Tensor) -> None:
        out[f"{theirs}.lora_A.weight"] = a.contiguous()
        out[f"{theirs}.lora_B.weight"] = b.contiguous()
        if target not in targets:
            targets.append(target)

    q_dim, kv_dim = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    for module in adapter_cfg["modules"]:
        a, b = tensors[f"{module}.lora_A"], tensors[f"{module}.lora_B"]
        if module == "lm_head":
            put("base_model.model.lm_head", "lm_head", a, b)
            continue
        _, i, suffix = module.split(".", 2)
        if family == "gpt2":
            put(f"{prefix}.{i}.{_GPT2_PEFT[suffix]}", _GPT2_PEFT[suffix], a, b)
        elif suffix == "attn.qkv":
            for name, rows in zip(_LLAMA_QKV, b.split([q_dim, kv_dim, kv_dim])):
                put(f"{prefix}.{i}.{name}", name, a.clone(), rows)
        else:
            put(f"{prefix}.{i}.{_LLAMA_PEFT[suffix]}", _LLAMA_PEFT[suffix], a, b)
    return out, targets, family == "gpt2"


def export_peft(folder: str | Path, out: str | Path, base_hf: str | None = None) -> Path:
    """`llmscratch lora export-peft`: PEFT's adapter_config.json + adapter_model.safetensors in `out`, to load
    with `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE_HF), out)` where BASE_HF is the
    base checkpoint exported by `llmscratch convert to-hf`."""
    from safetensors.torch import save_file

    from llmscratch.checkpoint import load_state_dict
    from llmscratch.fileio import atomic_write, atomic_write_text
    from llmscratch.weights.convert import check_new_folder, write_folder

    folder = Path(folder)
    check_new_folder(out)
    cfg = read_adapter_config(folder)
    tensors, targets, fan_in_fan_out = peft_tensors(cfg, load_state_dict(folder / ADAPTER_WEIGHTS))
    peft_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": int(cfg["rank"]), "lora_alpha": cfg["alpha"],
        "lora_dropout": cfg.get("dropout", 0.0), "target_modules": targets, "fan_in_fan_out": fan_in_fan_out,
        "bias": "none", "modules_to_save": None, "init_lora_weights": True, "use_rslora": False,
        "use_dora": False, "inference_mode": True, "rank_pattern": {}, "alpha_pattern": {},
        "layers_to_transform": None, "layers_pattern": None,
        "base_model_name_or_path": base_hf or cfg["base"]["path"],
    }

    def write(tmp: Path) -> None:
        atomic_write(tmp / "adapter_model.safetensors",
                     lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
        atomic_write_text(tmp / "adapter_config.json", json.dumps(peft_config, indent=2) + "\n")

    return write_folder(out, write)
