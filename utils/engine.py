"""One optimisation step, one training epoch, one evaluation pass."""
from __future__ import annotations

import math
import signal
import time
from contextlib import nullcontext
from typing import Callable, Iterable

import torch
from torch import nn
from torchvision.ops import box_iou

from datasets import letterbox_to_original
from models.detector_cache import DetectorCache
from models.head import cell_box

from . import distributed as dist_utils
from .ema import ModelEMA, unwrap_model


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


def to_device(batch: dict, device: torch.device, channels_last: bool = False) -> dict:
    out = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
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


def train_step(model: nn.Module, batch: dict, optimizer: torch.optim.Optimizer,
               scheduler, ema: ModelEMA | None, scaler: torch.amp.GradScaler | None,
               grad_clip: float, amp: str, device: torch.device) -> dict[str, torch.Tensor]:
    """Forward, then :func:`optimize`. Returns the loss parts as detached tensors (no host sync
    here: the caller decides when to read them). A model that declares ``supervised = True`` also
    gets the boxes, ``targets=batch["box"]``."""
    targets = {"targets": batch["box"]} if getattr(unwrap_model(model), "supervised", False) else {}
    with autocast(device, amp):
        out = model(batch["image"], batch["refs"], batch.get("detections"), **targets)
    optimize(out["loss"], optimizer, scheduler, scaler, grad_clip, ema, model)
    return {k: v.detach().float() for k, v in out.items()}


def check_finite(parts: dict[str, torch.Tensor], step: int) -> dict[str, float]:
    values = {k: float(v) for k, v in parts.items()}
    if not math.isfinite(values["loss"]):
        raise NonFiniteLossError(f"the loss is {values['loss']} at step {step} (parts: {values}); "
                                 "the last checkpoint is kept. Lower LR, raise GRAD_NORM_CLIP's strictness, "
                                 "or switch AMP to 'bf16' or 'none'")
    return values


