"""Pretraining: corpus → tokenizer → token files → GPT → the one trainer. (The offline quickstart that runs it
on the embedded corpus is `llmscratch.train.quickstart`.)"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import numpy as np
import torch

from llmscratch import runs
from llmscratch.config import ModelConfig
from llmscratch.errors import UserError
from llmscratch.runs import check_out_dir, latest_checkpoint, removed_on_failure
from llmscratch.runtime import resolve_device
from llmscratch.train import distributed
from llmscratch.train.batches import WindowBatches
from llmscratch.train.trainer import TrainConfig, TrainResult, find_micro_batch, train


class LMBatches(WindowBatches):
    """Random windows from prepared token files (`WindowBatches`' seeded streams; the train stream's generator state
    is the data position)."""

    def __init__(self, data_dir: str | Path, batch_size: int, context_length: int, seed: int = 0,
                 device: str | torch.device = "cpu"):
        from llmscratch.data.lm import TokenMemmap

        self.splits = {s: TokenMemmap(data_dir, s) for s in ("train", "val")}
        for split, mm in self.splits.items():
            if mm.num_tokens < context_length + 1:
                raise UserError(f"{mm.path}: the {split} split has {mm.num_tokens} tokens, fewer than one window "
                                f"of {context_length + 1}; use more text or a smaller --context-length")
        super().__init__(batch_size, context_length, seed, device)

    def _draw(self, split: str, generator: torch.Generator):
        return self.splits[split].get_batch(self.batch_size, self.context_length, generator, self.device,
                                            pin=self.device.type == "cuda")


is_prepared = runs.is_prepared_data


def prepare(data: str, tokenizer, out: str | Path, val_fraction: float = 0.1, seed: int = 0,
            progress: bool = True, text_field: str = "text"):
    """Tokenize corpus `data` into `out` (train.bin, val.bin, meta.json) and save the tokenizer beside them. The
    corpus is streamed (`iter_corpus`): memory stays bounded however large it is. `text_field`: the field that
    holds the text in JSONL and parquet files."""
    from llmscratch.data import prepare_tokens
    from llmscratch.data.corpora import iter_corpus

    corpus = iter_corpus(data, text_field=text_field, progress=progress)
    meta = prepare_tokens(corpus, tokenizer, out, val_fraction=val_fraction, seed=seed, source=str(data),
                          progress=progress, size_bytes=corpus.nbytes)
    tokenizer.save(out)
    return meta


def sample_fn(tokenizer, prompt: str, max_new_tokens: int = 40, seed: int = 0):
    from llmscratch.generate import generate

    def sample(model) -> str:
        return generate(model, tokenizer, prompt, max_new_tokens=max_new_tokens, temperature=0.8, top_k=40,
                        seed=seed)
    return sample


def run_pretrain(model: str | None = None, data: str = "pydocs", out: str | Path = "runs/pretrain",
                 tokenizer: str | None = None, resume: bool = False, train_cfg: TrainConfig | None = None,
                 context_length: int | None = None, dropout: float | None = None,
                 sample_prompt: str = "The", progress: bool = True, overwrite: bool = False) -> TrainResult:
    """Pretrain `model` (a preset; default gpt-mini) on `data` (a corpus or a folder made by `prepare`) into
    `out`. With `resume`, the run continues from its newest checkpoint, whose model it keeps: a `model`,
    `context_length` or `dropout` that differs from the run's is refused. `overwrite` replaces a run in `out`."""
    from llmscratch.model import GPT

    out = Path(out)
    cfg = train_cfg or TrainConfig()
    cfg.check()
    if model is not None:
        ModelConfig.from_preset(model)  # unknown preset → error before anything is written
    r = distributed.ranks()  # several under torchrun: rank 0 alone checks --out and tokenizes
    if r.active:
        distributed.setup(cfg.device)
        distributed.check_global_batch(cfg.batch_size, r)
    replace = distributed.on_main(lambda: runs.check_run_folder(out, resume, overwrite, inputs=(data, tokenizer)), r)
    before = None if resume else distributed.on_main(lambda: _claim(out, replace), r)
    # A resumed run keeps everything it has; a new one that fails before its first checkpoint leaves nothing.
    cleanup = removed_on_failure(out, before) if r.main and not resume else contextlib.nullcontext()
    with cleanup, distributed.peers_answer(r):
        if resume:
            model, model_cfg, tok, data_dir = _resumed_run(out, model, data, context_length, dropout)
        else:
            model = model or "gpt-mini"
            made = distributed.on_main(lambda: _new_run(out, model, data, tokenizer, context_length, dropout, cfg,
                                                        progress), r)
            if not r.main:  # read what rank 0 prepared
                prepared = is_prepared(data)
                made = _new_run(out, model, data if prepared else str(out / runs.DATA),
                                tokenizer if prepared else None, context_length, dropout, cfg, False)
            model_cfg, tok, data_dir = made
        check_token_ids(data_dir, model_cfg.vocab_size)
        device = resolve_device(cfg.device) if not r.active else distributed.setup(cfg.device)[1]
        torch.manual_seed(cfg.seed)
        net = GPT(model_cfg)
        if cfg.batch_size == 0:  # auto: the largest micro-batch that fits
            cfg = dataclasses.replace(cfg, batch_size=find_micro_batch(net, model_cfg.context_length, cfg, device))
            print(f"micro-batch size: {cfg.batch_size} sequences of {model_cfg.context_length} tokens")
            torch.manual_seed(cfg.seed)
            net = GPT(model_cfg)  # a fresh initialisation, untouched by the trial steps
        batches = LMBatches(data_dir, cfg.batch_size, model_cfg.context_length, cfg.seed, device)
        hparams = {"model": model, "data": str(data), "data_dir": str(data_dir)}
        result = train(net, batches, cfg, out, tokenizer=tok, resume=resume, hparams=hparams,
                       sample_fn=sample_fn(tok, sample_prompt, seed=cfg.seed))
    distributed.finish(r)
    return result


