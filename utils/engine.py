"""The training loop both trainers run (train.py: the REC model, pretrain.py: the detector).

A trainer gives :func:`fit` a :class:`TrainState` (model, optimizer, schedule, EMA, counters), the
training loader and a ``losses(batch)`` function returning a dict with a scalar ``'loss'`` and its
logged parts; :func:`fit` runs the epochs, saves checkpoints atomically, stops cleanly on Ctrl-C or
SIGTERM and resumes exactly where a saved run stopped.
"""
from __future__ import annotations

import math
import os
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from datasets import normalize_images
from models.detector_cache import DetectorCache

from . import distributed as dist_utils
from .checkpoint import restore_training_state, rng_state, save_atomic
from .distributed import unwrap_model
from .ema import ModelEMA
from .optim import Recipe, build_optimizer, build_scheduler

Losses = Callable[[dict], dict[str, torch.Tensor]]


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite."""


def autocast(device: torch.device, amp: str):
    """``torch.autocast`` for AMP 'bf16' / 'fp16' on CUDA ('bf16' also on CPU); otherwise a no-op."""
    if amp == "none":
        return nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    if device.type != "cuda" and amp == "fp16":
        raise ValueError("AMP 'fp16' needs CUDA; use 'bf16' or 'none' on CPU")
    return torch.autocast(device_type=device.type, dtype=dtype)


def to_device(batch: dict, device: torch.device, mean_std: tuple[Sequence[float], Sequence[float]],
              channels_last: bool = False) -> dict:
    """The batch's tensors on ``device``, the uint8 images the datasets give normalised there with
    ``mean_std`` (MEAN, STD): the loader ships a quarter of the float32 bytes, and the arithmetic is
    the per-sample one (:func:`datasets.normalize_images`)."""
    if batch["image"].dtype != torch.uint8:
        raise TypeError(f"batch['image'] must hold uint8 letterboxed images (what the datasets give), got "
                        f"{batch['image'].dtype}")
    out = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
    out["image"] = normalize_images(out["image"], *mean_std)
    if channels_last:
        out["image"] = out["image"].contiguous(memory_format=torch.channels_last)
    return out


def optimize(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scheduler, scaler: torch.amp.GradScaler | None,
             grad_clip: float, ema: ModelEMA | None = None, model: nn.Module | None = None) -> None:
    """Backward (scaled for fp16), gradient-norm clipping over the optimizer's parameters, optimizer
    and per-step scheduler step, then the EMA update from ``model``."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    if grad_clip > 0:
        nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()
    if ema is not None:
        ema.update(model)


def rec_losses(model: nn.Module, batch: dict, amp: str, device: torch.device) -> dict[str, torch.Tensor]:
    """The REC model's training forward on a prepared batch: ``'loss'`` and its parts. A model that
    declares ``supervised = True`` also gets the boxes, ``targets=batch["box"]``, and the samples'
    loss weights, ``weights=batch["weight"]``, where the batch has them (PSEUDO_LABEL_WEIGHTING); one
    that declares ``groups_by_image`` the image ids, ``image_ids``."""
    net = unwrap_model(model)
    extra = {}
    if getattr(net, "supervised", False):
        extra = {"targets": batch["box"], **({"weights": batch["weight"]} if "weight" in batch else {})}
    if getattr(net, "groups_by_image", False):
        extra["image_ids"] = batch["info"][:, 6]
    with autocast(device, amp):
        return model(batch["image"], batch["refs"], batch.get("detections"), **extra)


def train_step(model: nn.Module, batch: dict, optimizer: torch.optim.Optimizer,
               scheduler, ema: ModelEMA | None, scaler: torch.amp.GradScaler | None,
               grad_clip: float, amp: str, device: torch.device) -> dict[str, torch.Tensor]:
    """One REC step outside :func:`fit`: :func:`rec_losses`, then :func:`optimize`. Returns the loss
    parts as detached tensors (no host sync)."""
    out = rec_losses(model, batch, amp, device)
    optimize(out["loss"], optimizer, scheduler, scaler, grad_clip, ema, model)
    return {k: v.detach().float() for k, v in out.items()}


def prepare_batch(model: nn.Module, batch: dict, device: torch.device, channels_last: bool = False,
                  cache: DetectorCache | None = None, amp: str = "none", *,
                  mean_std: tuple[Sequence[float], Sequence[float]]) -> dict:
    """The batch on ``device`` (:func:`to_device`); with a cache, also the detector's outputs under
    ``'detections'`` (computed as the model's forward would, under the same autocast), for the model
    to skip its detector. The image ids are read before the copy, so the lookup costs no device sync."""
    image_ids = batch["info"][:, 6].tolist() if cache is not None else None
    batch = to_device(batch, device, mean_std, channels_last)
    if cache is not None:
        with autocast(device, amp):
            batch["detections"] = cache(unwrap_model(model), batch["image"], image_ids)
    return batch


