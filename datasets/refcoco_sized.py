"""Stand-in data with RefCOCO's sizes, for rehearsing the pipeline at the users' scale
(``python -m tools.scale_check``) and for timing the loader on COCO-sized JPEGs (``tools.benchmark``).

RefCOCO (unc) holds, per split, these images, objects (training entries) and expressions; an
evaluation entry holds one expression. A fraction of it keeps the ratios: objects per image,
expressions per object, expressions per evaluation image. Images are 640 x 480 JPEGs (COCO's usual
size) of a textured background with coloured rectangles and ellipses, the referents among them;
expressions are 1-8 words drawn from a Zipf law over ``VOCAB_WORDS`` made-up words (letters only,
so that they are tokens of their own), as word frequencies in RefCOCO roughly follow. Only sizes and
costs are meant to be realistic: nothing here can be learnt.

Layout under ``root``: ``images/<iid>.jpg`` and ``anns/synthetic.json`` (the SimREC/RefCLIP format,
read with ``DATASET: synthetic``). The same ``(fraction, seed)`` give the same files.
"""
from __future__ import annotations

import json
import os
from typing import Iterator

import cv2
import numpy as np

# images, objects, expressions (RefCOCO unc); evaluation splits: one entry per expression.
REFCOCO_SIZES = {
    "train": (16994, 42404, 120624),
    "val": (1500, 3811, 10834),
    "testA": (750, 1975, 5657),
    "testB": (750, 1810, 5095),
}
VOCAB_WORDS = 10_000
ZIPF_EXPONENT = 1.1
IMAGE_SIZE = (640, 480)  # width, height
_JPEG_QUALITY = 90


def vocabulary_words(count: int = VOCAB_WORDS) -> list[str]:
    """``count`` distinct made-up lower-case words, most frequent first."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = []
    for rank in range(count):
        word, n = "", rank
        while True:
            word = letters[n % 26] + word
            n = n // 26 - 1
            if n < 0:
                break
        words.append("q" + word)  # a 'q' first keeps the made-up words apart from English ones
    return words


def _spread(total: int, parts: int) -> list[int]:
    """``total`` split over ``parts`` as evenly as integers allow, each at least 1."""
    base, extra = divmod(total, parts)
    return [max(1, base + (i < extra)) for i in range(parts)]


def _expression(rng: np.random.Generator, words: list[str], probabilities: np.ndarray) -> str:
    length = int(rng.integers(1, 9))
    return " ".join(words[i] for i in rng.choice(len(words), size=length, p=probabilities))


def _image(rng: np.random.Generator, boxes: list[list[float]]) -> np.ndarray:
    """A BGR image: a noisy gradient, a few distractor shapes and the ``boxes`` filled."""
    width, height = IMAGE_SIZE
    base = rng.uniform(60, 200, size=3)
    ramp = np.linspace(-1, 1, width, dtype=np.float32)[None, :, None] * rng.uniform(-40, 40, size=3)
    image = np.clip(base + ramp + rng.normal(0, 12, size=(height, width, 3)), 0, 255).astype(np.uint8)
    for x, y, w, h in boxes:
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        if rng.random() < 0.5:
            cv2.rectangle(image, (int(x), int(y)), (int(x + w), int(y + h)), colour, -1)
        else:
            cv2.ellipse(image, (int(x + w / 2), int(y + h / 2)), (int(w / 2), int(h / 2)), 0, 0, 360, colour, -1)
    return image


def _random_box(rng: np.random.Generator) -> list[float]:
    width, height = IMAGE_SIZE
    w, h = float(rng.uniform(40, 320)), float(rng.uniform(40, 320))
    return [float(rng.uniform(0, width - w)), float(rng.uniform(0, height - h)), w, h]


def split_sizes(fraction: float) -> dict[str, tuple[int, int, int]]:
    """Images, objects and expressions of each split at ``fraction`` of RefCOCO (at least one each)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    return {split: tuple(max(1, round(n * fraction)) for n in sizes) for split, sizes in REFCOCO_SIZES.items()}


def _scenes(fraction: float, rng: np.random.Generator) -> Iterator[tuple[str, int, list[list[float]], list[list[int]]]]:
    """Per image: its split, id, object boxes and, per object, how many expressions it gets."""
    iid = 0
    for split, (images, objects, expressions) in split_sizes(fraction).items():
        objects = max(objects, images)
        per_image = _spread(objects, images)
        per_object = iter(_spread(expressions, objects))
        for count in per_image:
            iid += 1
            boxes = [_random_box(rng) for _ in range(count)]
            yield split, iid, boxes, [next(per_object) for _ in range(count)]


def generate(root: str, fraction: float, seed: int = 0) -> dict[str, str]:
    """Writes the data under ``root``; returns its paths (``images``, ``annotations``)."""
    rng = np.random.default_rng(seed)
    words = vocabulary_words()
    ranks = np.arange(1, len(words) + 1, dtype=np.float64) ** -ZIPF_EXPONENT
    probabilities = ranks / ranks.sum()
    paths = {"root": root, "images": os.path.join(root, "images"),
             "annotations": os.path.join(root, "anns", "synthetic.json")}
    os.makedirs(paths["images"], exist_ok=True)
    os.makedirs(os.path.dirname(paths["annotations"]), exist_ok=True)
    splits: dict[str, list[dict]] = {split: [] for split in REFCOCO_SIZES}
    for split, iid, boxes, counts in _scenes(fraction, rng):
        for k, (box, count) in enumerate(zip(boxes, counts)):
            refs = [_expression(rng, words, probabilities) for _ in range(count)]
            entry = {"iid": iid, "bbox": box, "cat_id": 1, "mask_id": len(splits[split])}
            splits[split] += ([{**entry, "refs": refs}] if split == "train"
                              else [{**entry, "refs": [ref]} for ref in refs])
        ok, data = cv2.imencode(".jpg", _image(rng, boxes), [cv2.IMWRITE_JPEG_QUALITY, _JPEG_QUALITY])
        if not ok:
            raise RuntimeError(f"JPEG encoding of image {iid} failed")
        with open(os.path.join(paths["images"], f"{iid}.jpg"), "wb") as f:
            f.write(data.tobytes())
    with open(paths["annotations"], "w") as f:
        json.dump(splits, f)
    return paths
