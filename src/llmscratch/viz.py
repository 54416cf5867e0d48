"""Pictures for learners: what each attention head looks at, and where the token embeddings lie.

    tokens, weights = attention_maps(model, tokenizer, "The cat sat on the mat")  # (layers, heads, T, T)
    plot_attention(tokens, weights).savefig("attn.png")
    labels, coords = embedding_projection(model, tokenizer, ["king", "queen", "man", "woman"])
    plot_embeddings(labels, coords).savefig("emb.png")

`llmscratch inspect attention|embeddings` draws the same figures from a checkpoint folder, and the chapter
notebooks call these functions too.
"""

from __future__ import annotations

import math

import torch

from llmscratch.errors import UserError


def token_labels(tokenizer, ids: list[int]) -> list[str]:
    """Each id decoded on its own, with spaces and newlines made visible, for axis labels."""
    return [tokenizer.decode([i]).replace("\n", "⏎").replace(" ", "·") or "∅" for i in ids]


@torch.no_grad()
def attention_maps(model, tokenizer, text: str) -> tuple[list[str], torch.Tensor]:
    """(token labels, weights (n_layers, n_heads, T, T)): the causal attention weights of every head of every
    layer while the model reads `text` — row t is what token t attends to, each row sums to 1."""
    ids = tokenizer.encode(text, allowed_special="all")
    if not ids:
        raise UserError("the prompt is empty after tokenization; give some text")
    limit = model.config.context_length
    if len(ids) > limit:
        raise UserError(f"the prompt has {len(ids)} tokens, more than the model's context of {limit}; shorten it")
    idx = torch.tensor([ids], device=next(model.parameters()).device)
    maps = []

    def keep(attn, args):  # a block's attention input: (x, input_pos, rope)
        maps.append(attn.attention_weights(args[0], args[2] if len(args) > 2 else None)[0])

    hooks = [block.attn.register_forward_pre_hook(keep) for block in model.blocks]
    was_training = model.training
    try:
        model.eval()
        model(idx)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return token_labels(tokenizer, ids), torch.stack(maps).cpu()


def plot_attention(tokens: list[str], weights: torch.Tensor, layers: list[int] | None = None,
                   heads: list[int] | None = None, title: str | None = None):
    """A grid of heatmaps, one row per layer and one column per head (all of them unless chosen), with the
    tokens as labels: the query (the token reading) down, the key (the token read) across."""
    from llmscratch.train.metrics import subplots

    layers = list(range(weights.size(0))) if layers is None else list(layers)
    heads = list(range(weights.size(1))) if heads is None else list(heads)
    for name, chosen, n in (("layer", layers, weights.size(0)), ("head", heads, weights.size(1))):
        bad = [i for i in chosen if not 0 <= i < n]
        if bad or not chosen:
            raise UserError(f"--{name}s {','.join(map(str, bad or chosen))}: the model has {name}s 0..{n - 1}")
    T = len(tokens)
    cell = max(1.6, min(4.0, 0.28 * T))
    fig, axes = subplots(len(layers), len(heads), figsize=(cell * len(heads) + 0.5, cell * len(layers) + 0.5),
                         squeeze=False)
    show_labels = T <= 40
    for r, layer in enumerate(layers):
        for c, head in enumerate(heads):
            ax = axes[r][c]
            ax.imshow(weights[layer, head].float().numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
            ax.set_title(f"layer {layer} · head {head}", fontsize=8)
            if show_labels:
                ax.set_xticks(range(T), tokens, rotation=90, fontsize=6)
                ax.set_yticks(range(T), tokens, fontsize=6)
            else:
                ax.set_xticks([])
                ax.set_yticks([])
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def _project_2d(vectors: torch.Tensor) -> torch.Tensor:
    """The rows of `vectors` (N, d) on their first two principal components (N, 2)."""
    centred = vectors.float() - vectors.float().mean(0, keepdim=True)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    return centred @ v[:2].T


@torch.no_grad()
def embedding_projection(model, tokenizer, words: list[str] | None = None,
                         n: int = 60) -> tuple[list[str], torch.Tensor]:
    """(labels, coords (N, 2)): token embeddings projected on their two principal components (PCA). `words`:
    each word's embedding (the mean of its tokens' rows); default: the first `n` word-like tokens of the
    vocabulary (those decoding to letters, after the single bytes)."""
    table = model.tok_emb.weight.detach()
    if words:
        labels, rows = [], []
        for w in words:
            ids = tokenizer.encode(w, allowed_special="none")
            if not ids:
                raise UserError(f"{w!r} has no tokens; give non-empty words")
            labels.append(w)
            rows.append(table[ids].float().mean(0))
        vectors = torch.stack(rows)
    else:
        ids = [i for i in range(256, min(table.size(0), 256 + 50 * n))
               if tokenizer.decode([i]).strip().isalpha()][:n]
        if len(ids) < 2:
            ids = list(range(min(n, table.size(0))))
        labels, vectors = token_labels(tokenizer, ids), table[ids].float()
    if len(labels) < 2:
        raise UserError("a projection needs at least two words")
    return labels, _project_2d(vectors.cpu())


def plot_embeddings(labels: list[str], coords: torch.Tensor, title: str = "token embeddings (PCA)"):
    """The projected embeddings as labelled points."""
    from llmscratch.train.metrics import subplots

    side = max(5.0, min(10.0, 2 + math.sqrt(len(labels))))
    fig, ax = subplots(figsize=(side, side))
    ax.scatter(coords[:, 0].numpy(), coords[:, 1].numpy(), s=12)
    for label, (x, y) in zip(labels, coords.tolist()):
        ax.annotate(label, (x, y), fontsize=8, xytext=(2, 2), textcoords="offset points")
    ax.set_xlabel("principal component 1")
    ax.set_ylabel("principal component 2")
    ax.set_title(title)
    fig.tight_layout()
    return fig
