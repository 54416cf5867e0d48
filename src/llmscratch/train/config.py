"""A training run's settings, `TrainConfig`: one dataclass for every stage (pretraining, fine-tuning, DPO).

It lives apart from the trainer, and imports nothing heavy, so that the command line can build its options
and `--help` from it without importing PyTorch (seconds). Each field's docstring is its `--help` text;
`TrainConfig.check` rejects settings that make no sense before a run starts.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from llmscratch.errors import UserError

PRECISIONS = ("auto", "fp32", "bf16", "fp8")


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping settings of one training run (each field's docstring is its --help)."""

    max_steps: int = 1000
    """optimizer updates in the run (the LR schedule spans them)"""
    max_minutes: float | None = None
    """stop (and save) once this much wall time has passed"""
    batch_size: int = 8
    """sequences per micro-batch; 0 = the largest power of two that fits in GPU memory (CUDA; 8 on a CPU)"""
    grad_accum: int = 1
    """micro-batches per optimizer update"""
    lr: float = 6e-4
    """peak learning rate"""
    min_lr_ratio: float = 0.1
    """cosine decays to lr * min_lr_ratio"""
    warmup_steps: int = 100
    """linear warmup length"""
    weight_decay: float = 0.1
    """AdamW decay on matrices (never on norms, biases or embeddings)"""
    beta1: float = 0.9
    """AdamW's first-moment decay"""
    beta2: float = 0.95
    """AdamW's second-moment decay (0.95 as in GPT-3; steadier than 0.999 for LMs)"""
    grad_clip: float = 1.0
    """max global gradient norm; 0 disables clipping"""
    eval_every: int = 100
    """evaluate train/val loss every N steps (and at the end)"""
    eval_batches: int = 20
    """batches per evaluation"""
    log_every: int = 10
    """read the loss back and log it every N steps"""
    sample_every: int = 0
    """print a sample every N steps (0: never)"""
    save_every: int = 500
    """write a resumable checkpoint every N steps (and at the end)"""
    keep_last: int = 2
    """resumable checkpoints to keep"""
    seed: int = 1337
    """seed for initialisation, dropout and batch order"""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N"""
    precision: str = "auto"
    """auto (bf16 autocast on CUDA, and on a CPU where bf16 products measured faster than fp32: those with bf16
    instructions; else fp32) | fp32 | bf16 | fp8 (the blocks' matrix products in float8 through torchao, the rest
    bf16; for H100/H200-class GPUs, emulated on a CPU)"""
    compile: bool | None = None
    """torch.compile the model; default: on CUDA (≈1.4x the eager speed after ~30 s), off on a CPU (no gain)"""
    activation_checkpointing: bool = False
    """recompute each block's activations in backward instead of keeping them: less memory, ~1/3 more compute"""
    bf16_residual: bool | None = None
    """under bf16 autocast, carry the residual stream between blocks in bf16 instead of fp32 (half its bytes);
    default: on CUDA (faster there, see benchmarks/RESULTS.md), off on a CPU (no measured gain)"""
    cpu_heap_reuse: bool = True
    """on a CPU (Linux, glibc), keep freed memory for the next step instead of page-faulting it in again: ~1.3x
    faster steps with GPT-2's vocabulary; the process holds its peak memory until training ends"""
    strategy: str = "ddp"
    """under torchrun: ddp (every process holds the whole model) | fsdp (FSDP2: each holds a shard of the weights,
    gradients and optimizer state; for models that do not fit one device)"""
    peak_tflops: float | None = None
    """accelerator peak for MFU; None = known GPUs only"""
    progress: bool = True
    """tqdm progress bar"""

    def check(self) -> None:
        """Raise a UserError naming the first setting that makes no sense (as its `--train.<field>` flag) and
        what to use instead: settings the trainer would otherwise take silently or crash on. (Each rule is
        written so that NaN fails it.)"""
        rules = [
            ("max_steps", self.max_steps >= 1, "must be at least 1 (optimizer updates to run)"),
            ("max_minutes", self.max_minutes is None or self.max_minutes > 0,
             "must be a positive number of minutes; leave it out for no time limit"),
            ("batch_size", self.batch_size >= 0,
             "must be a number of sequences per micro-batch, or 0 for the largest that fits"),
            ("grad_accum", self.grad_accum >= 1, "must be at least 1 (1: no gradient accumulation)"),
            ("lr", math.isfinite(self.lr) and self.lr > 0, "must be a positive number, e.g. 6e-4"),
            ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1,
             "must be between 0 and 1 (the cosine's floor as a fraction of --train.lr)"),
            ("warmup_steps", self.warmup_steps >= 0, "must be 0 (no warmup) or more"),
            ("weight_decay", math.isfinite(self.weight_decay) and self.weight_decay >= 0,
             "must be 0 (no decay) or a positive number, e.g. 0.1"),
            ("beta1", 0 <= self.beta1 < 1, "must be at least 0 and below 1, e.g. 0.9"),
            ("beta2", 0 <= self.beta2 < 1, "must be at least 0 and below 1, e.g. 0.95"),
            ("grad_clip", self.grad_clip >= 0, "must be 0 (no clipping) or a positive gradient norm"),
            ("eval_every", self.eval_every >= 1, "must be at least 1 (steps between evaluations)"),
            ("eval_batches", self.eval_batches >= 1, "must be at least 1 (batches per evaluation)"),
            ("log_every", self.log_every >= 1, "must be at least 1 (steps between loss readings)"),
            ("save_every", self.save_every >= 1, "must be at least 1 (steps between checkpoints)"),
            ("sample_every", self.sample_every >= 0, "must be 0 (no samples) or more"),
            ("keep_last", self.keep_last >= 0, "must be 0 (keep every checkpoint) or more"),
            ("precision", self.precision in PRECISIONS, f"use one of {', '.join(PRECISIONS)}"),
            ("strategy", self.strategy in ("ddp", "fsdp"), "use ddp or fsdp"),
            ("device", re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", str(self.device)) is not None,
             "not a device name; use auto, cpu, cuda, cuda:N or mps"),
        ]
        for name, ok, need in rules:
            if not ok:
                raise UserError(f"--train.{name} {getattr(self, name)}: {need}")
