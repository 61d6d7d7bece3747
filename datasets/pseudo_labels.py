"""Checking a training annotation file (TRAIN_ANN_PATH) against the original (ANN_PATH).

RefCLIP's pseudo-labels (``test.py --export-pseudo-labels``) are the original annotation file with
each training entry's box replaced by the weak model's prediction. A student trains on that file's
training split and is validated on the original's other splits, so the two files must agree on
everything but those boxes: the same splits, the same entries in the same order (image ids and
expressions, hence the same vocabulary), and every replaced box must lie inside its image.

The export also records each training entry's margin (:data:`MARGIN_FIELD`: how decided the label
was; ``null`` where nothing competed with it), by which the student may keep only the most decided
labels (PSEUDO_LABEL_KEEP) and weight its loss (PSEUDO_LABEL_WEIGHTING): :func:`training_entries`.
Other readers ignore the field.
"""
from __future__ import annotations

import math
import os

import numpy as np
import torch
from scipy.stats import rankdata
from torch.utils.data import Dataset

from .annotations import DataError, _is_number, describe_entry, image_file_name, load_annotations
from .image_io import image_size
from .refer_dataset import RefDataset

# The per-entry field of a pseudo-label file that holds the label's margin.
MARGIN_FIELD = "pseudo_margin"

# How far past an image edge a box may reach (pixels): predictions mapped back from the letterboxed
# input are floats, and a box clipped to the image may overshoot it by rounding.
EDGE_TOLERANCE = 1.0

_HOW_TO_MAKE = "(test.py --export-pseudo-labels writes the original file with only the training boxes replaced)"


def check_training_file(path: str, original: str, train_split: str, dataset: str, image_dir: str) -> None:
    """Raise :class:`DataError` naming ``path`` and the first entry that does not fit: NaN or
    malformed entries, a split missing or added, a split of another length, an entry with another
    image or other expressions than ``original``'s, or a training box outside its image (images
    that are missing are left to the dataset, which reports or skips them)."""
    data = load_annotations(path, dataset)
    reference = load_annotations(original, dataset)
    for split in reference:
        if split not in data:
            raise DataError(f"{path} lacks split '{split}' of {original} {_HOW_TO_MAKE}")
    for split in data:
        if split not in reference:
            raise DataError(f"{path} holds split '{split}', which {original} does not {_HOW_TO_MAKE}")
    for split, entries in reference.items():
        if len(data[split]) != len(entries):
            raise DataError(f"{path}: split '{split}' holds {len(data[split])} entries, {original}'s "
                            f"{len(entries)} {_HOW_TO_MAKE}")
        for index, (entry, expected) in enumerate(zip(data[split], entries)):
            if entry["iid"] != expected["iid"]:
                raise DataError(f"{path}: {describe_entry(split, index, entry)} names image {entry['iid']}, "
                                f"{original} image {expected['iid']} there {_HOW_TO_MAKE}")
            if entry["refs"] != expected["refs"]:
                raise DataError(f"{path}: the expressions of {describe_entry(split, index, entry)} differ from "
                                f"{original}'s {_HOW_TO_MAKE}")
    sizes: dict[int, tuple[int, int] | None] = {}
    for split in train_split.split("+"):
        if split not in data:
            raise DataError(f"split '{split}' (TRAIN_SPLIT) is not in {path}; its splits are {list(data)}")
        for index, entry in enumerate(data[split]):
            margin = entry.get(MARGIN_FIELD)
            if margin is not None and not _is_number(margin):
                raise DataError(f"{path}: the {MARGIN_FIELD} of {describe_entry(split, index, entry)} is {margin!r}; "
                                "it must be a finite number, or null where nothing competed with the label")
            iid = entry["iid"]
            if iid not in sizes:
                sizes[iid] = image_size(os.path.join(image_dir, image_file_name(dataset, iid)))
            if sizes[iid] is None:
                continue
            width, height = sizes[iid]
            x, y, w, h = entry["bbox"]
            if (x < -EDGE_TOLERANCE or y < -EDGE_TOLERANCE or x + w > width + EDGE_TOLERANCE
                    or y + h > height + EDGE_TOLERANCE):
                raise DataError(f"{path}: the box {entry['bbox']} of {describe_entry(split, index, entry)} reaches "
                                f"outside its {width}x{height} image; boxes are [x, y, w, h] in the image's "
                                "pixels, clip them to the image")



def entry_margins(dataset: RefDataset) -> np.ndarray:
    """``[N]`` the margin of each entry's label (``inf`` for ``null``: nothing competed with it);
    a :class:`DataError` naming the fix where an entry has none."""
    margins = np.empty(len(dataset))
    for index, entry in enumerate(dataset.entries):
        if MARGIN_FIELD not in entry:
            raise DataError(f"{dataset.ann_path} holds no {MARGIN_FIELD} for {dataset.entry_names[index]}, and "
                            "PSEUDO_LABEL_KEEP below 1 and PSEUDO_LABEL_WEIGHTING: margin rank the labels by it: "
                            "export them again with test.py --export-pseudo-labels, or set PSEUDO_LABEL_KEEP=1.0 "
                            "PSEUDO_LABEL_WEIGHTING=none")
        margin = entry[MARGIN_FIELD]
        margins[index] = math.inf if margin is None else margin
    return margins


def kept_entries(margins: np.ndarray, keep: float) -> np.ndarray:
    """The indices, ascending, of the ``keep`` fraction (rounded up) of entries whose margins are
    largest; among equal margins the earlier entry first."""
    count = math.ceil(keep * len(margins) - 1e-9)
    return np.sort(np.argsort(-margins, kind="stable")[:count])


def margin_weights(margins: np.ndarray) -> np.ndarray:
    """Loss weights from the margins' ranks: ``2 * (rank - 0.5) / N`` (ranks from 1, equal margins
    sharing their mean rank), so the least decided label weighs about 0, the most decided about 2,
    and the mean is 1. Ranks, not the margins themselves: a teacher's and a student's margins are in
    different units, and a few very large ones would swamp the rest."""
    return 2.0 * (rankdata(margins, method="average") - 0.5) / len(margins)


class WeightedEntries(Dataset):
    """The entries of ``dataset`` at ``indices``, in that order; each item carries its loss
    ``weight`` (float32 scalar) when ``weights`` is given. Takes the keys of ``dataset`` (an index,
    or ``(index, draw_key)`` from ``EpochSampler``)."""

    def __init__(self, dataset: RefDataset, indices: np.ndarray, weights: np.ndarray | None = None):
        self.dataset, self.indices, self.weights = dataset, indices.tolist(), weights

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        index, draw = key if isinstance(key, tuple) else (key, None)
        item = self.dataset[self.indices[index] if draw is None else (self.indices[index], draw)]
        if self.weights is not None:
            item["weight"] = torch.tensor(self.weights[index], dtype=torch.float32)
        return item


def training_entries(dataset: RefDataset, keep: float, weighting: str) -> Dataset:
    """What the student trains on: ``dataset`` itself when every entry is kept unweighted (KEEP 1.0,
    WEIGHTING 'none'); else the ``keep`` fraction of entries of largest margin, weighted by their
    margins' ranks among them with ``weighting`` 'margin' (:func:`margin_weights`)."""
    if keep >= 1 and weighting == "none":
        return dataset
    margins = entry_margins(dataset)
    kept = kept_entries(margins, keep)
    weights = margin_weights(margins[kept]) if weighting == "margin" else None
    return WeightedEntries(dataset, kept, weights)
