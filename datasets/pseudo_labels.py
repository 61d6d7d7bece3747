"""Checking a training annotation file (TRAIN_ANN_PATH) against the original (ANN_PATH).

RefCLIP's pseudo-labels (``test.py --export-pseudo-labels``) are the original annotation file with
each training entry's box replaced by the weak model's prediction. A student trains on that file's
training split and is validated on the original's other splits, so the two files must agree on
everything but those boxes: the same splits, the same entries in the same order (image ids and
expressions, hence the same vocabulary), and every replaced box must lie inside its image.
"""
from __future__ import annotations

import os

from .annotations import DataError, describe_entry, image_file_name, load_annotations
from .image_io import image_size

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

