"""Exponential moving average of a model's parameters and buffers."""
from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEMA:
    """Keeps ``ema = d * ema + (1 - d) * model`` for every floating-point parameter and buffer,
    with ``d = min(decay, (step + 1) / (step + 10))`` so early steps follow the model closely.
    Integer buffers (BatchNorm's batch counters) are copied."""

    def __init__(self, model: nn.Module, decay: float = 0.9997, step: int = 0):
        self.module = copy.deepcopy(model).eval()
        self.module.requires_grad_(False)
        self.decay = decay
        self.step = step

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = min(self.decay, (self.step + 1) / (self.step + 10))
        self.step += 1
        ema_state = self.module.state_dict()
        floats_ema, floats_model = [], []
        for key, value in model.state_dict().items():
            if value.dtype.is_floating_point:
                floats_ema.append(ema_state[key])
                floats_model.append(value.detach())
            else:
                ema_state[key].copy_(value)
        torch._foreach_lerp_(floats_ema, floats_model, 1.0 - d)

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "step": self.step, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.step = state["step"]
        self.decay = state["decay"]
