"""Verbs from text to a pretrained model: `tokenizer train`, `prepare`, `pretrain`, and `quickstart`, which runs
them all on the embedded corpus."""

from __future__ import annotations

from typing import Optional

from llmscratch.cli.base import (
    CORPUS_HELP,
    Fraction,
    Group,
    PositiveFloat,
    PositiveInt,
    Seed,
    Verb,
    VocabSize,
    _train_config,
    device_options,
    exit_if_interrupted,
    overwrite_option,
    progress_option,
    run_summary,
    train_options,
)


# --- tokenizer train --------------------------------------------------------------------------------------
def _tokenizer_train_parser(p) -> None:
    p.add_argument("--data", required=True, help=CORPUS_HELP)
    p.add_argument("--vocab-size", type=VocabSize, default=4096, help="target vocabulary size incl. special tokens")
    p.add_argument("--out", type=str, required=True, help="folder to write tokenizer.json into (new or empty)")
    overwrite_option(p)


def cmd_tokenizer_train(a) -> None:
    from llmscratch.data import load_corpus
    from llmscratch.runs import check_out_folder, write_folder
    from llmscratch.tokenizer import BPETokenizer

    check_out_folder(a.out, a.overwrite, inputs=(a.data,))
    docs = load_corpus(a.data)
    tok = BPETokenizer.train(docs, a.vocab_size)
    write_folder(a.out, tok.save, a.overwrite, inputs=(a.data,))
    print(f"trained a {tok.vocab_size}-token BPE on {a.data}; saved to {a.out}")


# --- tokenizer add-tokens ---------------------------------------------------------------------------------
def _tokenizer_add_tokens_parser(p) -> None:
    p.add_argument("checkpoint", help="checkpoint folder (or a training run: its newest checkpoint)")
    p.add_argument("--tokens", nargs="+", required=True,
                   help='the special tokens to add, each quoted, e.g. --tokens "<|user|>" "<|assistant|>"')
    p.add_argument("--out", type=str, required=True, help="checkpoint folder to write (new or empty)")
    overwrite_option(p)


def cmd_tokenizer_add_tokens(a) -> None:
    from llmscratch.model.resize import add_tokens

    grown = add_tokens(a.checkpoint, a.tokens, a.out, overwrite=a.overwrite)
    for token, token_id in grown.present.items():
        print(f"{token!r} is already token {token_id}; not added again")
    if grown.added:
        listed = ", ".join(f"{token!r}={token_id}" for token, token_id in grown.added.items())
        print(f"added {len(grown.added)} special token(s): {listed}; vocabulary {grown.old_size} → "
              f"{grown.new_size}; new rows start at the mean embedding; wrote {a.out}")
    else:
        print(f"nothing to add; wrote an unchanged copy to {a.out}")


TOKENIZER = Group("Tokenizer tools.", "train a byte-level BPE tokenizer, or add special tokens to a checkpoint", {
    "train": Verb("Train a byte-level BPE tokenizer (GPT-2's pre-tokenizer) on a corpus.", _tokenizer_train_parser,
                  cmd_tokenizer_train),
    "add-tokens": Verb("Add special tokens to a checkpoint's tokenizer (ours, GPT-2's, or a Hugging Face "
                       "tokenizer.json) and grow its token embedding and LM head to match: new ids follow the "
                       "tokenizer's old ones, new rows start at the mean of the old rows, and old tokens keep "
                       "their ids and logits. Writes a new checkpoint folder to fine-tune.",
                       _tokenizer_add_tokens_parser, cmd_tokenizer_add_tokens),
})


# --- prepare ----------------------------------------------------------------------------------------------
def _prepare_parser(p) -> None:
    p.add_argument("--data", required=True, help=CORPUS_HELP)
    p.add_argument("--tokenizer", default="gpt2", help="a tokenizer folder, or `gpt2` (tiktoken's GPT-2 BPE)")
    p.add_argument("--out", required=True,
                   help="folder for train.bin, val.bin, meta.json and the tokenizer (new or empty)")
    p.add_argument("--val-fraction", type=Fraction, default=0.1, help="share of random chunks held out")
    p.add_argument("--seed", type=Seed, default=0, help="seed of the train/val chunk draw")
    p.add_argument("--text-field", default="text", metavar="NAME",
                   help="the field that holds the text in .jsonl records and the column in .parquet files")
    overwrite_option(p)


