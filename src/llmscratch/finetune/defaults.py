"""The fine-tuning stages' defaults, apart from the stages themselves so that `llmscratch finetune ... --help`
can show them without importing PyTorch (the stages import them from here)."""

from __future__ import annotations

from llmscratch.train.config import TrainConfig

# classification (finetune/classify.py): what `--trainable` may train
CLASSIFY_TRAINABLE = ("head", "last-block", "all")

# The default recipe: every weight trained for 2 epochs at peak lr 3e-4 (cosine to 3e-5). From the quickstart's
# gpt-tiny it reaches 95.7-96.3% balanced SMS-spam test accuracy in ~1.5 CPU minutes, where the book's recipe
# (last block + norm + head, 5 epochs) reaches 92.0% (benchmarks/RESULTS.md). A small, briefly pretrained model
# needs its lower layers adapted too; for GPT-2 124M the book's `--trainable last-block` with a lower
# `--train.lr 5e-5` is the cheaper choice.
CLASSIFY_DEFAULT_TRAINABLE = "all"
CLASSIFY_DEFAULT_EPOCHS = 2.0


def classify_train_config() -> TrainConfig:
    """Settings that reach the SMS-spam target from the quickstart model on a 2-core CPU (benchmarks/RESULTS.md)."""
    return TrainConfig(batch_size=8, lr=3e-4, warmup_steps=20, weight_decay=0.1, eval_every=50, eval_batches=5,
                       log_every=10, save_every=100_000, keep_last=1, seed=1337)


def dpo_train_config() -> TrainConfig:
    """The book's DPO settings (AdamW, lr 5e-6, weight decay 0.01, batch 8) with a short warmup (finetune/dpo.py)."""
    return TrainConfig(lr=5e-6, warmup_steps=10, weight_decay=0.01, batch_size=8, eval_every=25, eval_batches=5,
                       log_every=5, save_every=200, keep_last=1)
