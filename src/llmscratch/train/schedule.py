"""Learning-rate schedule as a pure function of the step."""

from __future__ import annotations

import math


def lr_at(step: int, max_lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.1) -> float:
    """Linear warmup to `max_lr`, then cosine decay to `min_lr_ratio * max_lr` at `total_steps`.

    `step` counts optimizer updates from 0. Warmup keeps early Adam updates small while its second-moment
    estimates are still noisy; the cosine shape follows Loshchilov & Hutter (SGDR, 2017) without restarts.
    """
    min_lr = max_lr * min_lr_ratio
    if warmup_steps > 0 and step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr
    decay_steps = max(1, total_steps - warmup_steps)
    progress = (step - warmup_steps) / decay_steps
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)