def cmd_prepare(a) -> None:
    from llmscratch.runs import check_out_folder, write_folder
    from llmscratch.tokenizer import load_tokenizer
    from llmscratch.train.pretrain import prepare

    inputs = (a.data, a.tokenizer)
    check_out_folder(a.out, a.overwrite, inputs)
    tok = load_tokenizer(a.tokenizer)
    metas = []
    write_folder(a.out, lambda tmp: metas.append(prepare(a.data, tok, tmp, val_fraction=a.val_fraction,
                                                        seed=a.seed, text_field=a.text_field)), a.overwrite, inputs)
    meta = metas[0]
    print(f"wrote {meta.train_tokens:,} train and {meta.val_tokens:,} val tokens ({meta.dtype}) to {a.out}")


PREPARE = Verb("Tokenize a corpus into train.bin/val.bin token files (uint16/uint32 memmaps).", _prepare_parser,
               cmd_prepare)


# --- pretrain ---------------------------------------------------------------------------------------------
def _pretrain_parser(p) -> None:
    from llmscratch.config import PRESETS

    p.add_argument("--model", default=None,
                   help=f"preset: {', '.join(PRESETS)} (default: gpt-mini; with --resume, the run's own)")
    p.add_argument("--data", default="pydocs", help=CORPUS_HELP + ", or a folder made by `prepare`")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer folder or `gpt2` (default: the prepared folder's, else gpt2)")
    p.add_argument("--out", required=True, help="run folder (model files, checkpoints/, metrics.csv, loss.png)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in --out (with the run's model: --model, "
                        "--context-length or --dropout that differ from it are refused)")
    overwrite_option(p, run=True)
    p.add_argument("--context-length", type=Optional[PositiveInt], default=None,
                   help="override the preset's context length")
    p.add_argument("--dropout", type=Optional[Fraction], default=None, help="override the preset's dropout")
    p.add_argument("--sample-prompt", default="The", help="prompt of the periodic samples")
    progress_option(p)
    train_options(p)


def cmd_pretrain(a) -> None:
    from llmscratch.train.pretrain import run_pretrain

    cfg = _train_config(a)
    r = run_pretrain(a.model, a.data, a.out, a.tokenizer, a.resume, cfg, a.context_length, a.dropout,
                     a.sample_prompt, progress=not a.no_progress, overwrite=a.overwrite)
    from llmscratch.train.distributed import ranks

    if ranks().main:  # under torchrun every rank returns the same result
        print(run_summary(r, a.out))
    exit_if_interrupted(r)


PRETRAIN = Verb("Pretrain a GPT with next-token prediction; checkpoints, metrics.csv and loss.png go to --out.",
                _pretrain_parser, cmd_pretrain)


# --- quickstart -------------------------------------------------------------------------------------------
def _quickstart_parser(p) -> None:
    p.add_argument("--minutes", type=PositiveFloat, default=4.0, help="pretraining time budget")
    p.add_argument("--out", default="runs/quickstart", help="run folder")
    p.add_argument("--model", default="auto",
                   help="auto (default): time a few training steps of gpt-tiny and gpt-mini here and train the "
                        "largest that makes at least 3 passes over the corpus in --minutes (else gpt-tiny); or "
                        "a preset to train")
    p.add_argument("--vocab-size", type=VocabSize, default=4096, help="BPE vocabulary size")
    device_options(p)
    overwrite_option(p, run=True)
    progress_option(p, "no progress bars")


def cmd_quickstart(a) -> None:
    from llmscratch.train.quickstart import quickstart

    r = quickstart(a.out, a.minutes, a.vocab_size, a.model, a.device, overwrite=a.overwrite,
                   progress=not a.no_progress)
    if r["stopped_early"] == "interrupt":  # saved; 130 as for the other training verbs (exit_if_interrupted)
        raise SystemExit(130)


QUICKSTART = Verb("Offline end to end on the embedded pydocs corpus: tokenizer, data, a small GPT pretrained for "
                  "a few minutes, samples before/after, loss vs the unigram baseline.", _quickstart_parser,
                  cmd_quickstart)