class StopRequest:
    """Set by the first Ctrl-C (SIGINT) or SIGTERM: the loop finishes its step, then stops so the
    caller can save a consistent checkpoint. A second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.requested = False

    def install(self) -> None:
        def handler(signum, frame):
            if self.requested and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.requested = True
        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)


def prepare_batch(model: nn.Module, batch: dict, device: torch.device, channels_last: bool = False,
                  cache: DetectorCache | None = None, amp: str = "none") -> dict:
    """The batch on ``device``; with a cache, also the detector's outputs under ``'detections'``
    (computed as the model's forward would, under the same autocast), for the model to skip its
    detector. The image ids are read before the copy, so the lookup costs no device sync."""
    image_ids = batch["info"][:, 6].tolist() if cache is not None else None
    batch = to_device(batch, device, channels_last)
    if cache is not None:
        with autocast(device, amp):
            batch["detections"] = cache(unwrap_model(model), batch["image"], image_ids)
    return batch


def train_one_epoch(model: nn.Module, batches: Iterable[dict], optimizer, scheduler, ema, scaler, cfg,
                    device: torch.device, step: int,
                    on_log: Callable[[int, dict[str, float]], None] | None = None,
                    progress=None, stop: StopRequest | None = None,
                    detector_cache: DetectorCache | None = None) -> int:
    """Runs the batches of one epoch (or until ``stop`` is requested); returns the global step.

    Losses stay on the device between log points: every PRINT_FREQ steps, and at the end, they
    are read back in one go, checked for NaN/inf (:class:`NonFiniteLossError` names the first bad
    step) and the last one is passed to ``on_log`` with the learning rate and throughput."""
    model.train()
    pending: list[dict[str, torch.Tensor]] = []
    tick, samples = time.perf_counter(), 0
    for batch in batches:
        batch = prepare_batch(model, batch, device, cfg.CHANNELS_LAST, detector_cache, cfg.AMP)
        pending.append(train_step(model, batch, optimizer, scheduler, ema, scaler, cfg.GRAD_NORM_CLIP,
                                  cfg.AMP, device))
        step += 1
        samples += batch["image"].shape[0]
        if progress is not None:
            progress.update(1)
        if step % cfg.PRINT_FREQ == 0:
            _report(pending, step, samples / (time.perf_counter() - tick), optimizer, on_log, progress)
            tick, samples = time.perf_counter(), 0
        if stop is not None and stop.requested:
            break
    if pending:
        _report(pending, step, samples / max(time.perf_counter() - tick, 1e-9), optimizer, on_log, progress)
    return step


def _report(pending: list, step: int, rate: float, optimizer, on_log, progress) -> None:
    for i, parts in enumerate(pending):
        values = check_finite(parts, step - len(pending) + i + 1)
    pending.clear()
    values.update(lr=optimizer.param_groups[0]["lr"], samples_per_s=rate)
    if progress is not None:
        progress.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.2e}",
                             samples_s=f"{rate:.1f}")
    if on_log is not None:
        on_log(step, values)


@torch.no_grad()
def predict(model: nn.Module, batch: dict, amp: str, device: torch.device) -> torch.Tensor:
    """Boxes ``[B,4]`` (x1, y1, x2, y2) in original image pixels."""
    with autocast(device, amp):
        boxes = model(batch["image"], batch["refs"], batch.get("detections"))
    return letterbox_to_original(boxes[:, 0, :4].float(), batch["info"])


def gt_xyxy(gt_box: torch.Tensor) -> torch.Tensor:
    """``[B,1,4]`` or ``[B,4]`` x, y, w, h -> ``[B,4]`` x1, y1, x2, y2."""
    gt = gt_box.reshape(-1, 4).float()
    return torch.cat([gt[:, :2], gt[:, :2] + gt[:, 2:]], dim=1)


BASELINES = ("random_anchor", "most_confident_anchor")


def text_blind_predictor(kind: str, seed: int = 0) -> Callable:
    """A predictor that ignores the expression, for reference accuracies: ``random_anchor`` takes a
    random one of the K selected cells, ``most_confident_anchor`` the cell holding the most
    confident box; either way that cell's most confident box, as the model would."""
    if kind not in BASELINES:
        raise ValueError(f"unknown baseline {kind!r}; choose from {BASELINES}")
    generator = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def predictor(model: nn.Module, batch: dict, amp: str, device: torch.device) -> torch.Tensor:
        with autocast(device, amp):
            candidates = unwrap_model(model).candidate_boxes(batch["image"], batch.get("detections"))
        candidates = candidates.float()  # [B, K, 4, 5+C]
        b, k = candidates.shape[:2]
        if kind == "random_anchor":
            cell = torch.randint(k, (b,), generator=generator).to(device)
        else:
            cell = candidates[..., 4].amax(dim=-1).argmax(dim=1)
        return letterbox_to_original(cell_box(candidates, cell)[:, 0, :4], batch["info"])

    return predictor


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[dict], device: torch.device, amp: str = "none",
             channels_last: bool = False, progress=None, predictor: Callable = predict,
             detector_cache: DetectorCache | None = None) -> dict[str, float]:
    """Acc@0.5 over every sample of the loader; under DDP each rank scores its own shard and the
    counts are summed, so each sample is counted exactly once. ``predictor(model, batch, amp,
    device)`` gives the boxes (default: the model's prediction)."""
    model.eval()
    counts = torch.zeros(2, dtype=torch.float64, device=device)  # correct, seen
    for batch in loader:
        batch = prepare_batch(model, batch, device, channels_last, detector_cache, amp)
        pred = predictor(model, batch, amp, device)
        iou = box_iou(pred, gt_xyxy(batch["gt_box"])).diagonal()
        counts[0] += (iou > 0.5).sum()
        counts[1] += iou.numel()
        if progress is not None:
            progress.update(1)
    correct, n = dist_utils.all_reduce_sum(counts).tolist()
    return {"acc": 100.0 * correct / max(n, 1), "n": int(n)}
