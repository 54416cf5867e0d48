"""The book's own GPT-2 weights: its `GPTModel` (chapter 4) saved with `torch.save` (chapter 5) → our GPT.

Chapter 5 saves either `model.state_dict()` or a dict with "model_state_dict" (and "optimizer_state_dict").
Its names differ from ours but its layout is GPT-2's with `nn.Linear` everywhere, so every weight is already
(out, in) and nothing is transposed. Two differences are real: q, k and v are three (d, d) matrices
(`att.W_query/W_key/W_value`), which our attention keeps as one (3d, d) matrix (`attn.qkv`, one matmul) — loading
concatenates them, as the Llama loader does — and the LM head (`out_head`) is its own matrix, tied only when it
equals the token embedding. The book's LayerNorm (eps 1e-5, biased variance) and tanh-approximated GELU are the
ones our GPT-2 configuration computes.

The file is read with `torch.load(weights_only=True)`: a pickle that needs any Python object beyond tensors and
plain containers is refused, never executed.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from llmscratch.checkpoint import assign_weights, check_finite, raise_if_unfit
from llmscratch.config import ModelConfig
from llmscratch.errors import UserError, one_line

# The book's GPT_CONFIG presets (chapter 5: gpt2-small .. gpt2-xl), emb_dim → n_heads.
BOOK_HEADS = {768: 12, 1024: 16, 1280: 20, 1600: 25}

_GLOBAL = {"tok_emb.weight": "tok_emb.weight", "pos_emb.weight": "pos_emb.weight",
           "norm.weight": "final_norm.scale", "norm.bias": "final_norm.shift"}
_BLOCK = {  # ours under blocks.{i}. → the book's under trf_blocks.{i}.
    "norm1.weight": "norm1.scale",
    "norm1.bias": "norm1.shift",
    "attn.proj.weight": "att.out_proj.weight",
    "attn.proj.bias": "att.out_proj.bias",
    "norm2.weight": "norm2.scale",
    "norm2.bias": "norm2.shift",
    "mlp.fc.weight": "ff.layers.0.weight",
    "mlp.fc.bias": "ff.layers.0.bias",
    "mlp.proj.weight": "ff.layers.2.weight",
    "mlp.proj.bias": "ff.layers.2.bias",
}
_QKV = ("att.W_query", "att.W_key", "att.W_value")  # fused into our attn.qkv, in this order
_IGNORED = (".att.mask",)  # the causal-mask buffer, saved by the book's MultiHeadAttention; rebuilt by ours
_LAYER = re.compile(r"trf_blocks\.(\d+)\.")
_WHAT_TO_DO = "pass the .pth file chapter 5 writes with torch.save(model.state_dict(), ...)"


def read_book_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a book checkpoint file: a state dict, or the "model_state_dict" of chapter 5's model +
    optimizer dict. Prefixes from `torch.compile` ("_orig_mod.") and DistributedDataParallel ("module.") are
    dropped. UserError for a file that is not a torch file, is refused by weights_only, or holds no tensors."""
    import pickle
    import zipfile

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found; {_WHAT_TO_DO}")
    not_torch = f"{path}: not a file torch.save wrote"
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; weights_only says "refused" for any
            raise UserError(f"{not_torch}; {_WHAT_TO_DO}") from None  # other bytes too
        raise UserError(f"{path}: refused by torch.load(weights_only=True): it pickles Python objects besides "
                        "tensors, and llmscratch never runs a pickle's code; where you trust the file, re-save "
                        "just the weights with torch.save(model.state_dict(), PATH)") from None
    except EOFError:
        raise UserError(f"{path}: empty or truncated; save it again") from None
    except (RuntimeError, KeyError, ValueError, OSError) as exc:
        raise UserError(f"{not_torch} ({one_line(exc)[:80]}); {_WHAT_TO_DO}") from None
    if isinstance(data, dict) and "model_state_dict" in data:
        data = data["model_state_dict"]
    if not isinstance(data, dict) or not data or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise UserError(f"{path}: not a state dict of tensors; {_WHAT_TO_DO}")
    for prefix in ("_orig_mod.", "module."):
        if all(k.startswith(prefix) for k in data):
            data = {k.removeprefix(prefix): v for k, v in data.items()}
    check_finite(data, path)
    return data


