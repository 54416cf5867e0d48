"""Instruction fine-tuning (the book's chapter 7): records → prompt-styled token examples with the prompt
masked → the one trainer → a checkpoint that remembers its prompt style → the test-set responses.

The loss is the model's own next-token cross-entropy; the collate sets prompt and padding targets to -100,
so only answer tokens (and the end-of-text that closes each answer) are learned.
"""

from __future__ import annotations

from pathlib import Path

import torch

from llmscratch.errors import UserError
from llmscratch.finetune.defaults import INSTRUCT, instruct_train_config
from llmscratch.finetune.stage import (
    Stage,
    StageResult,
    answer_test_split,
    check_epochs,
    check_max_length,
    steps_for_epochs,
)
from llmscratch.train.config import TrainConfig

__all__ = ["instruct_loss", "run_instruct", "steps_for_epochs"]


def instruct_loss(model, batch) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over the unmasked (answer) targets of an `InstructCollate` batch."""
    x, y, n_targets = batch
    return model(x, targets=y), n_targets


def run_instruct(checkpoint: str | Path, data: str | Path, out: str | Path,
                 prompt_style: str = INSTRUCT.prompt_style, train_cfg: TrainConfig | None = None,
                 epochs: float | None = INSTRUCT.epochs, max_length: int | None = None, train_on_prompt: bool = False,
                 val_fraction: float = INSTRUCT.val_fraction, test_fraction: float = INSTRUCT.test_fraction,
                 split_seed: int = INSTRUCT.split_seed, max_new_tokens: int = INSTRUCT.max_new_tokens,
                 resume: bool = False, overwrite: bool = False, progress: bool = True, log=print,
                 lora=None) -> StageResult:
    """Fine-tune `checkpoint` on instruction records `data` into `out`; see `llmscratch finetune instruct -h`.

    `train_cfg` defaults to `finetune.defaults.instruct_train_config()`. `epochs` sets the number of optimizer
    steps (None: keep `train_cfg.max_steps`). After training, each test record is answered greedily and written
    with its `model_response` to `out/test_responses.json`. `lora` (a `LoRASettings`) trains adapters only and
    leaves an adapter folder in `out`. `metrics["responses"]` is that file's path (None when none was written).
    """
    from llmscratch.data.instruct import InstructCollate, load_records, split_records
    from llmscratch.prompts import get_style, save_style

    stage = Stage("instruct", checkpoint, out, train_cfg or instruct_train_config(), resume=resume,
                  overwrite=overwrite, lora=lora, log=log, data=data)
    log, progress = stage.log, progress and stage.ranks.main  # under torchrun rank 0 alone speaks
    style = get_style(prompt_style)
    check_epochs(epochs)
    records = stage.main_first(lambda: load_records(data, progress=progress))
    model, tok = stage.load_base()
    stage.apply_lora(model)
    max_length = check_max_length(max_length, model.config.context_length)
    recs = split_records(records, split_seed, val_fraction, test_fraction)
    train_ex, val_ex = _encode(recs, tok, style, max_length, not train_on_prompt, stage.cfg.batch_size, data, log)
    log(f"{len(records)} records from {data} → train {len(recs[0])} / val {len(recs[1])} / test "
        f"{len(recs[2])} (seed {split_seed}); prompt style {style.name}, "
        f"{'training on prompt and answer' if train_on_prompt else 'answer tokens only (prompt masked)'}")

    collate = InstructCollate(pad_id=tok.eos_id, mask_prompt=not train_on_prompt, device=stage.device)
    batches = stage.batches(train_ex, val_ex, collate, own_rows=True)  # (each rank counts its own targets)
    cfg = stage.steps_for_epochs(epochs, batches.batches_per_epoch)
    log(f"{cfg.max_steps} steps of {cfg.batch_size * cfg.grad_accum} examples "
        f"({cfg.max_steps * cfg.batch_size * cfg.grad_accum / len(train_ex):.2f} epochs)")
    hparams = {"data": str(data), "prompt_style": style.name, "epochs": epochs, "max_length": max_length,
               "train_on_prompt": train_on_prompt,
               "split": {"seed": split_seed, "val_fraction": val_fraction, "test_fraction": test_fraction}}
    sample_record = (recs[1] or recs[0])[0]

    def sample(m) -> str:
        from llmscratch.generate import generate_batch

        return generate_batch(m, tok, [style.prompt(sample_record)], max_new_tokens=min(64, max_new_tokens),
                              stop=style.stop)[0]

    # The style is written before training: checkpoints/step-* folders find it in their run folder.
    result = stage.train(model, batches, cfg, tok, hparams, before=lambda o: save_style(o, style.name),
                         loss_fn=instruct_loss, sample_fn=sample)
    if not stage.end_training():  # rank 0 alone answers the test split and writes
        return stage.result(result, *map(len, recs))
    model = stage.trained(model)
    responses = answer_test_split(result, model, tok, style, recs[2], stage.out, max_new_tokens, progress, log)
    stage.finish(model, tok, result)
    return stage.result(result, *map(len, recs), metrics={"responses": responses})


def _encode(recs, tok, style, max_length: int, mask_prompt: bool, batch_size: int, data, log):
    """Token examples of the train and validation records; UserError when too few fit."""
    from llmscratch.data.instruct import encode_records

    train_ex, train_stats = encode_records(recs[0], tok, style, max_length, mask_prompt)
    val_ex, val_stats = encode_records(recs[1], tok, style, max_length, mask_prompt)
    if not train_ex:
        raise UserError(f"{data}: every training prompt is longer than --max-length {max_length}; raise it")
    log(f"train: {train_stats.describe(max_length)}; val: {val_stats.describe(max_length)}")
    if len(train_ex) < batch_size:
        raise UserError(f"{len(train_ex)} training examples are fewer than one batch of {batch_size}; "
                        "lower --train.batch_size or add data")
    return train_ex, val_ex
