"""Weights in other formats ↔ our checkpoint folder: Hugging Face GPT-2 folders (both ways), OpenAI's original
TensorFlow release of GPT-2, and the named downloads behind `llmscratch download`.

The names below are imported on first use: `weights.hub` (the download list the command line shows) must not
import PyTorch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from llmscratch._lazy import make_lazy

__all__ = ["load_hf_gpt2", "export_hf_gpt2", "load_openai_gpt2"]

_HOMES = {"load_hf_gpt2": "llmscratch.weights.hf_gpt2", "export_hf_gpt2": "llmscratch.weights.hf_gpt2",
          "load_openai_gpt2": "llmscratch.weights.openai_tf"}

if TYPE_CHECKING:
    from llmscratch.weights.hf_gpt2 import export_hf_gpt2, load_hf_gpt2
    from llmscratch.weights.openai_tf import load_openai_gpt2


make_lazy(__name__, _HOMES)
