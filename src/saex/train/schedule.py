"""Learning-rate and sparsity-coefficient schedules, as functions of the step."""

from __future__ import annotations


def lr_factor(step: int, steps: int, warmup: float, decay: float) -> float:
    """Linear warm-up over the first `warmup` fraction, constant, linear decay to 0 over the last `decay`."""
    w, d = int(warmup * steps), int(decay * steps)
    if w and step < w:
        return (step + 1) / w
    if d and step >= steps - d:
        return max(0.0, (steps - step) / d)
    return 1.0


def sparsity_factor(step: int, steps: int, warmup: float) -> float:
    w = int(warmup * steps)
    return min(1.0, (step + 1) / w) if w else 1.0
