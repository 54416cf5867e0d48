"""Growing a model's vocabulary: more rows in the token embedding and the LM head, for special tokens added to
its tokenizer (`llmscratch tokenizer add-tokens`; the tokenizer side is `Tokenizer.add_special_tokens`).

Ids: every tokenizer — ours, the tiktoken-backed one, a Hugging Face `tokenizer.json` — numbers a new token
after its current ids, the rule Hugging Face's `tokenizers` applies too, so old ids never move. The model then
grows to the larger of its own vocabulary and the tokenizer's. Where a model's vocabulary was padded past its
tokenizer (Qwen3: 151,936 rows for 151,669 ids), the new tokens take padding rows no token used, and those rows
are reset like new ones; otherwise (GPT-2: 50,257 and 50,257) the matrices grow by one row per token.

A new row starts at the mean of the trained rows rather than at random: a random row is an outlier, and as a
head row it would take probability mass from the old tokens; the mean row keeps the new token's logit near the
average one, so its probability stays small until fine-tuning teaches it (Hewitt 2021, "Initializing New Word
Embeddings for Pretrained Language Models"). The old rows are copied unchanged, so every old token's logit on
every input stays what it was (up to the rounding of a wider matmul); only the new tokens' logits are added,
which the softmax then shares its mass with.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from llmscratch.errors import UserError


def _grown(weight: torch.Tensor, new_size: int, rows: Sequence[int], mean_of: int) -> nn.Parameter:
    """`weight` (old_size, d) grown to (new_size, d): old rows kept, `rows` set to the mean of its first `mean_of`
    rows (computed in fp32 and rounded once to the weight's dtype)."""
    old = weight.detach()
    out = old.new_empty(new_size, old.shape[1])
    out[: old.shape[0]] = old
    if rows:
        out[list(rows)] = old[:mean_of].float().mean(0).to(old.dtype)
    return nn.Parameter(out, requires_grad=weight.requires_grad)


def resize_vocab(model, new_size: int, init_rows: Sequence[int] | None = None, mean_of: int | None = None):
    """Give `model` (a GPT) `new_size` token ids, in place, and return it: the token embedding and the LM head
    (tied: the one shared matrix; untied: each its own) grow to `new_size` rows and `config.vocab_size` follows.

    `init_rows`: the rows that start at the mean (default: the added rows, old_size..new_size-1); they may lie
    below old_size, where a vocabulary padded past its tokenizer has rows no token uses yet. `mean_of`: the mean
    is over the first `mean_of` rows (default: all old rows; pass the tokenizer's size to leave padding rows
    out). The embedding's mean and the untied head's mean are each of their own matrix. The vocabulary never
    shrinks (ValueError); a classifier, whose head maps to classes, is refused (UserError)."""
    cfg = model.config
    old_size = model.tok_emb.weight.shape[0]
    if cfg.n_classes is not None:
        raise UserError(f"this is a classifier (n_classes={cfg.n_classes}); its head maps to classes, not to "
                        "tokens: grow the vocabulary of the base model before fine-tuning it")
    if new_size < old_size:
        raise ValueError(f"new_size {new_size} is below the current vocabulary of {old_size}; it only grows")
    rows = list(range(old_size, new_size)) if init_rows is None else sorted(set(init_rows))
    if rows and not 0 <= rows[0] <= rows[-1] < new_size:
        raise ValueError(f"init_rows must lie in [0, {new_size}), got {rows[0]}..{rows[-1]}")
    mean_of = old_size if mean_of is None else min(mean_of, old_size)
    with torch.no_grad():
        model.tok_emb.weight = _grown(model.tok_emb.weight, new_size, rows, mean_of)
        if cfg.tie_embeddings:
            model.lm_head.weight = model.tok_emb.weight
        else:
            model.lm_head.weight = _grown(model.lm_head.weight, new_size, rows, mean_of)
    model.tok_emb.num_embeddings = model.lm_head.out_features = new_size
    model.config = cfg.replace(vocab_size=new_size)
    model.decode_step = None  # a compiled decoding step holds the old matrices
    return model


@dataclass(frozen=True)
class GrownVocabulary:
    """What `add_tokens` did: `added` (token → its new id), `present` (token → the id it already had; not added
    again), and the model's vocabulary size before and after."""

    added: dict[str, int]
    present: dict[str, int]
    old_size: int
    new_size: int


def _hyperparameters(folder: Path, added: dict[str, int]) -> dict:
    """The checkpoint's hyperparameters.yaml (when readable) with every token added so far recorded."""
    import yaml

    from llmscratch.runs import HPARAMS

    hp = {}
    if (folder / HPARAMS).is_file():
        try:
            hp = yaml.safe_load((folder / HPARAMS).read_text()) or {}
        except yaml.YAMLError:
            hp = {}  # only a record of how the model was made; the weights do not depend on it
    hp = hp if isinstance(hp, dict) else {}
    hp["added_tokens"] = {**(hp.get("added_tokens") or {}), **added}
    return hp


def add_tokens(checkpoint: str | Path, tokens: Sequence[str], out: str | Path,
               overwrite: bool = False) -> GrownVocabulary:
    """Checkpoint `checkpoint` with the special `tokens` added to its tokenizer and rows for them in its token
    embedding and LM head → the new checkpoint folder `out` (new or empty, or with `overwrite` its files of the
    same names replaced), with the checkpoint's prompt style. The new rows start at the mean of the rows of the
    tokenizer's old ids (padding rows left out); old tokens keep their ids and their logits."""
    import shutil

    from llmscratch.checkpoint import load, save_model
    from llmscratch.runs import PROMPT_STYLE, check_out_folder, find_in_run, find_model_folder, write_folder

    folder = find_model_folder(checkpoint)
    inputs = (checkpoint, folder)
    check_out_folder(out, overwrite, inputs=inputs)
    model, tok = load(folder)
    old_ids, old_size = tok.vocab_size, model.config.vocab_size
    ids = tok.add_special_tokens(tokens)
    added = {t: i for t, i in zip(tokens, ids) if i >= old_ids}
    present = {t: i for t, i in zip(tokens, ids) if i < old_ids}
    new_size = max(old_size, tok.vocab_size)
    resize_vocab(model, new_size, init_rows=sorted(added.values()), mean_of=old_ids)
    hp, style = _hyperparameters(folder, added), find_in_run(folder, PROMPT_STYLE)

    def write(tmp: Path) -> None:
        save_model(tmp, model, tok, hp)
        if style is not None:
            shutil.copy2(style, tmp / PROMPT_STYLE)

    write_folder(out, write, overwrite, inputs=inputs)
    return GrownVocabulary(added, present, old_size, new_size)
