"""Model configuration: one typed dataclass and the named presets built from it."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from llmscratch.errors import UserError


@dataclass
class ModelConfig:
    """Shape and options of the one decoder-only transformer (`llmscratch.model.GPT`)."""

    name: str = "custom"  # preset name, kept for reports and checkpoints
    vocab_size: int = 50257  # number of token ids the tokenizer can produce
    context_length: int = 1024  # longest sequence the position embedding covers
    d_model: int = 768  # width of the residual stream (the book's emb_dim)
    n_layers: int = 12  # number of transformer blocks
    n_heads: int = 12  # query heads per attention layer
    n_kv_heads: int | None = None  # key/value heads; None = n_heads (MHA), fewer = grouped-query attention
    d_ff: int | None = None  # hidden width of the feed-forward net; None = 4 * d_model as in GPT-2
    dropout: float = 0.0  # dropout on embeddings, attention weights and residual branches (book: 0.1)
    qkv_bias: bool = True  # bias on the query/key/value projections (OpenAI's GPT-2 weights have it)
    bias: bool = True  # bias on the other linear layers and the norms
    tie_embeddings: bool = True  # LM head shares the token-embedding matrix (GPT-2 does)
    norm_eps: float = 1e-5  # epsilon inside LayerNorm
    init_std: float = 0.02  # std of the normal init (GPT-2); PyTorch's N(0, 1) embedding init learns badly
    n_classes: int | None = None  # set: the head maps to class logits (a classifier), not to the vocabulary
    extra: dict = field(default_factory=dict)  # free-form notes carried into config.json

    def __post_init__(self) -> None:
        problems = []
        for f in dataclasses.fields(self):
            value, type_name = getattr(self, f.name), str(f.type)
            if value is None and "None" in type_name:
                continue
            kind = {"int": int, "float": (int, float), "bool": bool, "str": str}.get(type_name.split(" ")[0])
            if kind and (not isinstance(value, kind) or (kind is not bool and isinstance(value, bool))):
                problems.append(f"{f.name} must be {type_name.split(' ')[0]}, got {value!r}")
        if problems:
            raise UserError("invalid model config: " + "; ".join(problems))
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model
        for name in ("vocab_size", "context_length", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if problems:
            raise UserError("invalid model config: " + "; ".join(problems))
        if self.d_model % self.n_heads:
            problems.append(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            problems.append(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        if self.n_classes is not None and (self.n_classes < 2 or self.tie_embeddings):
            problems.append(f"n_classes={self.n_classes} needs at least 2 classes and tie_embeddings=False")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        if problems:
            raise UserError("invalid model config: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"{source}: unknown model config key(s) {unknown}; valid keys: {sorted(known)}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise UserError(f"{source}: {exc}") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: config file not found")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise UserError(f"{path}: expected a JSON object of model config fields")
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_preset(cls, name: str, **overrides) -> ModelConfig:
        if name not in PRESETS:
            raise UserError(f"unknown model preset {name!r}; valid presets: {', '.join(PRESETS)}")
        return cls.from_dict({"name": name, **PRESETS[name], **overrides}, source=f"preset {name}")


# GPT-2 shapes from OpenAI's released hparams.json files (n_embd, n_layer, n_head; n_ctx 1024, vocab 50257).
_GPT2 = dict(vocab_size=50257, context_length=1024, qkv_bias=True, bias=True, tie_embeddings=True)

PRESETS: dict[str, dict] = {
    "gpt2-124m": dict(_GPT2, d_model=768, n_layers=12, n_heads=12),
    "gpt2-355m": dict(_GPT2, d_model=1024, n_layers=24, n_heads=16),
    "gpt2-774m": dict(_GPT2, d_model=1280, n_layers=36, n_heads=20),
    "gpt2-1558m": dict(_GPT2, d_model=1600, n_layers=48, n_heads=25),
    # Small presets for a CPU. Their vocab_size is a default: training sets it from the tokenizer.
    # gpt-mini: ~10.6M parameters outside the embeddings (~12M with a 4096-token vocabulary).
    "gpt-mini": dict(vocab_size=4096, context_length=256, d_model=384, n_layers=6, n_heads=6),
    # gpt-tiny: ~3.2M parameters outside the embeddings; learns most per CPU-minute (the quickstart's model).
    "gpt-tiny": dict(vocab_size=4096, context_length=256, d_model=256, n_layers=4, n_heads=4),
    # gpt-micro: ~0.13M parameters, for tests and smoke runs.
    "gpt-micro": dict(vocab_size=512, context_length=64, d_model=64, n_layers=2, n_heads=4),
}
