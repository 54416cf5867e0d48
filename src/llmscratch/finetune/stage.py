"""The skeleton every fine-tuning stage follows, so that classify, instruct and DPO differ only in their data,
model head and loss:

    guards → load the base → (LoRA) → batch source → train → finish

    stage = Stage("instruct", checkpoint, out, train_cfg, resume=..., overwrite=..., lora=...)  # guards
    model, tok = stage.load_base()                       # a language model (or any, with lm_only=False)
    stage.apply_lora(model)                              # no-op without LoRA settings
    batches = stage.batches(train, val, collate)         # the same seeded global batches on every rank
    cfg = stage.steps_for_epochs(epochs, batches)        # a copy: the caller's TrainConfig is never changed
    result = stage.train(model, batches, cfg, tok, hparams, loss_fn=...)
    if stage.end_training():                             # rank 0 (or the one process) goes on alone
        model = stage.trained(model)                     # (whole again after FSDP2)
        files = stage.finish(model, tok, result)         # adapter folder with LoRA; the files in `out`

Every stage returns a `StageResult`. Under torchrun (DDP, or FSDP2 with `--train.strategy fsdp`) every rank
trains its rows of each global batch (`llmscratch.train.distributed`); rank 0 alone checks --out, logs and
writes, and after training it alone evaluates, answers the test split and writes the stage's files (under FSDP2
with the model gathered whole: `trained`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from llmscratch import runs
from llmscratch.errors import UserError
from llmscratch.train.batches import ExampleBatches
from llmscratch.train.config import TrainConfig


@dataclass
class StageResult:
    """What every training stage returns: where its output went, how training ended, what was written, and the
    stage's own report (`metrics`: classify's accuracy per split, DPO's validation metrics before and after...).
    Under torchrun, ranks other than 0 return once training is over, with no `files` and no `metrics`."""

    out: Path
    train: object  # llmscratch.train.trainer.TrainResult
    files: list[str]
    n_train: int = 0
    n_val: int = 0
    n_test: int = 0
    metrics: dict = field(default_factory=dict)

    @property
    def adapter(self) -> bool:
        """Whether `out` holds a LoRA adapter (with its base, not full weights)."""
        return runs.ADAPTER_CONFIG in self.files and runs.WEIGHTS not in self.files


def steps_for_epochs(epochs: float, batches_per_epoch: int, grad_accum: int) -> int:
    """Optimizer updates that cover `epochs` passes over the training batches."""
    return max(1, math.ceil(epochs * batches_per_epoch / max(1, grad_accum)))


def check_max_length(max_length: int | None, context: int) -> int:
    """`--max-length`, defaulting to the model's context length; UserError when out of (0, context]."""
    if max_length is None:
        return context
    if max_length <= 0:
        raise UserError(f"--max-length must be positive, got {max_length}")
    if max_length > context:
        raise UserError(f"--max-length {max_length} exceeds the model's context length {context}; "
                        f"use at most {context}")
    return max_length


def check_epochs(epochs: float | None) -> None:
    if epochs is not None and epochs <= 0:
        raise UserError(f"--epochs must be positive, got {epochs}")


