"""The decoder-only transformer (GPT-2's architecture; the book's `GPTModel`)."""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.utils.checkpoint
from torch import nn

from llmscratch.config import ModelConfig
from llmscratch.model.attention import CausalSelfAttention, RowPositions
from llmscratch.model.layers import GELUMLP, SwiGLUMLP, make_norm
from llmscratch.model.loss import lm_head_cross_entropy
from llmscratch.model.mla import LatentAttention
from llmscratch.model.moe import MoEFeedForward, load_balancing_loss
from llmscratch.model.options import ModelOptions
from llmscratch.model.rope import inverse_frequencies, rope_cos_sin


class Block(nn.Module):
    """Pre-norm transformer block: attention and feed-forward each wrapped in a residual connection.

    `options`: the model's `ModelOptions`, handed on to the layers that read them (the defaults when None).
    `sliding`: this block attends over a sliding window of cfg.sliding_window positions (Gemma 3's local layers),
    with RoPE at cfg.rope_local_theta. With cfg.post_norms the attention and feed-forward outputs are normalised
    too before they join the residual stream (Gemma's "sandwich" norms: four per block)."""

    def __init__(self, cfg: ModelConfig, options: ModelOptions | None = None, sliding: bool = False):
        super().__init__()
        options = options if options is not None else ModelOptions()
        self.sliding = sliding
        self.norm1 = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)
        if cfg.attention == "mla":
            self.attn = LatentAttention(cfg, options)
        else:
            self.attn = CausalSelfAttention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.qkv_bias, cfg.bias,
                                            cfg.dropout, cfg.head_dim, cfg.qk_norm, cfg.norm_eps, options,
                                            window=cfg.sliding_window if sliding else None, scale=cfg.attn_scale)
        self.post_attn_norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias) if cfg.post_norms else None
        self.norm2 = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)
        if cfg.n_experts > 0:  # a router over SwiGLU experts (model/moe.py)
            self.mlp = MoEFeedForward(cfg)
        elif cfg.mlp in ("swiglu", "geglu"):  # GeGLU: Gemma's gate through GELU's tanh form instead of SiLU
            self.mlp = SwiGLUMLP(cfg.d_model, cfg.d_ff, cfg.bias, cfg.dropout,
                                 activation="silu" if cfg.mlp == "swiglu" else "gelu_tanh")
        else:
            self.mlp = GELUMLP(cfg.d_model, cfg.d_ff, cfg.bias, cfg.dropout, options)
        self.post_mlp_norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias) if cfg.post_norms else None

    def forward(self, x: torch.Tensor, input_pos: int | torch.Tensor | RowPositions | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        h = self.attn(self.norm1(x), input_pos, rope)
        x = x + (self.post_attn_norm(h) if self.post_attn_norm is not None else h)
        h = self.mlp(self.norm2(x))
        x = x + (self.post_mlp_norm(h) if self.post_mlp_norm is not None else h)
        return x


def _run_block(block: Block, x: torch.Tensor, input_pos, rope) -> torch.Tensor:
    return block(x, input_pos, rope)


# The same call as a "nested compile region" (PyTorch ≥ 2.8): torch.compile traces and compiles it once and
# reuses that graph for every block, whose weights it takes as inputs, instead of compiling n_layers copies.
_run_block_region = getattr(torch.compiler, "nested_compile_region", lambda fn: fn)(_run_block)


class GPT(nn.Module):
    """Token (+ learned position) embeddings → n_layers blocks → final norm → LM head.

    GPT-2, Llama 3.2 and Qwen3 are configurations of this one class: the config chooses LayerNorm or RMSNorm,
    the GELU or SwiGLU feed-forward net, learned position embeddings or RoPE, and QK-norm (config.py).

    `model(idx)` maps token ids (B, T) to next-token logits (B, T, vocab_size). For cached decoding call
    `setup_kv_cache(batch_size, max_len)` once, then pass `input_pos` (the absolute position of idx[:, 0]), or
    `RowPositions` (model/attention.py) when the rows are at different positions.

    `options` (model/options.py) choose how it computes — activation checkpointing, the bf16 residual stream,
    the Triton kernels — never what: the model keeps a copy, which its layers share, and `set_options` changes.
    """

    def __init__(self, cfg: ModelConfig, options: ModelOptions | None = None):
        super().__init__()
        self.config = cfg
        self.options = dataclasses.replace(options) if options is not None else ModelOptions()
        # The embeddings get uninitialised tensors rather than drawing their own N(0, 1) values, which
        # reset_parameters would replace anyway. It matters on the meta device, where checkpoints are loaded:
        # there PyTorch's normal_ first imports torch._dynamo, ~1.5 s of every CLI command that loads a model.
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model, _weight=torch.empty(cfg.vocab_size, cfg.d_model))
        # Learned absolute positions (GPT-2); with RoPE, positions enter inside attention instead.
        self.pos_emb = (nn.Embedding(cfg.context_length, cfg.d_model,
                                     _weight=torch.empty(cfg.context_length, cfg.d_model))
                        if cfg.position == "learned" else None)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, self.options, sliding) for sliding in cfg.sliding_layers)
        self.norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)
        self._inv_freq: dict[tuple, torch.Tensor] = {}  # RoPE frequencies per (device, local) (not a buffer:
        #                                               they must stay fp32 when the model is cast)
        # The LM head; a classifier (cfg.n_classes) has a class head here instead, read at one position.
        self.lm_head = nn.Linear(cfg.d_model, cfg.n_classes or cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        # The compiled decoding step that `llmscratch.generate.compiled_decode_step` builds for this model on
        # first use (None until then). It lives as long as the model: its graph reads the model's weights and
        # KV-cache buffers where they are.
        self.decode_step = None
        self.reset_parameters()

    def set_options(self, **changes) -> ModelOptions:
        """Change the model's options (fields of `ModelOptions`) in place, for every layer that reads them, and
        return them. An unknown name is a TypeError, a value out of range a ValueError; then nothing changes.
        A `torch.compile`d model sees the change on its next call (it retraces)."""
        return self.options.update(**changes)

    def reset_parameters(self) -> None:
        """GPT-2 initialisation: N(0, 0.02) everywhere, zero biases, and the projections that write into the
        residual stream scaled by 1/√(2·n_layers) so its variance does not grow with depth (GPT-2 paper, §2.3)."""
        if self.tok_emb.weight.is_meta:  # shapes only, for a checkpoint's tensors to be assigned: nothing to draw
            return
        std = self.config.init_std
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif "norm" in name:
                nn.init.ones_(p)
            elif name.endswith(("attn.proj.weight", "mlp.proj.weight", "shared.proj.weight")) or (
                    ".mlp.experts." in name and name.endswith(".proj.weight")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.config.n_layers))
            else:
                nn.init.normal_(p, 0.0, std)

    def features(self, idx: torch.Tensor, input_pos: int | torch.Tensor | RowPositions | None = None,
                 one_block_graph: bool = False) -> torch.Tensor:
        """The final-norm hidden states (B, T, d_model) that the LM head (or a classification head) reads.

        `one_block_graph`: under torch.compile, compile one block and run its graph for all of them (a CPU
        decoding step compiles in ~5 s instead of ~20 s for GPT-2 124M: generate.py); outside it, no effect."""
        B, T = idx.shape
        if isinstance(input_pos, RowPositions):  # rows at positions of their own (batched decoding)
            pos = input_pos.positions  # (B, T)
            if input_pos.length > self.config.context_length:
                raise ValueError(f"sequence of {input_pos.length} positions exceeds context_length "
                                 f"{self.config.context_length}")
        elif isinstance(input_pos, torch.Tensor):  # static-shape decoding: no host sync for a bounds check
            pos = input_pos + torch.arange(T, device=idx.device)
        else:
            start = input_pos or 0
            if start + T > self.config.context_length:
                raise ValueError(f"sequence of {start + T} positions exceeds context_length "
                                 f"{self.config.context_length}")
            pos = torch.arange(start, start + T, device=idx.device)
        x = self.tok_emb(idx)  # (B, T, C)
        if self.config.embed_scale:
            # Gemma scales by √d_model rounded to the weights' dtype first, as transformers does (in bf16,
            # √640 = 25.298 becomes 25.25): the same rounding keeps bf16 logits equal to theirs.
            x = x * torch.tensor(math.sqrt(self.config.d_model), dtype=x.dtype, device=x.device)
        rope = local_rope = None
        if self.pos_emb is not None:
            x = x + self.pos_emb(pos)
        else:
            rope = self._rope(pos, x.dtype, local=False)
            if self.config.rope_local_theta is not None and any(self.config.sliding_layers):
                local_rope = self._rope(pos, x.dtype, local=True)
        x = self.drop(x)
        if self.options.low_precision_residual and torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        recompute = self.options.activation_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            block_rope = local_rope if block.sliding and local_rope is not None else rope
            if recompute:
                x = torch.utils.checkpoint.checkpoint(block, x, input_pos, block_rope, use_reentrant=False)
            elif one_block_graph:
                x = _run_block_region(block, x, input_pos, block_rope)
            else:
                x = block(x, input_pos, block_rope)
        return self.norm(x)

    def forward(self, idx: torch.Tensor, input_pos: int | torch.Tensor | RowPositions | None = None,
                targets: torch.Tensor | None = None, last_only: bool = False,
                one_block_graph: bool = False) -> torch.Tensor:
        """Logits (B, T, vocab) — or, given `targets` (B, T), the mean next-token cross-entropy, computed by
        the chunked fused LM-head loss so the full logits are never materialised (model/loss.py).

        `last_only`: the logits of the last position alone (B, 1, vocab), all that choosing the next token
        needs; the LM head then skips a prompt's other positions (for GPT-2 124M a third of a long prompt's
        prefill FLOPs). `one_block_graph`: see `features`."""
        x = self.features(idx, input_pos, one_block_graph)
        if targets is not None:
            return lm_head_cross_entropy(x.flatten(0, 1), self.lm_head.weight, targets.flatten(),
                                         use_kernel=self.options.loss_kernel)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(x)  # (B, T, vocab)

    def inverse_frequencies(self, device: torch.device, local: bool = False) -> torch.Tensor:
        """RoPE's per-pair frequencies (head_dim/2,), fp32, computed once per device. Latent attention rotates
        only its decoupled part, rope_head_dim wide. `local`: those of the sliding-window layers, at
        rope_local_theta and unscaled (Gemma 3 scales only its global layers' frequencies)."""
        inv = self._inv_freq.get((device, local))
        if inv is None:
            c = self.config
            width = c.rope_head_dim if c.attention == "mla" else c.head_dim
            theta, scaling = (c.rope_local_theta, None) if local else (c.rope_theta, c.rope_scaling)
            inv = self._inv_freq[(device, local)] = inverse_frequencies(width, theta, scaling, device)
        return inv

    def _rope(self, pos: torch.Tensor, dtype: torch.dtype, local: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) of positions `pos` (T,) → (T, hs) each, or per row (B, T) → (B, 1, T, hs), broadcast over
        the heads."""
        cos, sin = rope_cos_sin(pos, self.inverse_frequencies(pos.device, local), dtype)
        if pos.dim() == 2:
            cos, sin = cos[:, None], sin[:, None]
        return cos, sin

    # --- KV cache ---------------------------------------------------------------------------------------
    def setup_kv_cache(self, batch_size: int, max_len: int | None = None, dtype=None, device=None,
                       at_least: bool = False, keep: bool = False) -> None:
        """Give every attention layer a preallocated cache for `batch_size` sequences of up to `max_len`.

        A cache already there is kept when it has that shape — or, with `at_least` (the eager decoding path,
        which reads only the filled prefix), any longer one: a compiled decoding step, whose graph is tied to
        those very buffers, then stays valid across eager generations in between. With `keep`, a cache of
        another length (same rows, dtype and device) is resized to `max_len` with its entries: a conversation's
        next turn reuses what it holds (`llmscratch.generate.KeptPrefix`).
        """
        max_len = min(max_len or self.config.context_length, self.config.context_length)
        ref = self.tok_emb.weight
        dtype, device = dtype or ref.dtype, torch.device(device or ref.device)
        for block in self.blocks:
            cache = block.attn.kv_cache
            if (keep and cache is not None and cache.fits(batch_size, cache.max_len, dtype, device)
                    and not cache.fits(batch_size, max_len, dtype, device, at_least)):
                block.attn.kv_cache = cache.resized(max_len)
            else:
                block.attn.setup_cache(batch_size, max_len, dtype, device, at_least)

    def resize_kv_cache(self, max_len: int) -> None:
        """Give every layer's cache room for `max_len` positions (at most the context), keeping what it holds."""
        max_len = min(max_len, self.config.context_length)
        for block in self.blocks:
            block.attn.kv_cache = block.attn.kv_cache.resized(max_len)

    def move_kv_rows(self, src: int | list[int], dst: int | list[int], length: int) -> None:
        """Copy the first `length` cached positions of batch row(s) `src` to row(s) `dst`, in every layer (a batched
        decoder closing the gap a finished row left); `move_kv_rows([a, b], [b, a], n)` swaps two rows."""
        for block in self.blocks:
            block.attn.kv_cache.move_rows(src, dst, length)

    def clear_kv_cache(self) -> None:
        for block in self.blocks:
            block.attn.kv_cache = None

    @property
    def has_kv_cache(self) -> bool:
        return self.blocks[0].attn.kv_cache is not None if len(self.blocks) else False

    # --- accounting -------------------------------------------------------------------------------------
    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Distinct parameters (a tied head counts once); optionally without the embedding tables."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.tok_emb.weight.numel() + (self.pos_emb.weight.numel() if self.pos_emb is not None else 0)
        return n

    def num_active_params(self) -> int:
        """Parameters one token's forward pass uses: all of them for a dense model; with experts, only the
        n_experts_per_token routed experts of each layer (the embeddings and LM head counted, as the "3B
        active" of Qwen3-30B-A3B counts them)."""
        n, k = self.num_params(), self.config.n_experts_per_token
        for block in self.blocks:
            if isinstance(block.mlp, MoEFeedForward):
                n -= (len(block.mlp.experts) - k) * block.mlp.expert_params()
        return n

    def aux_loss(self) -> torch.Tensor | None:
        """The router load-balancing loss of the last training-mode forward (model/moe.py), pooled over all
        MoE layers as transformers pools it; None for a dense model or after an eval-mode forward."""
        stats = [b.mlp.router_stats for b in self.blocks
                 if isinstance(b.mlp, MoEFeedForward) and b.mlp.router_stats is not None]
        return load_balancing_loss(stats, self.config.n_experts) if stats else None


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None, training: bool = True) -> float:
    """Approximate FLOPs per token: 2·N for a forward pass through the N non-embedding weights plus the
    attention scores (2·n_layers·T·d for QKᵀ and AV each; a sliding-window layer's T at most its window), ×3 for
    training (backward ≈ 2× forward).
    Follows the accounting of Kaplan et al. 2020 (table 1) and the PaLM paper's MFU appendix; the LM head is
    counted since it is a real matmul."""
    T = seq_len or cfg.context_length
    d, L = cfg.d_model, cfg.n_layers
    attn_weights, qk_dim, v_dim = _attention_matmuls(cfg)
    mlp_mats = 3 if cfg.mlp in ("swiglu", "geglu") else 2
    per_layer = attn_weights + mlp_mats * d * cfg.d_ff
    if cfg.n_experts:  # the router, the k experts a token goes through, and the shared expert
        moe_d_ff = cfg.moe_d_ff or cfg.d_ff
        per_layer = attn_weights + d * (cfg.n_experts + 3 * (cfg.n_experts_per_token * moe_d_ff
                                                          + cfg.shared_expert_d_ff))
    matmul_params = L * per_layer + d * (cfg.n_classes or cfg.vocab_size)
    # Keys a query attends over, summed over the layers: T each, or at most the window on a sliding layer.
    keys = sum(min(T, cfg.sliding_window) if sliding else T for sliding in cfg.sliding_layers)
    forward = 2 * matmul_params + 2 * keys * (qk_dim + v_dim)  # QKᵀ and AV over all heads
    return forward * (3 if training else 1)


def _attention_matmuls(cfg: ModelConfig) -> tuple[int, int, int]:
    """(weights of an attention layer's matmuls, summed query·key width, summed value width over its heads).
    Latent attention counts its down- and up-projections as it runs in training and prefill (keys and values
    up-projected from the latent)."""
    d, nh, hd = cfg.d_model, cfg.n_heads, cfg.head_dim
    if cfg.attention != "mla":
        q_dim, kv_dim = nh * hd, cfg.n_kv_heads * hd
        return d * (q_dim + 2 * kv_dim) + q_dim * d, q_dim, q_dim  # qkv, out proj
    qk = hd + cfg.rope_head_dim
    q = d * nh * qk if not cfg.q_lora_rank else d * cfg.q_lora_rank + cfg.q_lora_rank * nh * qk
    kv = d * (cfg.kv_lora_rank + cfg.rope_head_dim) + cfg.kv_lora_rank * nh * 2 * hd
    return q + kv + nh * hd * d, nh * qk, nh * hd
