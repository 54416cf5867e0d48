"""The LoRA layer and the module swap that puts it into a model (see the package docstring for the math).

`apply_lora` replaces chosen `nn.Linear` modules of the one `GPT` by a `LoRALinear` that holds the original
layer as `.base`; no second model class exists, and nothing else is attached to the model: what was applied
is read back from the `LoRALinear` layers themselves (`LoRAApplied.of`), apart from the modules trained in full
beside them (a class head), which the caller names again when it saves the adapter.
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from llmscratch.errors import UserError
from llmscratch.lora_settings import ALIASES, GROUPS, TARGETS_HELP, LoRASettings

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
        self.dropout_p = float(dropout)
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
# which layers


def _suffix_match(name: str, suffix: str) -> bool:
    """Whether module `name` ends in `suffix`; an expert of a mixture ("mlp.experts.5.gate") counts as the
    feed-forward layer it is one of ("mlp.gate"), and so does a shared expert ("mlp.shared.gate")."""
    as_layer = re.sub(r"\.(experts\.\d+|shared)\.", ".", name)
    return any(n == suffix or n.endswith("." + suffix) for n in (name, as_layer))


def _head_allowed(token: str, tied: bool, exclude: tuple[str, ...]) -> bool:
    """Whether the LM head, matched by target `token`, may be wrapped. When it may not (tied, or trained in
    full), a group quietly leaves it out; a target that names the head itself is a UserError."""
    if not tied and "lm_head" not in exclude:
        return True
    if token in GROUPS:
        return False
    why = ("is tied to the token embedding (a merged update would change the embedding too)" if tied
           else "is trained in full by this stage")
    raise UserError(f"--lora-targets {token}: the LM head {why}; drop it from the targets")


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
        if "lm_head" in found and not _head_allowed(token, tied, exclude):
            found.remove("lm_head")
        if not found and token not in GROUPS:
            raise UserError(f"--lora-targets: {token!r} matches no linear layer of this model; use {TARGETS_HELP}")
        chosen.update(found)
    if not chosen:
        raise UserError(f"--lora-targets {','.join(tokens)}: no linear layer selected; use {TARGETS_HELP}")
    return [n for n in linears if n in chosen]


def target_suffixes(names: list[str] | tuple[str, ...]) -> list[str]:
    """Block-independent names of wrapped modules ("blocks.3.attn.qkv" → "attn.qkv"), in first-seen order."""
    out: list[str] = []
    for n in names:
        parts = n.split(".")
        s = ".".join(parts[2:]) if parts[0] == "blocks" and len(parts) > 2 else n
        if s not in out:
            out.append(s)
    return out


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


@dataclass(frozen=True)
class LoRAApplied:
    """What `apply_lora` did to a model: the wrapped modules and their (shared) settings, read from the
    `LoRALinear` layers, and `trainable`, the modules trained in full beside them (e.g. a class head), which no
    layer records: whoever applied LoRA with `trainable=...` passes the same names when saving the adapter."""

    modules: tuple[str, ...]
    rank: int
    alpha: float
    dropout: float
    trainable: tuple[str, ...] = ()

    @property
    def targets(self) -> list[str]:
        return target_suffixes(self.modules)

    @classmethod
    def of(cls, model: nn.Module, trainable: tuple[str, ...] | list[str] = ()) -> LoRAApplied:
        """Read from the model's `LoRALinear` layers; ValueError when it has none (or they disagree)."""
        layers = lora_layers(model)
        if not layers:
            raise ValueError("this model has no LoRA layers (apply_lora first)")
        settings = {(m.rank, m.alpha, m.dropout_p) for _, m in layers}
        if len(settings) != 1:
            raise ValueError(f"the model's LoRA layers differ in (rank, alpha, dropout): {sorted(settings)}")
        ((rank, alpha, dropout),) = settings
        return cls(tuple(n for n, _ in layers), rank, alpha, dropout, tuple(trainable))


# ---------------------------------------------------------------------------------------------------------
# the module swap


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def apply_lora(model: nn.Module, targets: str | list[str] = "all", rank: int = 8, alpha: float = 16.0,
               dropout: float = 0.0, trainable: tuple[str, ...] = (), seed: int = 0) -> LoRAApplied:
    """Freeze `model`, swap the selected linear layers for `LoRALinear`s, and leave trainable only their A and B
    and the parameters of the modules named in `trainable` (e.g. ("lm_head",) for a new class head, which is
    then saved in full with the adapter: pass the same `trainable` to `save_adapter`). Returns what was
    applied."""
    LoRASettings(rank, alpha, ",".join(targets) if not isinstance(targets, str) else targets, dropout).check()
    if lora_layers(model):
        raise ValueError("this model already has LoRA layers")
    names = resolve_targets(model, targets, exclude=trainable)
    model.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    for name in names:
        base = model.get_submodule(name)
        _replace(model, name, LoRALinear(base, rank, alpha, dropout, generator=g).train(base.training))
    for name in trainable:
        model.get_submodule(name).requires_grad_(True)
    return LoRAApplied.of(model, trainable)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain `nn.Linear`s back: an ordinary GPT, the same
    function as the adapted one. (To merge and unmerge in place instead, call each layer's merge/unmerge.)"""
    for name, layer in lora_layers(model):
        layer.merge(keep_original=False)
        _replace(model, name, layer.base)
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


# ---------------------------------------------------------------------------------------------------------
# what trains, and what an adapter file holds


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


def is_lora_key(name: str) -> bool:
    return name.endswith((".lora_A", ".lora_B"))


def lora_report(model: nn.Module) -> LoRAReport:
    """Counts of a model after `apply_lora` (distinct parameters: a tied head counts once). The modules trained
    in full are those with a trainable parameter that is not an adapter's."""
    params = dict(model.named_parameters())  # one name per distinct parameter
    layers = lora_layers(model)
    applied = LoRAApplied.of(model) if layers else LoRAApplied((), 0, 0.0, 0.0)
    extra: list[str] = []
    for name, p in params.items():
        module = name.rpartition(".")[0]
        if p.requires_grad and not is_lora_key(name) and module not in extra:
            extra.append(module)
    return LoRAReport(
        layers=len(layers), targets=applied.targets, rank=applied.rank, alpha=applied.alpha,
        lora_params=sum(m.lora_A.numel() + m.lora_B.numel() for _, m in layers),
        trainable=sum(p.numel() for p in params.values() if p.requires_grad),
        total=sum(p.numel() for p in params.values()), extra_trainable=extra)


def in_adapter(key: str, trainable: tuple[str, ...] | list[str]) -> bool:
    """Whether state-dict entry `key` belongs in an adapter file: an A or B, or a tensor of a module trained in
    full."""
    return is_lora_key(key) or key.startswith(tuple(f"{m}." for m in trainable))


def lora_state_dict(model: nn.Module, trainable: tuple[str, ...] | list[str] = ()) -> dict[str, torch.Tensor]:
    """What an adapter file holds: every lora_A / lora_B, and the full tensors of the modules trained in full
    (`apply_lora(trainable=...)`, named again here), by their names in the model's state dict."""
    if not lora_layers(model):
        raise ValueError("this model has no LoRA layers (apply_lora first)")
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if in_adapter(k, trainable)}