@dataclass
class TrainState:
    """What a run changes as it goes: the model (unwrapped), its optimizer, schedule, EMA and
    gradient scaler, and the counters that ``--resume`` restores. ``epoch`` counts finished
    epochs, ``batch_in_epoch`` the batches done of the next one (non-zero in a mid-epoch save)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    ema: ModelEMA | None = None
    scaler: torch.amp.GradScaler | None = None
    epoch: int = 0
    batch_in_epoch: int = 0
    step: int = 0
    best_acc: float = -1.0

    @classmethod
    def create(cls, model: nn.Module, recipe: Recipe, steps_per_epoch: int, amp: str,
               device: torch.device) -> "TrainState":
        """A fresh state for ``model`` (already on ``device``) trained by ``recipe``."""
        optimizer = build_optimizer(model, recipe)
        return cls(model, optimizer, build_scheduler(optimizer, steps_per_epoch, recipe),
                   ModelEMA(model, recipe.ema_decay) if recipe.ema else None,
                   torch.amp.GradScaler(device.type) if amp == "fp16" else None)

    @property
    def eval_model(self) -> nn.Module:
        """The weights to evaluate and ship: the EMA's when there is one."""
        return self.ema.module if self.ema is not None else self.model

    def checkpoint(self, **extra) -> dict:
        """Everything ``--resume`` needs to continue exactly, ``state_dict`` the weights to evaluate,
        plus ``extra`` (format, config, vocabulary)."""
        weights = self.model.state_dict()
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "step": self.step,
                "state_dict": self.eval_model.state_dict() if self.ema is not None else weights,
                "model": weights, "ema": self.ema.state_dict() if self.ema is not None else None,
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "lr": self.optimizer.param_groups[0]["lr"], "best_acc": self.best_acc, "rng": rng_state(),
                **extra}

    def restore(self, ckpt: dict, path: str) -> None:
        """Weights, optimizer, schedule, EMA, scaler, generators and counters of checkpoint ``path``."""
        restore_training_state(ckpt, path, self.model, self.ema, self.optimizer, self.scheduler, self.scaler)
        self.epoch, self.step = ckpt["epoch"], ckpt["step"]
        self.batch_in_epoch, self.best_acc = ckpt.get("batch_in_epoch", 0), ckpt.get("best_acc", -1.0)