def _claim(out: Path, replace: bool) -> frozenset[str] | None:
    """Create (or, to replace an earlier run, clear) the new run's folder; returns what it held before."""
    before = check_out_dir(out)
    if replace:
        runs.clear_run(out)
    return before


def check_token_ids(data_dir: str | Path, vocab_size: int) -> None:
    """Refuse prepared token files holding ids the model has no embedding for (prepared with a larger
    tokenizer than the model's): the embedding lookup would fail mid-run with an index error."""
    from llmscratch.data.lm import TokenMemmap, read_meta

    meta = read_meta(data_dir)
    largest = max((int(m.tokens.max()) for m in (TokenMemmap(data_dir, s) for s in runs.TOKEN_SPLITS)
                   if m.num_tokens), default=-1)
    if meta.vocab_size > vocab_size or largest >= vocab_size:
        raise UserError(f"{Path(data_dir) / runs.TOKENS_META}: token ids up to {max(largest, meta.vocab_size - 1)} "
                        f"(a {meta.vocab_size}-token tokenizer) but the model has {vocab_size} embeddings; prepare "
                        "the data with the model's tokenizer or use a model with a larger vocabulary")


def _new_run(out: Path, model: str, data: str, tokenizer: str | None, context_length: int | None,
             dropout: float | None, cfg: TrainConfig, progress: bool):
    """(model config, tokenizer, token folder) of a new run; tokenizes `data` into the run's folder unless it
    is a prepared folder already."""
    from llmscratch.tokenizer import load_tokenizer

    if is_prepared(data):
        data_dir = Path(data)
        tok = load_tokenizer(tokenizer or data_dir)
    else:
        tok = load_tokenizer(tokenizer or "gpt2")
        data_dir = out / runs.DATA
        prepare(data, tok, data_dir, seed=cfg.seed, progress=progress)
    overrides = {"vocab_size": tok.vocab_size}
    if context_length:
        overrides["context_length"] = context_length
    if dropout is not None:
        overrides["dropout"] = dropout
    model_cfg = ModelConfig.from_preset(model, **overrides)
    LMBatches(data_dir, max(cfg.batch_size, 1), model_cfg.context_length)  # too little text → error now
    return model_cfg, tok, data_dir


def _resumed_run(out: Path, model: str | None, data: str, context_length: int | None, dropout: float | None):
    """(preset name, model config, tokenizer, token folder) of the run in `out`; a model setting given for the
    resumed run that differs from the run's own is an error, not silently ignored."""
    import yaml

    from llmscratch.tokenizer import load_tokenizer

    ckpt = latest_checkpoint(out)
    model_cfg = ModelConfig.load(ckpt / runs.CONFIG)
    hp = {}
    if (ckpt / runs.HPARAMS).is_file():
        hp = yaml.safe_load((ckpt / runs.HPARAMS).read_text()) or {}
    run_model = hp.get("model") or model_cfg.name
    conflicts = [f"{flag} {given} (the run has {have})" for flag, given, have in (
        ("--model", model, run_model), ("--context-length", context_length, model_cfg.context_length),
        ("--dropout", dropout, model_cfg.dropout)) if given is not None and given != have]
    if conflicts:
        raise UserError(f"--resume {out}: {'; '.join(conflicts)}; a resumed run keeps its model: drop "
                        f"{'these options' if len(conflicts) > 1 else 'this option'} or start a new run")
    data_dir = Path(data) if is_prepared(data) else out / runs.DATA
    return run_model, model_cfg, load_tokenizer(ckpt), data_dir


def unigram_cross_entropy(data_dir: str | Path) -> float:
    """Cross-entropy (nats/token) on val of the train split's token frequencies: the loss of a model that
    ignores context. A language model has learned something real only once its val loss is clearly below."""
    from llmscratch.data.lm import TokenMemmap

    train_t = TokenMemmap(data_dir, "train").tokens
    val_t = TokenMemmap(data_dir, "val").tokens
    vocab = int(max(train_t.max(), val_t.max())) + 1
    counts = np.bincount(np.asarray(train_t), minlength=vocab).astype(np.float64) + 0.5  # add-half smoothing
    logp = np.log(counts / counts.sum())
    return float(-logp[np.asarray(val_t)].mean())