class Stage:
    """One fine-tuning run into `out`: checks the output folder up front (before any data or model is read),
    then gives the steps every stage shares."""

    def __init__(self, name: str, checkpoint: str | Path, out: str | Path, train_cfg: TrainConfig, *,
                 resume: bool = False, overwrite: bool = False, lora=None, log: Callable[[str], None] = print,
                 data: str | Path | None = None):
        from llmscratch.train import distributed

        self.name, self.checkpoint, self.out = name, checkpoint, Path(out)
        self.cfg, self.resume, self.lora = train_cfg, resume, lora
        self._whole = None  # under FSDP2: the trained model gathered whole on rank 0 (`trained`)
        train_cfg.check()  # a bad setting is reported before any data or model is read
        if lora is not None:
            lora.check()
        # Under torchrun: join the processes' group; rank 0 alone checks (and may tidy) --out, then tells the rest.
        self.ranks, self.device = distributed.setup(train_cfg.device)
        distributed.check_global_batch(train_cfg.batch_size, self.ranks)
        self.log = log if self.ranks.main else _silent  # one process speaks for the run
        self.replace = distributed.on_main(lambda: self._check_out(overwrite, data), self.ranks)
        self.base_folder = runs.find_model_folder(checkpoint)

    def _check_out(self, overwrite: bool, data) -> bool:
        """The --out guards; returns whether `out` holds files the run replaces."""
        replace = runs.check_run_folder(self.out, self.resume, overwrite, inputs=(self.checkpoint, data))
        if self.lora is not None and not self.resume and (self.out / runs.WEIGHTS).exists():
            raise UserError(f"--out {self.out}: holds full model weights ({runs.WEIGHTS}) that a LoRA run would "
                            "replace by an adapter and delete; choose another folder")
        if runs.run_of(runs.find_model_folder(self.checkpoint)).resolve() == self.out.resolve():
            raise UserError(f"--out {self.out}: is the run the base checkpoint {self.checkpoint} belongs to; write "
                            "the tuned model to another folder")
        return replace

    def main_first(self, work: Callable[[], object]):
        """`work()` (reading the data set) on rank 0, then on the other ranks once it succeeded: a download or
        cache is made once, and rank 0's one-line error stops them all. One process: `work()`."""
        from llmscratch.train import distributed

        done = distributed.on_main(work, self.ranks)
        return done if self.ranks.main else work()

    # --- the model ----------------------------------------------------------------------------------------
    def load_base(self, lm_only: bool = True):
        """(model, tokenizer) of the base checkpoint; a classifier is refused where a language model is needed."""
        from llmscratch.checkpoint import load

        model, tok = load(self.base_folder)
        if lm_only and model.config.n_classes is not None:
            raise UserError(f"{self.checkpoint}: a classifier checkpoint; {self.name} needs a language model")
        return model, tok

    def apply_lora(self, model, trainable: tuple[str, ...] = ()) -> None:
        """Swap the chosen linears for LoRA layers (the base frozen; `trainable` modules trained in full)."""
        if self.lora is None:
            return
        from llmscratch.lora import apply_lora, lora_report

        s = self.lora
        self.lora_applied = apply_lora(model, s.targets, s.rank, s.alpha, s.dropout, trainable=trainable,
                                       seed=self.cfg.seed)  # a LoRAApplied: finish() saves its `trainable` too
        self.log(str(lora_report(model)))

    def lora_hparams(self) -> dict:
        s = self.lora
        return {} if s is None else {"lora": {"rank": s.rank, "alpha": s.alpha, "targets": s.targets,
                                              "dropout": s.dropout}}

    # --- training -----------------------------------------------------------------------------------------
    def steps_for_epochs(self, epochs: float | None, batches_per_epoch: int, **changes) -> TrainConfig:
        """A copy of the run's TrainConfig whose max_steps covers `epochs` (None: keep max_steps), with
        `changes`; the caller's config is never modified."""
        cfg = self.cfg
        if epochs is not None:
            changes["max_steps"] = steps_for_epochs(epochs, batches_per_epoch, cfg.grad_accum)
        return dataclasses.replace(cfg, **changes)

    def batches(self, train: list, val: list, collate: Callable[[list], object], own_rows: bool = False):
        """The trainer's batch source over `train`/`val` (an `ExampleBatches`, seeded with the run's seed, so every
        rank draws the same global batch and trains its own rows of it). Under torchrun an evaluation batch
        that would not split evenly across the ranks is filled up from its split's start. `own_rows`: each
        rank collates only its own examples of a batch (for batches `distributed.shard` cannot cut by rows:
        preference pairs, whose chosen and rejected rows lie apart; instruction batches, whose target count is
        the batch's)."""
        if not self.ranks.active:
            return ExampleBatches(train, val, collate, self.cfg.batch_size, seed=self.cfg.seed)
        return _RankBatches(train, val, collate, self.cfg.batch_size, self.cfg.seed, self.ranks, own_rows)

    def train(self, model, batches, cfg: TrainConfig, tokenizer, hparams: dict,
              before: Callable[[Path], None] | None = None, loss_fn=None, **train_kwargs):
        """Create (or clear, with --overwrite) `out`, call `before(out)` for files the checkpoints need to find
        in their run folder (a prompt style, label names), and train; a failed start removes what it made.
        Under torchrun every rank trains; rank 0 alone writes."""
        from llmscratch.train import distributed
        from llmscratch.train.trainer import lm_loss, train

        r = self.ranks
        held = distributed.on_main(self._claim_out, r)
        hparams = {"stage": self.name, "base": str(self.checkpoint), **hparams, **self.lora_hparams()}
        cleanup = runs.removed_on_failure(self.out, held) if r.main else contextlib.nullcontext()
        sharded = r.active and cfg.strategy == "fsdp"  # FSDP2 shards `model` in place: keep its shape to rebuild
        skeleton = distributed.meta_copy(model) if sharded else None
        with cleanup, distributed.peers_answer(r):
            if before is not None:
                distributed.on_main(lambda: before(self.out), r)
            result = train(model, batches, cfg, self.out, tokenizer=tokenizer, resume=self.resume, hparams=hparams,
                           loss_fn=_own_rows_unwrapped(loss_fn or lm_loss), **train_kwargs)
            if sharded:  # rank 0 goes on alone after training, with the whole model
                self._whole = distributed.whole(model, skeleton, self.device, r)
        return result

    def trained(self, model):
        """The model rank 0 evaluates, answers with and saves after `end_training`: `model` itself, or under FSDP2
        the whole model `train` gathered from its shards."""
        return self._whole if self._whole is not None else model

    def _claim_out(self) -> frozenset[str] | None:
        held = runs.check_out_dir(self.out)
        if self.replace:  # only now that the data and the model are known to be good
            runs.clear_run(self.out)
        return held

    def end_training(self) -> bool:
        """Once training is over, leave torchrun's process group; returns whether this process goes on to
        evaluate, answer the test split and write the stage's files: rank 0, alone from here on (so that no
        rank waits, against the group's timeout, for its answers). One process: True."""
        from llmscratch.train import distributed

        distributed.finish(self.ranks)
        return self.ranks.main

    def finish(self, model, tokenizer, result) -> list[str]:
        """With LoRA, leave the adapter alone in `out` (the full weights are dropped; checkpoints/ keeps the
        resumable state). Returns the names of the files now in `out`."""
        if self.lora is not None:
            from llmscratch.lora import finish_adapter_run

            finish_adapter_run(self.out, model, self.base_folder, tokenizer, trainable=self.lora_applied.trainable)
            self.log(f"saved the adapter alone to {self.out}; `llmscratch generate` loads it as it is, "
                     f"`llmscratch lora merge {self.out} MERGED_DIR` merges it into a full checkpoint")
        return runs.written_files(self.out)

    def result(self, train_result, n_train: int, n_val: int, n_test: int, metrics: dict | None = None,
               files: list[str] | None = None) -> StageResult:
        """The stage's result; `files` defaults to what `out` holds (nothing on ranks other than 0)."""
        if files is None:
            files = runs.written_files(self.out) if self.ranks.main else []
        return StageResult(self.out, train_result, files, n_train, n_val, n_test, metrics or {})


