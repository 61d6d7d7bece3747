"""Letterboxing and the box mappings between original and letterboxed pixels.

``info`` is the 7-tuple ``(h, w, nh, nw, dx, dy, iid)``: the original image
size, the size of the resized image inside the ``S x S`` square, and the
padding on the left and top. Evaluation maps predicted boxes back with
``letterbox_to_original``; ``original_to_letterbox`` is its inverse.
"""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np
import torch

PAD_VALUE = 127


def letterbox_geometry(h: int, w: int, size: int) -> tuple[int, int, int, int]:
    """``(nh, nw, dx, dy)`` of an ``h x w`` image fitted into ``size x size``.

    The long side becomes ``size``; the short side is truncated to an integer,
    not rounded, as the reference does, so ``nw`` or ``nh`` may be one pixel
    less than the exact aspect ratio would give; it is at least one pixel (an
    image thinner than ``1 / size`` of its length would otherwise vanish).
    """
    aspect = w / h
    if aspect < 1:
        nh, nw = size, size * aspect
    else:
        nw, nh = size, size / aspect
    nw, nh = max(int(nw), 1), max(int(nh), 1)
    return nh, nw, (size - nw) // 2, (size - nh) // 2


def letterbox_image(image: np.ndarray, size: int) -> tuple[np.ndarray, tuple[int, int, int, int, int, int]]:
    """Resize ``image`` (H x W x 3 uint8) bilinearly into a ``size x size`` square padded with 127.

    Returns the square and ``(h, w, nh, nw, dx, dy)``.
    """
    h, w = image.shape[:2]
    nh, nw, dx, dy = letterbox_geometry(h, w, size)
    square = np.full((size, size, 3), PAD_VALUE, dtype=np.uint8)
    square[dy:dy + nh, dx:dx + nw] = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
    return square, (h, w, nh, nw, dx, dy)


def chw(square: np.ndarray) -> torch.Tensor:
    """A letterboxed RGB uint8 image ``[S, S, 3]`` -> uint8 ``[3, S, S]``: what the datasets return, a
    quarter of the float32 image's bytes; :func:`normalize_images` finishes it on the device."""
    return torch.from_numpy(square).permute(2, 0, 1).contiguous()


def normalize_images(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 ``[..., 3, S, S]`` -> float32, scaled to [0, 1] and normalised per channel with ``mean``
    and ``std`` (MEAN, STD), on the images' device."""
    mean = torch.tensor(mean, dtype=torch.float32, device=images.device).view(3, 1, 1)
    std = torch.tensor(std, dtype=torch.float32, device=images.device).view(3, 1, 1)
    return (images.float().div(255) - mean) / std


def box_to_yolo(box_xywh: np.ndarray, info, size: int) -> np.ndarray:
    """``[N, 4]`` original ``x, y, w, h`` -> letterboxed ``cx, cy, w, h`` divided by ``size``.

    Computed in float64 like the reference, then clipped to [0, 0.99]: a box
    reaching past the image (or a coordinate past the right or bottom edge)
    is clipped here, while the original box is passed on unchanged.
    """
    h, w, nh, nw, dx, dy = (float(v) for v in info[:6])
    box = np.asarray(box_xywh, dtype=np.float64)
    x1, y1 = box[:, 0] / w, box[:, 1] / h
    x2, y2 = (box[:, 0] + box[:, 2]) / w, (box[:, 1] + box[:, 3]) / h
    yolo = np.stack([
        ((x1 + x2) / 2 * nw + dx) / size,
        ((y1 + y2) / 2 * nh + dy) / size,
        box[:, 2] * (nw / w / size),
        box[:, 3] * (nh / h / size),
    ], axis=1)
    return np.clip(yolo, 0.0, 0.99)


def _prepare(boxes: torch.Tensor, info: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Checked float64 boxes and the columns h, w, nh, nw, dx, dy of ``info``."""
    if info.dim() != 2 or info.shape[1] < 6:
        raise ValueError(f"info must be [B, 7] (h, w, nh, nw, dx, dy, iid), got shape {tuple(info.shape)}")
    if boxes.dim() != 2 or boxes.shape[1] != 4 or boxes.shape[0] != info.shape[0]:
        raise ValueError(f"boxes must be [B, 4] matching info [B, 7], got {tuple(boxes.shape)} "
                         f"and {tuple(info.shape)}")
    info = info.to(device=boxes.device, dtype=torch.float64)  # info often stays on the CPU
    return (boxes.to(torch.float64),) + tuple(info[:, i] for i in range(6))


def letterbox_to_original(boxes_xyxy: torch.Tensor, info: torch.Tensor) -> torch.Tensor:
    """``[B, 4]`` x1, y1, x2, y2 in letterboxed pixels -> the same in original image pixels.

    Follows the reference's evaluation: the corner is mapped, then the width
    and height are scaled and added. Computed in float64 and returned in the
    boxes' dtype.
    """
    b, h, w, nh, nw, dx, dy = _prepare(boxes_xyxy, info)
    box_w = (b[:, 2] - b[:, 0]) / nw * w
    box_h = (b[:, 3] - b[:, 1]) / nh * h
    x1 = (b[:, 0] - dx) / nw * w
    y1 = (b[:, 1] - dy) / nh * h
    return torch.stack([x1, y1, x1 + box_w, y1 + box_h], dim=1).to(boxes_xyxy.dtype)


def clip_to_image(boxes_xyxy: torch.Tensor, info: torch.Tensor) -> torch.Tensor:
    """``[B, 4]`` x1, y1, x2, y2 in original pixels clipped to each image (``info`` rows start with
    h, w). For boxes given to users and pseudo-labels; evaluation keeps the reference's unclipped boxes."""
    h = info[:, 0].to(boxes_xyxy.dtype)
    w = info[:, 1].to(boxes_xyxy.dtype)
    upper = torch.stack([w, h, w, h], dim=1)
    return torch.minimum(boxes_xyxy.clamp(min=0), upper)


def original_to_letterbox(boxes_xyxy: torch.Tensor, info: torch.Tensor) -> torch.Tensor:
    """``[B, 4]`` x1, y1, x2, y2 in original pixels -> letterboxed pixels; inverse of ``letterbox_to_original``."""
    b, h, w, nh, nw, dx, dy = _prepare(boxes_xyxy, info)
    mapped = torch.stack([b[:, 0] * nw / w + dx, b[:, 1] * nh / h + dy,
                          b[:, 2] * nw / w + dx, b[:, 3] * nh / h + dy], dim=1)
    return mapped.to(boxes_xyxy.dtype)
