"""Learning-rate schedules: a pure function of the step, so resuming needs no scheduler state beyond the step."""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "constant", "wsd")


def lr_at(step: int, *, total: int, lr: float, warmup: int, schedule: str = "cosine", min_ratio: float = 0.1,
          decay_fraction: float = 0.2) -> float:
    """The learning rate of optimizer step `step` (0-based) out of `total`.

    Linear warmup over `warmup` steps (step 0 gets lr/warmup), then
    - cosine: half a cosine from lr down to the floor min_ratio·lr at the last step;
    - constant: lr;
    - wsd (warmup-stable-decay): lr, then a linear decay to the floor over the last decay_fraction of the steps.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r} (choose {', '.join(SCHEDULES)})")
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    floor = lr * min_ratio
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        progress = min(1.0, (step - warmup) / max(1, total - 1 - warmup))
        return floor + 0.5 * (lr - floor) * (1 + math.cos(math.pi * progress))
    start = max(warmup, int(total * (1 - decay_fraction)))
    if step < start:
        return lr
    return lr - (lr - floor) * min(1.0, (step - start + 1) / max(1, total - start))
