"""Weights in other formats ↔ our checkpoint folder: Hugging Face GPT-2 folders (both ways), OpenAI's original
TensorFlow release of GPT-2, and the named downloads behind `llmscratch download`."""

from llmscratch.weights.hf_gpt2 import export_hf_gpt2, load_hf_gpt2
from llmscratch.weights.openai_tf import load_openai_gpt2

__all__ = ["load_hf_gpt2", "export_hf_gpt2", "load_openai_gpt2"]