def _silent(_message: str) -> None:
    """The log of ranks other than 0."""


@dataclass
class OwnRows:
    """A batch collated from this rank's own examples of the global batch: `distributed.shard` leaves it whole
    (it is no tensor, tuple, list or dict), and `Stage.train` hands the loss the batch inside."""

    batch: object


def _own_rows_unwrapped(loss_fn):
    def loss(model, batch):
        return loss_fn(model, batch.batch if isinstance(batch, OwnRows) else batch)
    return loss


class _RankBatches(ExampleBatches):
    """`ExampleBatches` for one of several ranks: the same seeded global batches, evaluation batches that split
    evenly across the ranks, and with `own_rows` each batch collated from this rank's contiguous share of its
    examples, as an `OwnRows`."""

    def __init__(self, train, val, collate, batch_size: int, seed: int, ranks, own_rows: bool):
        super().__init__(train, val, self._collate, batch_size, seed=seed)
        self.inner, self.ranks, self.own_rows = collate, ranks, own_rows

    def _collate(self, examples: list):
        if not self.own_rows:
            return self.inner(examples)
        per = len(examples) // self.ranks.world  # (the global batch is a multiple of the number of ranks)
        return OwnRows(self.inner(examples[self.ranks.rank * per:(self.ranks.rank + 1) * per]))

    def next(self, split: str):
        if split == "train":
            return super().next(split)
        # The examples one process evaluates, but a short last batch is filled up (from the split's start) to a
        # multiple of the ranks: every rank then scores as many, and their mean is the batch's.
        name = split.removeprefix("eval_")
        data, start = self.data[name], self.eval_offset[name]
        if start >= len(data):
            start = 0
        n = min(self.batch_size, len(data) - start)
        n += -n % self.ranks.world
        self.eval_offset[name] = start + n
        return self._collate([data[(start + i) % len(data)] for i in range(n)])


def files_message(out: Path, files: list[str]) -> str:
    return f"files in {out}/: {', '.join(files)}"


# --- answering the test split (instruct, DPO) --------------------------------------------------------------
def answer_test_split(result, model, tokenizer, style, test_records: list[dict], out: Path, max_new_tokens: int,
                      progress: bool, log) -> Path | None:
    """After an instruction (or preference) tuning run: answer the test records into `out/test_responses.json`
    unless training was interrupted. Returns the file's path, or None when none was written."""
    from llmscratch.runs import TEST_RESPONSES

    if result.stopped_early == "interrupt" or not test_records:
        return None
    max_new_tokens = min(max_new_tokens, model.config.context_length)  # past it the window only slides along
    responses = out / TEST_RESPONSES
    write_responses(model, tokenizer, style, test_records, responses, max_new_tokens, progress=progress)
    log(f"wrote {len(test_records)} test-set responses to {responses}")
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
