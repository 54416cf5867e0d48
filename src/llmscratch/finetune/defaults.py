"""Every fine-tuning stage's defaults, in one place that both the command line and the Python API read.

Kept apart from the stages so that `llmscratch finetune ... --help` can show them without importing PyTorch
(the stages import them from here). Each stage has a dataclass of its own options (its fields are the stage's
keyword arguments and the verb's flags) and a function giving its training settings.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmscratch.train.config import TrainConfig

# classification (finetune/classify.py): what `--trainable` may train
CLASSIFY_TRAINABLE = ("head", "last-block", "all")


@dataclass(frozen=True)
class ClassifyDefaults:
    """`finetune classify`. The default recipe trains every weight for 2 epochs at peak lr 3e-4 (cosine to
    3e-5): a small, briefly pretrained model needs its lower layers adapted too, which the book's recipe (last
    block + norm + head, 5 epochs) does not do (benchmarks/RESULTS.md). For GPT-2 124M the book's
    `--trainable last-block` with a lower `--train.lr 5e-5` is the cheaper choice."""

    text_column: str = "text"
    label_column: str = "label"
    trainable: str = "all"
    epochs: float = 2.0
    data_seed: int = 123


@dataclass(frozen=True)
class RecordSplitDefaults:
    """What the stages trained on records (instruct, DPO) share: the train/val/test split of the records and the
    longest answer generated for the test split."""

    val_fraction: float = 0.05
    test_fraction: float = 0.10
    split_seed: int = 123
    max_new_tokens: int = 256


@dataclass(frozen=True)
class InstructDefaults(RecordSplitDefaults):
    """`finetune instruct` (the book's chapter 7)."""

    prompt_style: str = "alpaca"
    epochs: float = 2.0


@dataclass(frozen=True)
class DPODefaults(RecordSplitDefaults):
    """`finetune dpo` (the book's chapter-7 bonus)."""

    beta: float = 0.1
    label_smoothing: float = 0.0
    epochs: float = 1.0
    max_new_tokens: int = 128
    samples: int = 3


CLASSIFY = ClassifyDefaults()
INSTRUCT = InstructDefaults()
DPO = DPODefaults()

# Kept for the names older code imports.
CLASSIFY_DEFAULT_TRAINABLE = CLASSIFY.trainable
CLASSIFY_DEFAULT_EPOCHS = CLASSIFY.epochs


def classify_train_config() -> TrainConfig:
    """Settings that reach the SMS-spam target from the quickstart model on a 2-core CPU (benchmarks/RESULTS.md)."""
    return TrainConfig(batch_size=8, lr=3e-4, warmup_steps=20, weight_decay=0.1, eval_every=50, eval_batches=5,
                       log_every=10, save_every=100_000, keep_last=1, seed=1337)


def instruct_train_config() -> TrainConfig:
    """Fine-tuning moves a pretrained model a little: a lower peak LR than pretraining, a short warmup, frequent
    evaluations. `compile` stays off: dynamic padding gives each batch its own length, which would recompile."""
    return TrainConfig(lr=1e-4, warmup_steps=10, batch_size=8, eval_every=50, eval_batches=5, save_every=200,
                       keep_last=1, compile=False)


def dpo_train_config() -> TrainConfig:
    """The book's DPO settings (AdamW, lr 5e-6, weight decay 0.01, batch 8) with a short warmup (finetune/dpo.py)."""
    return TrainConfig(lr=5e-6, warmup_steps=10, weight_decay=0.01, batch_size=8, eval_every=25, eval_batches=5,
                       log_every=5, save_every=200, keep_last=1)
