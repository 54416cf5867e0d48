"""Converting weights between our checkpoint folder and other formats (Hugging Face GPT-2 so far)."""

from llmscratch.weights.hf_gpt2 import export_hf_gpt2, load_hf_gpt2

__all__ = ["load_hf_gpt2", "export_hf_gpt2"]
