"""Instruction fine-tuning (the book's chapter 7): records → prompt-styled token examples with the prompt
masked → the one trainer → a checkpoint that remembers its prompt style → the test-set responses.

The loss is the model's own next-token cross-entropy; the collate sets prompt and padding targets to -100,
so only answer tokens (and the end-of-text that closes each answer) are learned.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from llmscratch.errors import UserError
from llmscratch.train.trainer import TrainConfig, TrainResult, latest_checkpoint, train

RESPONSES_FILE = "test_responses.json"


def instruct_loss(model, batch) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over the unmasked (answer) targets of an `InstructCollate` batch."""
    x, y, n_targets = batch
    return model(x, targets=y), n_targets


@dataclass
class InstructResult:
    train: TrainResult
    n_train: int
    n_val: int
    n_test: int
    responses: Path | None  # the test-set responses file (None when interrupted or without a test split)


def steps_for_epochs(epochs: float, batches_per_epoch: int, grad_accum: int) -> int:
    """Optimizer updates that cover `epochs` passes over the training batches."""
    return max(1, math.ceil(epochs * batches_per_epoch / max(1, grad_accum)))


def run_instruct(checkpoint: str | Path, data: str | Path, out: str | Path, prompt_style: str = "alpaca",
                 train_cfg: TrainConfig | None = None, epochs: float | None = 2.0, max_length: int | None = None,
                 train_on_prompt: bool = False, val_fraction: float = 0.05, test_fraction: float = 0.10,
                 split_seed: int = 123, max_new_tokens: int = 256, resume: bool = False,
                 progress: bool = True, log=print, lora=None) -> InstructResult:
    """Fine-tune `checkpoint` on instruction records `data` into `out`; see `llmscratch finetune instruct -h`.

    `epochs` sets the number of optimizer steps (None: keep `train_cfg.max_steps`). After training, each test
    record is answered greedily and written with its `model_response` to `out/test_responses.json`.
    `lora` (a `llmscratch.lora.LoRASettings`) trains adapters only and leaves an adapter folder in `out`.
    """
    from llmscratch.checkpoint import load
    from llmscratch.data.instruct import InstructCollate, encode_records, load_records, split_records
    from llmscratch.generate import generate_batch
    from llmscratch.prompts import get_style, save_style
    from llmscratch.runtime import resolve_device
    from llmscratch.train.batches import ExampleBatches
    from llmscratch.train.pretrain import check_out_dir, removed_on_failure

    out = Path(out)
    cfg = train_cfg or TrainConfig()
    style = get_style(prompt_style)
    if epochs is not None and epochs <= 0:
        raise UserError(f"--epochs must be positive, got {epochs}")
    if resume and latest_checkpoint(out) is None:
        raise UserError(f"--resume: no checkpoint under {out / 'checkpoints'}; start without --resume")
    if not resume and latest_checkpoint(out) is not None:
        raise UserError(f"--out {out}: already holds a training run; pass --resume to continue it or choose "
                        "another folder")
    if lora is not None:
        lora.check()
    records = load_records(data, progress=progress)
    model, tok = load(checkpoint)
    if model.config.n_classes is not None:
        raise UserError(f"{checkpoint}: a classifier checkpoint; instruction tuning needs a language model")
    if lora is not None:
        from llmscratch.lora import apply_lora, lora_report

        apply_lora(model, lora.targets, lora.rank, lora.alpha, lora.dropout, seed=cfg.seed)
        log(str(lora_report(model)))
    context = model.config.context_length
    max_length = max_length or context
    if max_length > context:
        raise UserError(f"--max-length {max_length} exceeds the model's context length {context}")
    train_recs, val_recs, test_recs = split_records(records, split_seed, val_fraction, test_fraction)
    mask_prompt = not train_on_prompt
    train_ex, train_stats = encode_records(train_recs, tok, style, max_length, mask_prompt)
    val_ex, val_stats = encode_records(val_recs, tok, style, max_length, mask_prompt)
    if not train_ex:
        raise UserError(f"{data}: every training prompt is longer than --max-length {max_length}; raise it")
    log(f"{len(records)} records from {data} → train {len(train_recs)} / val {len(val_recs)} / test "
        f"{len(test_recs)} (seed {split_seed}); prompt style {style.name}, "
        f"{'training on prompt and answer' if train_on_prompt else 'answer tokens only (prompt masked)'}")
    log(f"train: {train_stats.describe(max_length)}; val: {val_stats.describe(max_length)}")
    if len(train_ex) < cfg.batch_size:
        raise UserError(f"{len(train_ex)} training examples are fewer than one batch of {cfg.batch_size}; "
                        "lower --train.batch_size or add data")

    if getattr(cfg, "compile", None) is None:
        cfg.compile = False  # dynamic padding gives each batch its own length: a compiled graph would recompile
    device = resolve_device(cfg.device)
    collate = InstructCollate(pad_id=tok.eos_id, mask_prompt=mask_prompt, device=device)
    batches = ExampleBatches(train_ex, val_ex, collate, cfg.batch_size, seed=cfg.seed)
    if epochs is not None:
        cfg.max_steps = steps_for_epochs(epochs, batches.batches_per_epoch, cfg.grad_accum)
    log(f"{cfg.max_steps} steps of {cfg.batch_size * cfg.grad_accum} examples "
        f"({cfg.max_steps * cfg.batch_size * cfg.grad_accum / len(train_ex):.2f} epochs)")

    created = check_out_dir(out)
    save_style(out, style.name)  # before training: checkpoints/step-* folders find it in their run folder
    hparams = {"stage": "instruct", "base": str(checkpoint), "data": str(data), "prompt_style": style.name,
               "epochs": epochs, "max_length": max_length, "train_on_prompt": train_on_prompt,
               "split": {"seed": split_seed, "val_fraction": val_fraction, "test_fraction": test_fraction}}
    if lora is not None:
        hparams["lora"] = {"rank": lora.rank, "alpha": lora.alpha, "targets": lora.targets, "dropout": lora.dropout}
    sample_record = (val_recs or train_recs)[0]

    def sample(m) -> str:
        return generate_batch(m, tok, [style.prompt(sample_record)], max_new_tokens=min(64, max_new_tokens),
                              stop=style.stop)[0]

    with removed_on_failure(out, created):
        result = train(model, batches, cfg, out, loss_fn=instruct_loss, tokenizer=tok, resume=resume,
                       hparams=hparams, sample_fn=sample)
    responses = finish_tuning_run(result, model, tok, style, test_recs, out, max_new_tokens, checkpoint, lora,
                                  progress, log)
    return InstructResult(result, len(train_recs), len(val_recs), len(test_recs), responses)


