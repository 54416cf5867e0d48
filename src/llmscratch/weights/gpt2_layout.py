"""GPT-2's parameters under three names — ours, Hugging Face's, OpenAI's TensorFlow release — and the one
function that fills our model from any of them.

One table lists every tensor once per naming scheme. GPT-2's `Conv1D` layers (OpenAI's `conv1d`, copied by
Hugging Face) store weights as (in, out), the transpose of `nn.Linear`'s (out, in); OpenAI's checkpoint adds a
leading 1, (1, in, out). Both are undone in one place, `to_ours`. Shapes are checked against our model,
built on the meta device, before anything is assigned; the tensors are then used in place (`assign=True`),
so a memory-mapped file is never copied a second time.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from llmscratch.checkpoint import assign_weights, raise_if_unfit
from llmscratch.config import ModelConfig
from llmscratch.errors import UserError

# (ours, Hugging Face, OpenAI). Hugging Face's names are inside `GPT2Model` (a checkpoint may prefix them with
# "transformer."); OpenAI's are under the "model/" scope of their TensorFlow graph.
GLOBAL_NAMES = [
    ("tok_emb.weight", "wte.weight", "model/wte"),
    ("pos_emb.weight", "wpe.weight", "model/wpe"),
    ("norm.weight", "ln_f.weight", "model/ln_f/g"),
    ("norm.bias", "ln_f.bias", "model/ln_f/b"),
]
# Per block: ours under "blocks.{i}.", Hugging Face's under "h.{i}.", OpenAI's under "model/h{i}/".
BLOCK_NAMES = [
    ("norm1.weight", "ln_1.weight", "ln_1/g"),
    ("norm1.bias", "ln_1.bias", "ln_1/b"),
    ("attn.qkv.weight", "attn.c_attn.weight", "attn/c_attn/w"),
    ("attn.qkv.bias", "attn.c_attn.bias", "attn/c_attn/b"),
    ("attn.proj.weight", "attn.c_proj.weight", "attn/c_proj/w"),
    ("attn.proj.bias", "attn.c_proj.bias", "attn/c_proj/b"),
    ("norm2.weight", "ln_2.weight", "ln_2/g"),
    ("norm2.bias", "ln_2.bias", "ln_2/b"),
    ("mlp.fc.weight", "mlp.c_fc.weight", "mlp/c_fc/w"),
    ("mlp.fc.bias", "mlp.c_fc.bias", "mlp/c_fc/b"),
    ("mlp.proj.weight", "mlp.c_proj.weight", "mlp/c_proj/w"),
    ("mlp.proj.bias", "mlp.c_proj.bias", "mlp/c_proj/b"),
]
CONV1D = {"attn.qkv.weight", "attn.proj.weight", "mlp.fc.weight", "mlp.proj.weight"}  # stored (in, out)
FORMATS = ("hf", "openai")


def name_map(n_layers: int, fmt: str = "hf") -> dict[str, str]:
    """Our parameter name → the name in `fmt` ("hf" or "openai") for a model with `n_layers` blocks."""
    col = FORMATS.index(fmt) + 1
    names = {row[0]: row[col] for row in GLOBAL_NAMES}
    for i in range(n_layers):
        prefix = f"h.{i}." if fmt == "hf" else f"model/h{i}/"
        names.update({f"blocks.{i}.{row[0]}": prefix + row[col] for row in BLOCK_NAMES})
    return names


def _is_conv1d(ours: str) -> bool:
    return ours.split(".", 2)[-1] in CONV1D


def to_ours(ours: str, t: torch.Tensor) -> torch.Tensor:
    """A tensor in Hugging Face's or OpenAI's layout → ours: Conv1D weights (in, out) or (1, in, out) are
    transposed to (out, in). The one place that knows about Conv1D."""
    if not _is_conv1d(ours):
        return t
    if t.ndim == 3 and t.shape[0] == 1:
        t = t[0]
    return t.t()


def to_conv1d(ours: str, t: torch.Tensor) -> torch.Tensor:
    """Our tensor → Hugging Face's layout (the inverse of `to_ours` for a 2-D Conv1D weight)."""
    return t.t() if _is_conv1d(ours) else t


def fill_gpt(cfg: ModelConfig, tensors: Mapping[str, torch.Tensor], names: Mapping[str, str], source: str,
             dtype: torch.dtype | None = None, lm_head: str | None = None, ignore: tuple[str, ...] = ()):
    """Our GPT for `cfg` with its weights taken from `tensors` (their names → tensors) through `names` (ours →
    theirs). `lm_head` names an untied head's tensor. Every problem is collected first, then one UserError
    names the first few: missing tensors, tensors the model has no place for (names ending in `ignore` are
    not reported), and shape mismatches with both shapes."""
    from llmscratch.model import GPT

    with torch.device("meta"):
        model = GPT(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    wanted = dict(names)
    if not cfg.tie_embeddings:
        if lm_head is None:
            raise UserError(f"{source}: this format always ties the LM head to the token embedding, but the "
                            "config says it is not tied")
        wanted["lm_head.weight"] = lm_head
    uncovered = set(expected) - set(wanted) - ({"lm_head.weight"} if cfg.tie_embeddings else set())
    if uncovered:  # a new parameter in our model that the table does not know yet
        raise RuntimeError(f"GPT-2 name table lacks {sorted(uncovered)[:3]}")
    state, missing, mismatched = {}, [], []
    for ours, theirs in wanted.items():
        if theirs not in tensors:
            missing.append(theirs)
            continue
        t = to_ours(ours, tensors[theirs])
        if t.shape != expected[ours]:
            layout = " (after the Conv1D transpose)" if _is_conv1d(ours) else ""
            mismatched.append(f"{theirs} is {tuple(t.shape)}{layout}, expected {tuple(expected[ours])}")
            continue
        state[ours] = t.to(dtype).contiguous() if dtype is not None else t.contiguous()
    used = set(wanted.values())
    unexpected = sorted(k for k in tensors if k not in used and not k.endswith(ignore))
    raise_if_unfit(f"{source}: weights do not fit the config", mismatched, missing, unexpected)
    assign_weights(model, state)
    return model.eval()
