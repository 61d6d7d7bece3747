"""Exponential moving average of a model's parameters and buffers."""
from __future__ import annotations

import copy

import torch
from torch import nn

from .distributed import unwrap_model


class ModelEMA:
    """Keeps ``ema = d * ema + (1 - d) * model`` for every floating-point parameter and buffer,
    with ``d = min(decay, (step + 1) / (step + 10))`` so early steps follow the model closely.
    Integer buffers (BatchNorm's batch counters) are copied.

    Most of the model is the frozen detector, whose parameters never change: where the average
    already equals such a parameter, the update would leave it unchanged (``lerp(a, a, w) == a``),
    so it is skipped. Which tensors to update is worked out on the first update and again whenever
    the model's tensors are replaced or a parameter is frozen or unfrozen; a frozen parameter
    overwritten in place after that (``param.data.copy_``) is not noticed: build a new EMA then.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9997, step: int = 0):
        self.module = copy.deepcopy(unwrap_model(model)).eval()
        self.module.requires_grad_(False)
        self.decay = decay
        self.step = step
        self._plan: _UpdatePlan | None = None

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = min(self.decay, (self.step + 1) / (self.step + 10))
        self.step += 1
        model = unwrap_model(model)
        signature = _signature(model)
        if self._plan is None or self._plan.signature != signature:
            self._plan = _UpdatePlan(self.module, model, signature)
        if self._plan.moving_ema:
            torch._foreach_lerp_(self._plan.moving_ema, self._plan.moving_model, 1.0 - d)
        for ema_value, value in zip(self._plan.copied_ema, self._plan.copied_model):
            ema_value.copy_(value)

    @torch.no_grad()
    def return_counters(self, model: nn.Module) -> None:
        """Copy the average's integer buffers back to ``model``. Updates copy them the other way, so
        they differ only where evaluating the average advanced a counter (APL's burn-in counts
        evaluation forwards: APL evaluates the model it trains)."""
        model = unwrap_model(model)
        for ema_value, value in zip(self.module.state_dict().values(), model.state_dict().values()):
            if not ema_value.dtype.is_floating_point:
                value.copy_(ema_value)

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "step": self.step, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.step = state["step"]
        self.decay = state["decay"]
        self._plan = None  # the loaded average may differ from the model's frozen parameters


def _signature(model: nn.Module) -> tuple:
    """Changes when a tensor is replaced (``.to()``, ``param.data = ...``) or (un)frozen."""
    return (tuple((p.data_ptr(), p.requires_grad) for p in model.parameters())
            + tuple(b.data_ptr() for b in model.buffers()))


class _UpdatePlan:
    """Pairs of (average, model) tensors: floating-point ones to average, integer ones to copy."""

    def __init__(self, ema_module: nn.Module, model: nn.Module, signature: tuple):
        self.signature = signature
        self.moving_ema: list[torch.Tensor] = []
        self.moving_model: list[torch.Tensor] = []
        self.copied_ema: list[torch.Tensor] = []
        self.copied_model: list[torch.Tensor] = []
        ema_state = ema_module.state_dict()
        for key, value in model.state_dict(keep_vars=True).items():
            target = ema_state[key]
            if not value.dtype.is_floating_point:
                self.copied_ema.append(target)
                self.copied_model.append(value.detach())
            elif (isinstance(value, nn.Parameter) and not value.requires_grad
                  and torch.equal(target, value.detach())):
                continue  # frozen and already equal: averaging would not change it
            else:
                self.moving_ema.append(target)
                self.moving_model.append(value.detach())
