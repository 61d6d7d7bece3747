"""Per-step learning-rate schedules."""
from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def lr_at(step: int, steps_per_epoch: int, cfg) -> float:
    """The learning rate of optimisation step ``step`` (0-based).

    ``wcosine``: linear warm-up from WARMUP_LR to LR over WARMUP epochs, then cosine
    decay to MIN_LR at the end of training. ``cosine``: the cosine part alone.
    """
    total = cfg.EPOCHS * steps_per_epoch
    warmup = cfg.WARMUP * steps_per_epoch if cfg.SCHEDULER == "wcosine" else 0
    if step < warmup:
        return cfg.WARMUP_LR + (cfg.LR - cfg.WARMUP_LR) * step / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return cfg.MIN_LR + 0.5 * (cfg.LR - cfg.MIN_LR) * (1 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(optimizer: Optimizer, steps_per_epoch: int, cfg) -> LambdaLR:
    """A scheduler stepped once per optimisation step; its state dict resumes it exactly."""
    return LambdaLR(optimizer, lambda step: lr_at(step, steps_per_epoch, cfg) / cfg.LR)
