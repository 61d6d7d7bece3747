"""One optimizer builder and one learning-rate schedule for both trainers, read from a
:class:`Recipe` (the REC model's keys in TRAIN, the detector's in DETECTOR)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

_OPTIMIZERS = {"Adam": torch.optim.Adam, "AdamW": torch.optim.AdamW}


@dataclass(frozen=True)
class Recipe:
    """How one model is optimised: optimizer, schedule, clipping, EMA and epochs."""

    optimizer: str
    optimizer_params: dict[str, Any]
    lr: float
    weight_decay: float
    decay_kernels_only: bool  # no weight decay on BatchNorm scales and biases (1-D parameters)
    scheduler: str
    warmup: float  # epochs, may be fractional
    warmup_lr: float
    min_lr: float
    epochs: int
    grad_clip: float
    ema: bool
    ema_decay: float

    @classmethod
    def rec(cls, cfg) -> "Recipe":
        """The REC model's recipe (TRAIN keys); weight decay on every parameter, as the reference."""
        return cls(cfg.OPT, dict(cfg.OPT_PARAMS), cfg.LR, cfg.WEIGHT_DECAY, False, cfg.SCHEDULER, cfg.WARMUP,
                   cfg.WARMUP_LR, cfg.MIN_LR, cfg.EPOCHS, cfg.GRAD_NORM_CLIP, cfg.USE_EMA, cfg.EMA_DECAY)

    @classmethod
    def detector(cls, cfg) -> "Recipe":
        """The detector's recipe (DETECTOR keys); weight decay on convolution kernels only."""
        return cls(cfg.DET_OPT, dict(cfg.DET_OPT_PARAMS), cfg.DET_LR, cfg.DET_WEIGHT_DECAY, True,
                   cfg.DET_SCHEDULER, cfg.DET_WARMUP, cfg.DET_WARMUP_LR, cfg.DET_MIN_LR, cfg.DET_EPOCHS,
                   cfg.DET_GRAD_NORM_CLIP, cfg.DET_EMA, cfg.DET_EMA_DECAY)


def build_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    """The recipe's optimizer over the trainable parameters of ``model``."""
    params = [p for p in model.parameters() if p.requires_grad]
    if recipe.decay_kernels_only:
        groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": recipe.weight_decay},
                  {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    else:
        groups = [{"params": params, "weight_decay": recipe.weight_decay}]
    # The multi-tensor implementation: the same updates as the per-parameter loop, far fewer kernels.
    options = {"foreach": True, **recipe.optimizer_params}
    if "betas" in options:
        options["betas"] = tuple(options["betas"])
    return _OPTIMIZERS[recipe.optimizer](groups, lr=recipe.lr, **options)


def lr_at(step: int, steps_per_epoch: int, recipe: Recipe) -> float:
    """The learning rate of optimisation step ``step`` (0-based).

    ``wcosine``: linear warm-up from ``warmup_lr`` to ``lr`` over ``warmup`` epochs (rounded to
    whole steps), then cosine decay to ``min_lr`` at the end of training. ``cosine``: the cosine
    part alone.
    """
    total = recipe.epochs * steps_per_epoch
    warmup = round(recipe.warmup * steps_per_epoch) if recipe.scheduler == "wcosine" else 0
    if step < warmup:
        return recipe.warmup_lr + (recipe.lr - recipe.warmup_lr) * step / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return recipe.min_lr + 0.5 * (recipe.lr - recipe.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(optimizer: torch.optim.Optimizer, steps_per_epoch: int, recipe: Recipe) -> LambdaLR:
    """A scheduler stepped once per optimisation step; its state dict resumes it exactly."""
    return LambdaLR(optimizer, lambda step: lr_at(step, steps_per_epoch, recipe) / recipe.lr)
