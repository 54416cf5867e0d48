"""llmscratch: a GPT built by hand — tokenizer, data, model, training, fine-tuning, generation.

Quick use::

    import llmscratch
    model, tokenizer = llmscratch.load("runs/quickstart")
    print(llmscratch.generate(model, tokenizer, "The module", max_new_tokens=40))

The names below are imported on first use, so that `import llmscratch.cli` — every `llmscratch` command —
does not import PyTorch (~2 s) before it knows it needs to (`--help`, a mistyped option).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from llmscratch._lazy import make_lazy

__version__ = "0.1.0"
__all__ = ["GPT", "PRESETS", "ModelConfig", "ModelOptions", "UserError", "generate", "load", "save_model", "stream"]

_HOMES = {"GPT": "llmscratch.model", "ModelOptions": "llmscratch.model",
          "PRESETS": "llmscratch.config", "ModelConfig": "llmscratch.config",
          "UserError": "llmscratch.errors", "generate": "llmscratch.generate", "stream": "llmscratch.generate",
          "load": "llmscratch.checkpoint", "save_model": "llmscratch.checkpoint"}

if TYPE_CHECKING:
    from llmscratch.checkpoint import load, save_model
    from llmscratch.config import PRESETS, ModelConfig
    from llmscratch.errors import UserError
    from llmscratch.generate import generate, stream
    from llmscratch.model import GPT, ModelOptions


make_lazy(__name__, _HOMES)