def finish_tuning_run(result, model, tokenizer, style, test_records: list[dict], out: Path, max_new_tokens: int,
                      base, lora, progress: bool, log) -> Path | None:
    """After an instruction (or preference) tuning run: answer the test records into `out/test_responses.json`
    unless training was interrupted, and with `lora` leave the adapter alone in `out`. Returns the responses'
    path, or None when none were written."""
    responses = None
    if result.stopped_early != "interrupt" and test_records:
        responses = out / RESPONSES_FILE
        write_responses(model, tokenizer, style, test_records, responses, max_new_tokens, progress=progress)
        log(f"wrote {len(test_records)} test-set responses to {responses}")
    if lora is not None:
        from llmscratch.lora import finish_adapter_run

        finish_adapter_run(out, model, base, tokenizer)
        log(f"saved the adapter alone to {out} (merge with `llmscratch lora merge {out} MERGED_DIR`)")
    return responses


def write_responses(model, tokenizer, style, records: list[dict], path: Path, max_new_tokens: int,
                    progress: bool = True, batch_size: int = 16) -> list[dict]:
    """Answer each record greedily and write the records with a `model_response` field as a JSON list."""
    from llmscratch.fileio import atomic_write_text
    from llmscratch.generate import generate_batch

    model.eval()
    texts = generate_batch(model, tokenizer, [style.prompt(r) for r in records], max_new_tokens=max_new_tokens,
                           stop=style.stop, batch_size=batch_size, progress=progress)
    answered = [{**r, "model_response": style.clean(t)} for r, t in zip(records, texts)]
    atomic_write_text(path, json.dumps(answered, indent=2, ensure_ascii=False) + "\n")
    return answered
