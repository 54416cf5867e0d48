"""Model configuration: one typed dataclass and the named presets built from it."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from llmscratch.errors import UserError, read_json_object


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
    head_dim: int | None = None  # width of one attention head; None = d_model // n_heads (Qwen3 sets it wider)
    #                              MLA: a head's non-rotary query/key part and its value (+ rope_head_dim for q, k)
    norm: str = "layernorm"  # "layernorm" (GPT-2) or "rmsnorm" (Llama, Qwen)
    mlp: str = "gelu"  # "gelu": GPT-2's two-layer MLP; "swiglu": the gated three-matrix one of Llama and Qwen
    position: str = "learned"  # "learned" absolute position embeddings (GPT-2) or "rope" rotary (Llama, Qwen)
    rope_theta: float = 10000.0  # RoPE base: frequencies theta^(-2i/head_dim)
    rope_scaling: dict | None = None  # Llama 3 frequency scaling: factor, low_freq_factor, high_freq_factor,
    #                                   original_context_length (model/rope.py)
    qk_norm: bool = False  # RMSNorm over each head's queries and keys before RoPE (Qwen3)
    n_classes: int | None = None  # set: the head maps to class logits (a classifier), not to the vocabulary
    # Mixture of experts (Qwen3-MoE): every block's feed-forward net becomes a router over SwiGLU experts.
    n_experts: int = 0  # 0: one dense feed-forward net; > 0: that many experts per block
    n_experts_per_token: int = 2  # top-k: the experts each token is sent to
    moe_d_ff: int | None = None  # hidden width of one expert; None = d_ff
    shared_expert_d_ff: int = 0  # > 0: a shared SwiGLU expert of that width that every token also goes through
    moe_normalize_topk: bool = True  # rescale the chosen experts' router probabilities to sum to 1 (Qwen3-MoE)
    router_aux_loss_coef: float = 0.0  # weight of the load-balancing loss added to the training loss
    # Sliding-window attention with a local:global layer pattern, and the rest of Gemma 3.
    sliding_window: int | None = None  # a "sliding" layer's query sees its own and the window - 1 keys before
    layer_types: list | None = None  # per block "full" or "sliding"; None: every block full
    rope_local_theta: float | None = None  # RoPE base of the sliding layers; None: rope_theta
    post_norms: bool = False  # a norm also on the attention and feed-forward outputs (Gemma's sandwich norms)
    embed_scale: bool = False  # token embeddings multiplied by sqrt(d_model) (Gemma)
    attn_scale: float | None = None  # the softmax scale of QK^T; None: 1/sqrt(head_dim)
    # Multi-head latent attention (DeepSeek-V2/V3): keys and values through a compressed latent that is cached.
    attention: str = "standard"  # "standard": MHA or GQA (n_kv_heads); "mla": multi-head latent attention
    kv_lora_rank: int = 0  # MLA: width of the KV latent cached per token
    q_lora_rank: int = 0  # MLA: 0 = a full-rank query projection; > 0: queries through a latent of that width
    rope_head_dim: int = 0  # MLA: per-head width of the decoupled RoPE part of queries and of the shared key
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
        if self.head_dim is None and self.n_heads > 0:
            if self.d_model % self.n_heads:
                raise UserError(f"invalid model config: d_model={self.d_model} is not divisible by "
                                f"n_heads={self.n_heads}; set head_dim")
            self.head_dim = self.d_model // self.n_heads
        choices = {"norm": ("layernorm", "rmsnorm"), "mlp": ("gelu", "swiglu", "geglu"),
                   "position": ("learned", "rope"), "attention": ("standard", "mla")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                problems.append(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.rope_scaling is not None:
            need = {"factor", "low_freq_factor", "high_freq_factor", "original_context_length"}
            if not isinstance(self.rope_scaling, dict) or set(self.rope_scaling) != need:
                problems.append(f"rope_scaling must be a dict with keys {sorted(need)}, got {self.rope_scaling!r}")
        for name in ("vocab_size", "context_length", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff",
                     "head_dim"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if problems:
            raise UserError("invalid model config: " + "; ".join(problems))
        if self.n_heads % self.n_kv_heads:
            problems.append(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        if self.n_classes is not None and (self.n_classes < 2 or self.tie_embeddings):
            problems.append(f"n_classes={self.n_classes} needs at least 2 classes and tie_embeddings=False")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        problems += self._variant_problems()
        if problems:
            raise UserError("invalid model config: " + "; ".join(problems))

    def _variant_problems(self) -> list[str]:
        """What is inconsistent in the mixture-of-experts, sliding-window and latent-attention settings."""
        problems = []
        if self.n_experts < 0 or (self.n_experts and not 1 <= self.n_experts_per_token <= self.n_experts):
            problems.append(f"n_experts={self.n_experts}, n_experts_per_token={self.n_experts_per_token}: top-k must "
                            "be between 1 and the number of experts")
        if self.n_experts and self.mlp != "swiglu":
            problems.append(f"n_experts={self.n_experts}: experts are SwiGLU nets; set mlp to swiglu")
        if (self.moe_d_ff is not None and self.moe_d_ff <= 0) or self.shared_expert_d_ff < 0:
            problems.append("moe_d_ff must be positive and shared_expert_d_ff at least 0")
        if self.router_aux_loss_coef < 0:
            problems.append(f"router_aux_loss_coef must be at least 0, got {self.router_aux_loss_coef}")
        if self.layer_types is not None:
            if len(self.layer_types) != self.n_layers or set(self.layer_types) - {"full", "sliding"}:
                problems.append(f"layer_types must list n_layers={self.n_layers} entries, each full or sliding")
            elif "sliding" in self.layer_types and not (self.sliding_window or 0) > 0:
                problems.append("layer_types has sliding layers: set sliding_window to a positive width")
        if self.sliding_window is not None and self.sliding_window <= 0:
            problems.append(f"sliding_window must be positive (or null), got {self.sliding_window}")
        for name in ("rope_local_theta", "attn_scale"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                problems.append(f"{name} must be positive (or null), got {getattr(self, name)}")
        if self.attention == "mla":
            if self.kv_lora_rank <= 0 or self.rope_head_dim <= 0 or self.rope_head_dim % 2:
                problems.append("attention=mla needs kv_lora_rank > 0 and an even rope_head_dim > 0")
            if self.position != "rope":
                problems.append("attention=mla carries positions in its decoupled RoPE part: set position to rope")
            if self.n_kv_heads != self.n_heads or self.qk_norm or any(self.sliding_layers):
                problems.append("attention=mla shares one latent among all heads, normed and never windowed: leave "
                                "n_kv_heads equal to n_heads, qk_norm false and every layer_types entry full")
        if self.q_lora_rank < 0:
            problems.append(f"q_lora_rank must be at least 0, got {self.q_lora_rank}")
        return problems

    @property
    def sliding_layers(self) -> list[bool]:
        """Per block: whether it attends over a sliding window (Gemma 3's local layers)."""
        types = self.layer_types or ["full"] * self.n_layers
        return [t == "sliding" for t in types]

    def replace(self, **changes) -> ModelConfig:
        derived = self.head_dim == self.d_model // self.n_heads  # head_dim was (or equals) the default
        if derived and "head_dim" not in changes and ({"d_model", "n_heads"} & set(changes)):
            changes["head_dim"] = None  # re-derive it from the new shape
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
        data = read_json_object(path, "config file not found", "a JSON object of model config fields")
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_preset(cls, name: str, **overrides) -> ModelConfig:
        if name not in PRESETS:
            raise UserError(f"unknown model preset {name!r}; valid presets: {', '.join(PRESETS)}")
        return cls.from_dict({"name": name, **PRESETS[name], **overrides}, source=f"preset {name}")


# GPT-2 shapes from OpenAI's released hparams.json files (n_embd, n_layer, n_head; n_ctx 1024, vocab 50257).
_GPT2 = dict(vocab_size=50257, context_length=1024, qkv_bias=True, bias=True, tie_embeddings=True)

# Llama 3.2 and Qwen3 shapes from their released config.json files (meta-llama/Llama-3.2-1B, -3B; Qwen/Qwen3-0.6B,
# -1.7B). Llama 3.2: theta 500,000 with llama3 scaling (factor 32, low 1, high 4, original context 8192).
_LLAMA32 = dict(vocab_size=128256, context_length=131072, n_kv_heads=8, d_ff=8192, qkv_bias=False, bias=False,
                tie_embeddings=True, norm="rmsnorm", mlp="swiglu", position="rope", norm_eps=1e-5,
                rope_theta=500000.0, rope_scaling={"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                  "original_context_length": 8192})
_QWEN3 = dict(vocab_size=151936, context_length=40960, n_kv_heads=8, head_dim=128, qkv_bias=False, bias=False,
              tie_embeddings=True, norm="rmsnorm", mlp="swiglu", position="rope", norm_eps=1e-6, rope_theta=1e6,
              qk_norm=True)
# Qwen3-MoE from Qwen/Qwen3-30B-A3B's config.json: Qwen3's attention (here 4 KV heads), every feed-forward net a
# router over 128 SwiGLU experts of width 768 (moe_intermediate_size), 8 per token, their probabilities
# renormalised (norm_topk_prob); untied head; router_aux_loss_coef 0.001. d_ff keeps its intermediate_size.
_QWEN3_MOE = dict(_QWEN3, n_kv_heads=4, tie_embeddings=False, n_experts=128, n_experts_per_token=8, moe_d_ff=768,
                  moe_normalize_topk=True, router_aux_loss_coef=0.001)



def _local_global(n_layers: int, period: int = 6) -> list[str]:
    """Gemma 3's layer pattern: five sliding-window layers, then one global layer, repeated (layer i is global
    when (i + 1) is a multiple of `period`, as transformers' Gemma3TextConfig builds it)."""
    return ["full" if (i + 1) % period == 0 else "sliding" for i in range(n_layers)]


# Gemma 3 text shapes from google/gemma-3-270m and google/gemma-3-1b-pt (config.json): multi-query attention with
# 256-wide heads, a 512-position window on the local layers, RoPE base 1e6 on the global layers and 10,000 on the
# local ones, softmax scale query_pre_attn_scalar^-1/2 (256), GeGLU, four norms per block, QK-norm, and token
# embeddings scaled by √d_model.
_GEMMA3 = dict(vocab_size=262144, context_length=32768, n_heads=4, n_kv_heads=1, head_dim=256, qkv_bias=False,
               bias=False, tie_embeddings=True, norm="rmsnorm", mlp="geglu", position="rope", norm_eps=1e-6,
               rope_theta=1e6, rope_local_theta=10000.0, qk_norm=True, post_norms=True, embed_scale=True,
               attn_scale=256 ** -0.5, sliding_window=512)

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
    # mla-micro: llama-micro's shape with multi-head latent attention (model/mla.py): 24 cached values per token
    # and layer (a 16-wide latent + an 8-wide rotary key) where llama-micro's GQA caches 64.
    "mla-micro": dict(_LLAMA32, vocab_size=512, context_length=64, d_model=64, n_layers=2, n_heads=4,
                      n_kv_heads=None, d_ff=128, rope_scaling=None, rope_theta=10000.0, attention="mla",
                      kv_lora_rank=16, q_lora_rank=0, rope_head_dim=8, head_dim=16),
    "llama3.2-1b": dict(_LLAMA32, d_model=2048, n_layers=16, n_heads=32),
    "llama3.2-3b": dict(_LLAMA32, d_model=3072, n_layers=28, n_heads=24),
    "qwen3-0.6b": dict(_QWEN3, d_model=1024, n_layers=28, n_heads=16, d_ff=3072),
    "qwen3-1.7b": dict(_QWEN3, d_model=2048, n_layers=28, n_heads=16, d_ff=6144),
    "qwen3-30b-a3b": dict(_QWEN3_MOE, d_model=2048, n_layers=48, n_heads=32, d_ff=6144),
    # qwen3-moe-micro: Qwen3-MoE's components at test size (8 experts, top-2).
    "qwen3-moe-micro": dict(_QWEN3_MOE, vocab_size=512, context_length=64, d_model=64, n_layers=2, n_heads=4,
                            n_kv_heads=2, head_dim=32, d_ff=128, n_experts=8, n_experts_per_token=2, moe_d_ff=32),
    # Tiny members of the two families, for tests and CPU experiments (same components, small shapes).
    "llama-micro": dict(_LLAMA32, vocab_size=512, context_length=64, d_model=64, n_layers=2, n_heads=4,
                        n_kv_heads=2, d_ff=128, rope_scaling=None, rope_theta=10000.0),
    "qwen3-micro": dict(_QWEN3, vocab_size=512, context_length=64, d_model=64, n_layers=2, n_heads=4,
                        n_kv_heads=2, head_dim=32, d_ff=128),
    "gemma3-270m": dict(_GEMMA3, d_model=640, n_layers=18, d_ff=2048, layer_types=_local_global(18)),
    "gemma3-1b": dict(_GEMMA3, d_model=1152, n_layers=26, d_ff=6912, layer_types=_local_global(26)),
    # gemma3-micro: the Gemma 3 components at a test size; its 8-position window is shorter than most prompts.
    "gemma3-micro": dict(_GEMMA3, vocab_size=512, context_length=64, d_model=64, n_layers=6, n_heads=4,
                         n_kv_heads=2, head_dim=16, d_ff=128, sliding_window=8, attn_scale=16 ** -0.5,
                         layer_types=_local_global(6)),
}
