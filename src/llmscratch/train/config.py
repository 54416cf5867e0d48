"""A training run's settings, `TrainConfig`: one dataclass for every stage (pretraining, fine-tuning, DPO).

It lives apart from the trainer, and imports nothing heavy, so that the command line can build its options
and `--help` from it without importing PyTorch (~2 s on the development VM). Each field's docstring is its
`--help` text.
"""

from __future__ import annotations

from dataclasses import dataclass


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
    """auto (bf16 autocast on CUDA and on CPUs with bf16 instructions, else fp32) | fp32 | bf16"""
    compile: bool | None = None
    """torch.compile the model; default: on CUDA (≈1.4x the eager speed after ~30 s), off on a CPU (no gain)"""
    activation_checkpointing: bool = False
    """recompute each block's activations in backward instead of keeping them: less memory, ~1/3 more compute"""
    bf16_residual: bool | None = None
    """under bf16 autocast, carry the residual stream between blocks in bf16 instead of fp32 (half its bytes);
    default: on CUDA (GPT-2 124M +5.8% tokens/s on an H100), off on a CPU (no measured gain)"""
    cpu_heap_reuse: bool = True
    """on a CPU (Linux, glibc), keep freed memory for the next step instead of page-faulting it in again: ~1.3x
    faster steps with GPT-2's vocabulary; the process holds its peak memory until training ends"""
    peak_tflops: float | None = None
    """accelerator peak for MFU; None = known GPUs only"""
    progress: bool = True
    """tqdm progress bar"""
