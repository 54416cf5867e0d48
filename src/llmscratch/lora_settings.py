"""What a LoRA run asks for (`--lora-rank/--lora-alpha/--lora-targets/--lora-dropout`) and the target names it
may use, apart from the layers themselves (the `llmscratch.lora` package) so that the command line can describe them
without importing PyTorch."""

from __future__ import annotations

from dataclasses import dataclass

from llmscratch.errors import UserError

# Short target names → the module-path suffixes they select inside the GPT (model/transformer.py). `proj` alone
# names both projections called `proj` (attention output and feed-forward down-projection).
_LATENT = ("attn.q_proj", "attn.q_down", "attn.kv_down", "attn.kv_up")  # multi-head latent attention's q/k/v
ALIASES: dict[str, tuple[str, ...]] = {
    "qkv": ("attn.qkv", *_LATENT),
    "out": ("attn.proj",),
    "fc": ("mlp.fc",),
    "gate": ("mlp.gate",),
    "up": ("mlp.up",),
    "down": ("mlp.proj",),
    "proj": ("attn.proj", "mlp.proj"),
    "head": ("lm_head",),
    "attn": ("attn.qkv", *_LATENT, "attn.proj"),
    "mlp": ("mlp.fc", "mlp.gate", "mlp.up", "mlp.proj"),
    "all": ("attn.qkv", *_LATENT, "attn.proj", "mlp.fc", "mlp.gate", "mlp.up", "mlp.proj", "lm_head"),
}
GROUPS = ("attn", "mlp", "all")  # may match only some of their suffixes (GPT-2 has no gate, Llama no fc)
# (A mixture of experts' experts count as the feed-forward layers they replace: `mlp` and `gate` reach them.)
TARGETS_HELP = ("comma-separated: qkv, out (attention output), fc, gate, up, down (feed-forward down-projection), "
                "proj (out + down), head (an untied LM head), or the groups attn, mlp, all (attn + mlp + an untied "
                "LM head); dotted module suffixes such as attn.proj also work")


@dataclass
class LoRASettings:
    """What `--lora-rank/--lora-alpha/--lora-targets/--lora-dropout` ask for."""

    rank: int
    alpha: float = 16.0
    targets: str = "all"
    dropout: float = 0.0

    def check(self) -> None:
        if self.rank <= 0:
            raise UserError(f"--lora-rank must be positive, got {self.rank}")
        if self.alpha <= 0:
            raise UserError(f"--lora-alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"--lora-dropout must be in [0, 1), got {self.dropout}")