def config_from_book(state: dict[str, torch.Tensor], source: str, heads: int | None = None) -> ModelConfig:
    """Our ModelConfig for the book's state dict: the shapes read from its tensors, the number of heads from
    `heads` or the book's presets (it is not recorded in the weights), q/k/v biases when they are present, and
    the head tied when `out_head` equals the token embedding."""
    for key in ("tok_emb.weight", "pos_emb.weight", "trf_blocks.0.att.W_query.weight",
                "trf_blocks.0.ff.layers.0.weight"):
        if key not in state:
            raise UserError(f"{source}: no tensor {key!r}, so not the book's GPTModel state dict; {_WHAT_TO_DO}")
    emb, head = state["tok_emb.weight"], state.get("out_head.weight")
    vocab, d = emb.shape
    if heads is None:
        heads = BOOK_HEADS.get(d)
        if heads is None:
            presets = ", ".join(f"{k}→{v}" for k, v in BOOK_HEADS.items())
            raise UserError(f"{source}: emb_dim {d} is none of the book's presets ({presets}); pass --heads N "
                            "(the n_heads it was trained with)")
    if d % heads:
        raise UserError(f"{source}: emb_dim {d} is not divisible by {heads} heads; pass the right --heads")
    tied = head is not None and head.shape == emb.shape and torch.equal(head, emb)
    return ModelConfig(name="book-gpt", vocab_size=vocab, context_length=state["pos_emb.weight"].shape[0],
                       d_model=d, n_layers=1 + max(int(m.group(1)) for k in state if (m := _LAYER.match(k))),
                       n_heads=heads, d_ff=state["trf_blocks.0.ff.layers.0.weight"].shape[0],
                       qkv_bias="trf_blocks.0.att.W_query.bias" in state, bias=True, tie_embeddings=tied,
                       norm_eps=1e-5, extra={"converted_from": "the book's GPTModel"})


def _wanted(cfg: ModelConfig) -> dict[str, list[str]]:
    """Our tensor name → the book's tensor names that make it (three for a fused q/k/v tensor)."""
    wanted = {ours: [theirs] for ours, theirs in _GLOBAL.items()}
    for i in range(cfg.n_layers):
        wanted.update({f"blocks.{i}.{ours}": [f"trf_blocks.{i}.{theirs}"] for ours, theirs in _BLOCK.items()})
        for part in ("weight", "bias") if cfg.qkv_bias else ("weight",):
            wanted[f"blocks.{i}.attn.qkv.{part}"] = [f"trf_blocks.{i}.{n}.{part}" for n in _QKV]
    if not cfg.tie_embeddings:
        wanted["lm_head.weight"] = ["out_head.weight"]
    return wanted


def load_book_gpt(path: str | Path, dtype: torch.dtype | None = None, heads: int | None = None):
    """(model, config) from a book checkpoint file, built on the meta device and filled in place. Missing and
    unexpected tensors and shape mismatches are collected and reported in one UserError naming the book's keys."""
    from llmscratch.model import GPT

    state = read_book_state(path)
    cfg = config_from_book(state, str(path), heads)
    with torch.device("meta"):
        model = GPT(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    filled, missing, mismatched, used = {}, [], [], set()
    for ours, theirs in _wanted(cfg).items():
        used.update(theirs)  # known names: one missing part of q/k/v does not make the others unexpected
        absent = [t for t in theirs if t not in state]
        if absent:
            missing.extend(absent)
            continue
        t = torch.cat([state[n] for n in theirs]) if len(theirs) > 1 else state[theirs[0]]
        if t.shape != expected[ours]:
            mismatched.append(f"{' + '.join(theirs)} is {tuple(t.shape)}, expected {tuple(expected[ours])}")
            continue
        filled[ours] = t.to(dtype).contiguous() if dtype is not None else t.contiguous()
    unused = set(state) - used - ({"out_head.weight"} if cfg.tie_embeddings else set())
    unexpected = sorted(k for k in unused if not k.endswith(_IGNORED))
    raise_if_unfit(f"{path}: weights do not fit the book's GPTModel", mismatched, missing, unexpected)
    assign_weights(model, filled)
    return model.eval(), cfg
