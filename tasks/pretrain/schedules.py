"""Schedules as pure functions of the step (resuming needs only the step)."""
from __future__ import annotations

import math


def cosine_schedule(step: int, max_steps: int, start: float, end: float) -> float:
    """``end + (start - end) * (1 + cos(pi * step / max_steps)) / 2``; step clamped to [0, max_steps]."""
    if max_steps <= 0:
        return end
    t = min(max(step, 0), max_steps) / max_steps
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * t))


def warmup_cosine_lr(step: int, max_steps: int, base_lr: float, warmup_steps: int = 0, final: float = 0.0) -> float:
    """Linear warm-up ``base_lr * (step + 1) / warmup_steps``, then cosine from ``base_lr`` to ``final``."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    return cosine_schedule(step - warmup_steps, max_steps - warmup_steps, base_lr, final)


def scaled_lr(base_lr: float, global_batch: int, ref: int = 256) -> float:
    """Linear scaling rule (Goyal et al. 2017): ``base_lr * global_batch / ref``."""
    return base_lr * global_batch / ref


def linear_schedule(step: int, max_steps: int, start: float, end: float) -> float:
    """``start + (end - start) * step / max_steps``, step clamped to [0, max_steps] (I-JEPA's momentum)."""
    if max_steps <= 0:
        return end
    return start + (end - start) * min(max(step, 0), max_steps) / max_steps
