"""Drawings of predictions a person can read: each box labelled on a filled band of its colour in
black or white (whichever contrasts), the expression above the image, a legend below, and contact
sheets that put many drawings in one grid."""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from torchvision.ops import box_iou

from datasets import FirstExpression, RefDataset, read_image
from models.detector_cache import DetectorCache
from .engine import prepare_batch
from .evaluation import gt_xyxy, model_boxes

# BGR
GROUND_TRUTH = (0, 190, 0)
CORRECT = (230, 120, 0)
WRONG = (0, 0, 230)
CHOSEN = (0, 140, 255)
CANDIDATE = (200, 200, 0)
LEGEND = ((GROUND_TRUTH, "ground truth"), (CORRECT, "correct prediction (IoU > 0.5)"), (WRONG, "wrong prediction"))

FONT = cv2.FONT_HERSHEY_SIMPLEX
FONT_SCALE = 0.45
PAD = 4
TILE_SIZE = 320  # the longest image side in a contact sheet's tiles
MIN_SIZE = 320  # smaller images are enlarged to this for drawing, so labels fit


def text_colour(background: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black on a light BGR colour, white on a dark one."""
    b, g, r = background
    return (0, 0, 0) if 0.114 * b + 0.587 * g + 0.299 * r > 140 else (255, 255, 255)


def fit_text(text: str, width: int) -> str:
    """``text``, cut and ended with '...' when it is wider than ``width`` pixels."""
    if _text_size(text)[0] <= width:
        return text
    while text and _text_size(text + "...")[0] > width:
        text = text[:-1]
    return text + "..."


def _text_size(text: str) -> tuple[int, int]:
    (w, h), baseline = cv2.getTextSize(text, FONT, FONT_SCALE, 1)
    return w, h + baseline


def draw_box(canvas: np.ndarray, box: Sequence[float], colour: tuple[int, int, int], label: str = "",
             thickness: int = 2) -> None:
    """Draws ``box`` (x1, y1, x2, y2) on ``canvas`` in place, ``label`` on a band of the box's colour
    above the box (inside its top edge when the box touches the image's top)."""
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    cv2.rectangle(canvas, (x1, y1), (x2, y2), colour, thickness)
    if not label:
        return
    width = canvas.shape[1]
    label = fit_text(label, width - 2 * PAD)
    text_w, text_h = _text_size(label)
    band_h = text_h + 2 * PAD
    top = y1 - band_h if y1 - band_h >= 0 else max(0, y1)
    left = min(max(0, x1), max(0, width - text_w - 2 * PAD))
    cv2.rectangle(canvas, (left, top), (left + text_w + 2 * PAD, top + band_h), colour, cv2.FILLED)
    cv2.putText(canvas, label, (left + PAD, top + band_h - PAD - 2), FONT, FONT_SCALE, text_colour(colour), 1,
                cv2.LINE_AA)


def text_band(width: int, lines: Sequence[str]) -> np.ndarray:
    """A white ``[h, width, 3]`` band with ``lines`` in black, one under the other."""
    line_h = _text_size("Ag")[1] + PAD
    band = np.full((len(lines) * line_h + PAD, width, 3), 255, np.uint8)
    for i, line in enumerate(lines):
        cv2.putText(band, fit_text(line, width - 2 * PAD), (PAD, (i + 1) * line_h - 2), FONT, FONT_SCALE,
                    (0, 0, 0), 1, cv2.LINE_AA)
    return band


def legend_band(width: int, entries: Sequence[tuple[tuple[int, int, int], str]] = LEGEND) -> np.ndarray:
    """A white band with a colour swatch and a name per entry, wrapped onto as many rows as ``width`` needs."""
    line_h = _text_size("Ag")[1] + PAD
    swatch = line_h - PAD
    rows, row, used = [], [], 0
    for colour, name in entries:
        need = swatch + PAD + _text_size(name)[0] + 3 * PAD
        if row and used + need > width:
            rows.append(row)
            row, used = [], 0
        row.append((colour, name))
        used += need
    rows.append(row)
    band = np.full((len(rows) * line_h + PAD, width, 3), 255, np.uint8)
    for r, row in enumerate(rows):
        x, y = PAD, r * line_h + PAD
        for colour, name in row:
            cv2.rectangle(band, (x, y), (x + swatch, y + swatch), colour, cv2.FILLED)
            x += swatch + PAD
            cv2.putText(band, fit_text(name, width - x), (x, y + swatch - 2), FONT, FONT_SCALE, (0, 0, 0), 1,
                        cv2.LINE_AA)
            x += _text_size(name)[0] + 3 * PAD
    return band


def fit_image(image: np.ndarray, boxes: np.ndarray, longest: int,
              square: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``image`` resized so its longest side is ``longest`` (and centred on a grey square when
    ``square``), with ``boxes`` ``[N, 4]`` x1, y1, x2, y2 mapped along."""
    h, w = image.shape[:2]
    scale = longest / max(h, w)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    resized = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4) * scale
    if not square:
        return resized, boxes
    canvas = np.full((longest, longest, 3), 127, np.uint8)
    dx, dy = (longest - nw) // 2, (longest - nh) // 2
    canvas[dy:dy + nh, dx:dx + nw] = resized
    return canvas, boxes + [dx, dy, dx, dy]


def draw_evaluation(image: np.ndarray, expression: str, gt: np.ndarray, pred: np.ndarray, iou: float,
                    tile: int | None = None) -> np.ndarray:
    """An evaluated sample: the annotated box and the prediction on ``image`` (BGR), the expression
    and the IoU above, the legend below. ``tile``: letterboxed to that size, so that every drawing
    has one shape (contact sheets); else the image's own size (at least :data:`MIN_SIZE`)."""
    longest = tile or max(MIN_SIZE, *image.shape[:2])
    canvas, (gt, pred) = fit_image(image, np.stack([gt, pred]), longest, square=tile is not None)
    hit = iou > 0.5
    draw_box(canvas, gt, GROUND_TRUTH, "ground truth")
    draw_box(canvas, pred, CORRECT if hit else WRONG, f"prediction, IoU {iou:.2f}")
    header = text_band(canvas.shape[1], [expression, f"IoU {iou:.2f}: {'correct' if hit else 'wrong'}"])
    return np.concatenate([header, canvas, legend_band(canvas.shape[1])], axis=0)


def draw_prediction(image: np.ndarray, expression: str, boxes: Sequence[Sequence[float]],
                    scores: Sequence[float], lines: Sequence[str] = ()) -> np.ndarray:
    """A prediction: ``boxes`` best first (the chosen one, then other candidates) with their match
    scores, the expression and ``lines`` above the image."""
    canvas, fitted = fit_image(image, np.asarray(boxes), max(MIN_SIZE, *image.shape[:2]))
    for rank in range(len(fitted) - 1, -1, -1):  # the chosen box last, on top
        if rank == 0:
            draw_box(canvas, fitted[0], CHOSEN, f"match {scores[0]:.2f}", thickness=3)
        else:
            draw_box(canvas, fitted[rank], CANDIDATE, f"#{rank + 1} {scores[rank]:.2f}", thickness=1)
    return np.concatenate([text_band(canvas.shape[1], [expression, *lines]), canvas], axis=0)


def contact_sheet(drawings: Sequence[np.ndarray], columns: int | None = None) -> np.ndarray:
    """Drawings of one shape ``[h, w, 3]`` in a grid, row by row: ``[rows * h, columns * w, 3]``
    with ``columns`` (default: the smallest square grid that holds them all); empty cells white."""
    if not drawings:
        raise ValueError("a contact sheet needs at least one drawing")
    h, w = drawings[0].shape[:2]
    if any(d.shape != drawings[0].shape for d in drawings):
        raise ValueError("contact sheet drawings must share one shape; draw them with the same tile size")
    columns = columns or math.ceil(math.sqrt(len(drawings)))
    rows = math.ceil(len(drawings) / columns)
    sheet = np.full((rows * h, columns * w, 3), 255, np.uint8)
    for i, drawing in enumerate(drawings):
        r, c = divmod(i, columns)
        sheet[r * h:(r + 1) * h, c * w:(c + 1) * w] = drawing
        cv2.rectangle(sheet, (c * w, r * h), ((c + 1) * w - 1, (r + 1) * h - 1), (160, 160, 160), 1)
    return sheet


def sample_across_images(image_ids: Sequence[int], count: int, seed: int) -> list[int]:
    """``count`` indices into ``image_ids``, each image's first before any image's second: a
    seeded shuffle of the images, then of each image's entries, taken round by round."""
    rng = np.random.default_rng(seed)
    by_image = defaultdict(list)
    for index, iid in enumerate(image_ids):
        by_image[iid].append(index)
    images = [by_image[iid] for iid in sorted(by_image)]
    order = [list(rng.permutation(images[i])) for i in rng.permutation(len(images))]
    rounds = max((len(entries) for entries in order), default=0)
    picked = [entries[r] for r in range(rounds) for entries in order if r < len(entries)]
    return [int(i) for i in picked[:count]]


@dataclass
class EvaluatedSample:
    """One entry predicted from its first expression: boxes x1, y1, x2, y2 in the image's pixels."""

    index: int
    image: np.ndarray
    expression: str
    gt: np.ndarray
    pred: np.ndarray
    iou: float

    def draw(self, tile: int | None = None) -> np.ndarray:
        return draw_evaluation(self.image, self.expression, self.gt, self.pred, self.iou, tile)


def evaluate_samples(model: torch.nn.Module, dataset: RefDataset, indices: Sequence[int], device: torch.device,
                     mean_std: tuple[Sequence[float], Sequence[float]], amp: str = "none",
                     batch_size: int = 16) -> list[EvaluatedSample]:
    """Entries ``indices`` of ``dataset``, each predicted from its first expression, with the IoU
    evaluation computes (unclipped boxes); the detector runs once per image."""
    model.eval()
    samples = []
    cache = DetectorCache(0)
    for batch in DataLoader(Subset(FirstExpression(dataset), list(indices)), batch_size=batch_size):
        batch = prepare_batch(model, batch, device, cache=cache, amp=amp, mean_std=mean_std)
        preds = model_boxes(model, batch, amp, device)
        gts = gt_xyxy(batch["gt_box"])
        ious = box_iou(preds, gts).diagonal().tolist()
        for index, pred, gt, iou in zip(batch["index"].tolist(), preds.cpu().numpy(), gts.cpu().numpy(), ious):
            entry = dataset.entries[index]
            image = read_image(dataset.image_file(entry))
            samples.append(EvaluatedSample(index, image, entry["refs"][0], gt, pred, iou))
    return samples


def evaluation_sheet(samples: Sequence[EvaluatedSample], tile: int = TILE_SIZE) -> np.ndarray:
    """All ``samples`` drawn as ``tile``-sized drawings in one contact sheet."""
    return contact_sheet([sample.draw(tile) for sample in samples])
