"""`llmscratch inspect`: pictures of a checkpoint for learners — its attention heads and its token embeddings."""

from __future__ import annotations

from pathlib import Path

from llmscratch.cli.base import Group, Verb, device_options, overwrite_option
from llmscratch.errors import UserError


def _load(checkpoint: str, device: str):
    """(model, tokenizer) in fp32 from a checkpoint, run or adapter folder (an adapter merged in memory)."""
    from llmscratch import runs
    from llmscratch.checkpoint import load
    from llmscratch.lora import load_merged
    from llmscratch.runtime import resolve_device

    load_fn = load_merged if runs.is_adapter_only(checkpoint) else load
    return load_fn(checkpoint, device=resolve_device(device))


def _indices(text: str | None, flag: str) -> list[int] | None:
    """`--layers 0,2` → [0, 2]; None when not given."""
    if text is None:
        return None
    try:
        return [int(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        raise UserError(f"{flag} {text}: give comma-separated numbers, e.g. 0,1") from None


def _check_out(a) -> None:
    """The --out guard, before any work: a new .png file (or replaced with --overwrite), never a folder or the
    checkpoint."""
    from llmscratch.runs import check_out_file

    if Path(a.out).suffix.lower() != ".png":
        raise UserError(f"--out {a.out}: the picture is written as PNG; give a file name ending in .png")
    check_out_file(a.out, a.overwrite, inputs=(a.checkpoint,))


def _save(fig, out: str) -> None:
    """Write the figure as PNG atomically (a crash leaves no half-written file at `out`)."""
    from llmscratch.fileio import atomic_write
    from llmscratch.train.metrics import save_figure

    atomic_write(Path(out), lambda tmp: save_figure(fig, tmp))


# --- inspect attention ------------------------------------------------------------------------------------
def _attention_parser(p) -> None:
    p.add_argument("checkpoint", help="checkpoint, run or LoRA adapter folder")
    p.add_argument("--prompt", required=True, help="the text whose attention is drawn (its tokens label the axes)")
    p.add_argument("--out", required=True, help="PNG file to write (new, or replaced with --overwrite)")
    overwrite_option(p, "--out file")
    p.add_argument("--layers", default=None, help="comma-separated layers to draw (default: all)")
    p.add_argument("--heads", default=None, help="comma-separated heads to draw (default: all)")
    device_options(p)


def cmd_inspect_attention(a) -> None:
    from llmscratch.viz import attention_maps, plot_attention

    _check_out(a)
    layers, heads = _indices(a.layers, "--layers"), _indices(a.heads, "--heads")
    model, tok = _load(a.checkpoint, a.device)
    tokens, weights = attention_maps(model, tok, a.prompt)
    fig = plot_attention(tokens, weights, layers, heads, title=f"attention of {a.checkpoint}")
    _save(fig, a.out)
    print(f"wrote {a.out}: {len(layers or range(weights.size(0)))} layer(s) × {len(heads or range(weights.size(1)))} "
          f"head(s) over {len(tokens)} tokens (rows: the token reading; columns: the token read)")


# --- inspect embeddings -----------------------------------------------------------------------------------
def _embeddings_parser(p) -> None:
    p.add_argument("checkpoint", help="checkpoint, run or LoRA adapter folder")
    p.add_argument("--out", required=True, help="PNG file to write (new, or replaced with --overwrite)")
    overwrite_option(p, "--out file")
    p.add_argument("--words", default=None,
                   help="comma-separated words to place (each the mean of its tokens' embeddings); default: the "
                        "first word-like tokens of the vocabulary")
    p.add_argument("--n", type=int, default=60, help="how many vocabulary tokens to place without --words")
    device_options(p)


def cmd_inspect_embeddings(a) -> None:
    from llmscratch.viz import embedding_projection, plot_embeddings

    _check_out(a)
    if a.n < 2:
        raise UserError(f"--n {a.n}: place at least 2 tokens")
    words = [w.strip() for w in a.words.split(",") if w.strip()] if a.words else None
    model, tok = _load(a.checkpoint, a.device)
    labels, coords = embedding_projection(model, tok, words, a.n)
    _save(plot_embeddings(labels, coords, title=f"token embeddings of {a.checkpoint} (PCA)"), a.out)
    print(f"wrote {a.out}: {len(labels)} tokens on the two principal components of their embeddings")


INSPECT = Group("Pictures of a checkpoint for learners.", "draw a checkpoint's attention heads or token embeddings", {
    "attention": Verb("Draw every attention head's weights while the model reads --prompt: a grid of heatmaps, "
                      "one row per layer and one column per head, the tokens as labels.",
                      _attention_parser, cmd_inspect_attention),
    "embeddings": Verb("Draw token embeddings projected on their two principal components (PCA), labelled.",
                       _embeddings_parser, cmd_inspect_embeddings),
})
