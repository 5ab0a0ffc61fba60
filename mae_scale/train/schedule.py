"""Learning rate as a pure function of the optimizer step: linear warmup, then half-cosine."""

from __future__ import annotations

import math


def lr_at(step: int, *, peak_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> float:
    """lr for optimizer step `step` (0-based), as MAE-ST's per-iteration schedule."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(progress, 1.0)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def peak_lr(base_lr: float, clips_per_step: int) -> float:
    """MAE-ST's linear scaling rule: lr = base_lr x effective batch / 256 (effective batch in clips)."""
    return base_lr * clips_per_step / 256