class MetricLogger:
    """What a training loop reports, in one place (after torchvision's references): the progress bar,
    the read-back of the loss parts every ``print_freq`` steps and at the end of an epoch (losses stay
    on the device in between: one host sync per read-back), the NaN/inf check of every step read
    back, the log line and the TensorBoard scalars. Quiet on processes other than the main one."""

    def __init__(self, print_freq: int, log_dir: str | None, log: Callable[[str], None], tag: str = "train"):
        self.print_freq, self.log, self.tag = print_freq, log, tag
        self.enabled = dist_utils.is_main()
        self.writer = SummaryWriter(log_dir) if log_dir and self.enabled else None
        self._pending: list[dict[str, torch.Tensor]] = []
        self._bar: tqdm | None = None
        self._tick, self._samples = time.perf_counter(), 0

    def iterate(self, batches: Iterable[dict], header: str) -> Iterator[dict]:
        """``batches`` behind a progress bar."""
        self._bar = tqdm(batches, total=len(batches), desc=header, disable=not self.enabled,
                         dynamic_ncols=True, leave=False)
        self._tick, self._samples = time.perf_counter(), 0
        try:
            yield from self._bar
        finally:
            self._bar.close()

    def update(self, step: int, parts: dict[str, torch.Tensor], samples: int, lr: float) -> None:
        """Record one step's detached loss parts; read back and report every ``print_freq`` steps."""
        self._pending.append(parts)
        self._samples += samples
        if step % self.print_freq == 0:
            self.flush(step, lr)

    def flush(self, step: int, lr: float) -> None:
        """Read back the pending steps, check them, and report the last one."""
        if not self._pending:
            return
        first = step - len(self._pending) + 1
        for i, parts in enumerate(self._pending):
            values = {k: float(v) for k, v in parts.items()}
            if not math.isfinite(values["loss"]):
                raise NonFiniteLossError(f"the loss is {values['loss']} at step {first + i} (parts: {values}); "
                                         "the last checkpoint is kept. Lower the learning rate, clip gradients "
                                         "harder, or switch AMP to 'bf16' or 'none'")
        self._pending.clear()
        rate = self._samples / max(time.perf_counter() - self._tick, 1e-9)
        self._tick, self._samples = time.perf_counter(), 0
        values.update(lr=lr, samples_per_s=rate)
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{lr:.2e}", samples_s=f"{rate:.1f}")
        self.log(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in values.items()))
        for key, value in values.items():
            self.scalar(f"{self.tag}/{key}", value, step)

    def scalar(self, name: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(name, value, step)

    def image(self, name: str, image_hwc, step: int) -> None:
        """An RGB uint8 ``[H, W, 3]`` image to TensorBoard."""
        if self.writer is not None:
            self.writer.add_image(name, image_hwc, step, dataformats="HWC")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class StopRequest:
    """Set by the first Ctrl-C (SIGINT) or SIGTERM (what a cluster scheduler sends): the loop
    finishes its step, then stops so that a consistent checkpoint can be saved. A second Ctrl-C
    interrupts at once. Use as a context manager: the previous handlers come back on exit."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def __enter__(self) -> "StopRequest":
        def handler(signum, frame):
            if self.requested and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.signal = signum
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, handler)
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)


def train_one_epoch(state: TrainState, batches: Iterable[dict], losses: Losses, logger: MetricLogger,
                    grad_clip: float, stop: StopRequest | None = None) -> None:
    """The batches of one epoch (or until ``stop`` is requested): ``losses(batch)``, then
    :func:`optimize`; ``state.step`` and ``state.batch_in_epoch`` count the steps done."""
    state.model.train()
    for batch in logger.iterate(batches, f"epoch {state.epoch + 1}"):
        parts = losses(batch)
        optimize(parts["loss"], state.optimizer, state.scheduler, state.scaler, grad_clip, state.ema, state.model)
        state.step += 1
        state.batch_in_epoch += 1
        logger.update(state.step, {k: v.detach().float() for k, v in parts.items()}, len(batch["image"]),
                      state.optimizer.param_groups[0]["lr"])
        if stop is not None and stop.requested:
            break
    logger.flush(state.step, state.optimizer.param_groups[0]["lr"])


@dataclass
class Run:
    """Where and how long :func:`fit` trains. ``validate(model)`` scores the evaluation weights after
    an epoch (None: no validation); ``extra`` goes into every checkpoint."""

    folder: str
    epochs: int
    seed: int
    grad_clip: float
    log: Callable[[str], None]
    extra: dict = field(default_factory=dict)
    validate: Callable[[nn.Module], float] | None = None
    validate_every: int = 1


def fit(state: TrainState, loader, losses: Losses, logger: MetricLogger, run: Run) -> int:
    """Trains from ``state`` to ``run.epochs``, writing ``last.pth`` after each epoch (and ``best.pth``
    when validation improves) into ``run.folder``, atomically. On Ctrl-C or SIGTERM the current step
    finishes, ``last.pth`` is saved where the run stopped and ``128 + signal`` is returned; 0 when
    done. :class:`NonFiniteLossError` propagates, the last checkpoint kept."""
    last_path = os.path.join(run.folder, "last.pth")
    with StopRequest() as stop:
        while state.epoch < run.epochs:
            loader.sampler.set_epoch(state.epoch, state.batch_in_epoch)
            if state.batch_in_epoch == 0:
                # Each epoch's random draws depend on (seed, epoch, rank) only, so resuming at an
                # epoch boundary needs no saved generator state.
                torch.manual_seed(run.seed + 1000 * state.epoch + dist_utils.rank())
            train_one_epoch(state, loader, losses, logger, run.grad_clip, stop)
            if stop.requested:
                _save(state.checkpoint(**run.extra), last_path, run.log)
                run.log(f"stopped on request; continue with --resume {last_path}")
                return 128 + stop.signal
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            improved = False
            if run.validate is not None and (state.epoch % run.validate_every == 0 or state.epoch == run.epochs):
                acc = run.validate(state.eval_model)
                if state.ema is not None:
                    state.ema.return_counters(state.model)
                improved = acc > state.best_acc
                state.best_acc = max(state.best_acc, acc)
            ckpt = state.checkpoint(**run.extra)
            _save(ckpt, last_path, run.log)
            if improved:
                _save(ckpt, os.path.join(run.folder, "best.pth"), run.log)
            dist_utils.barrier()
    return 0


def _save(ckpt: dict, path: str, log: Callable[[str], None]) -> None:
    """Rank 0 writes; a failed write names the file and leaves the previous one intact."""
    if not dist_utils.is_main():
        return
    try:
        save_atomic(ckpt, path)
    except OSError as err:
        raise OSError(f"could not write checkpoint {path} ({err}); any earlier file there is intact") from err
    log(f"saved {path} (epoch {ckpt['epoch']}, step {ckpt['step']})")
