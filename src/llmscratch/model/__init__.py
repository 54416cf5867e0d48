"""The model: layers with their references, attention with its KV cache, and the transformer."""

from llmscratch.model.attention import CausalSelfAttention, KVCache, attention_reference
from llmscratch.model.layers import (
    GELUMLP,
    LayerNorm,
    RMSNorm,
    SwiGLUMLP,
    gelu_reference,
    layer_norm_reference,
    rms_norm_reference,
)
from llmscratch.model.options import ModelOptions
from llmscratch.model.transformer import GPT, Block, flops_per_token

__all__ = [
           "GELUMLP",
           "GPT",
           "Block",
           "CausalSelfAttention",
           "KVCache",
           "LayerNorm",
           "ModelOptions",
           "RMSNorm",
           "SwiGLUMLP",
           "attention_reference",
           "flops_per_token",
           "gelu_reference",
           "layer_norm_reference",
           "rms_norm_reference",
]
