"""The model: layers with their references, attention with its KV cache, and the transformer."""

from llmscratch.model.attention import CausalSelfAttention, KVCache, attention_reference
from llmscratch.model.layers import GELUMLP, LayerNorm, gelu_reference, layer_norm_reference
from llmscratch.model.transformer import GPT, Block, flops_per_token

__all__ = ["GPT", "Block", "CausalSelfAttention", "KVCache", "LayerNorm", "GELUMLP", "attention_reference",
           "layer_norm_reference", "gelu_reference", "flops_per_token"]
