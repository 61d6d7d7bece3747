"""Reading and checking a SimREC/RefCLIP annotation file.

The file is JSON ``{split: [entry]}`` with ``entry = {iid, bbox: [x, y, w, h],
cat_id, refs: [expression, ...], mask_id}``. Training entries hold every
expression of one object, evaluation entries one expression each. Only
``iid``, ``bbox`` and ``refs`` are used; the rest is carried along.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any

from utils.text_io import read_text

# Datasets whose images are COCO train2014 files; every other dataset names
# its images by the bare id (ReferIt, synthetic).
COCO_DATASETS = ("refcoco", "refcoco+", "refcocog")


class DataError(ValueError):
    """Annotation or image data that cannot be used as it is; the message says what to fix."""


def image_file_name(dataset: str, iid: int) -> str:
    return f"COCO_train2014_{iid:012d}.jpg" if dataset in COCO_DATASETS else f"{iid}.jpg"


def describe_entry(split: str, index: int, entry: Any) -> str:
    """How error messages point at an entry: split, position and image id when there is one."""
    iid = entry.get("iid") if isinstance(entry, dict) else None
    return f"entry {split}[{index}]" + (f" (iid {iid})" if iid is not None else "")


def load_annotations(path: str, dataset: str) -> dict[str, list[dict]]:
    """The parsed file, every entry checked; errors name the file, the entry and ANN_PATH."""
    if not os.path.isfile(path):
        raise DataError(f"annotation file not found: {path} (set ANN_PATH['{dataset}'] in the config; "
                        f"python -m datasets.prepare_refer makes one from the REFER data)")
    try:
        data = json.loads(read_text(path, "annotation file", DataError))
    except json.JSONDecodeError as err:
        raise DataError(f"annotation file {path} is not valid JSON: {err}") from None
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise DataError(f"annotation file {path} must hold {{split: [entry, ...]}} at its top level")
    for split, entries in data.items():
        for index, entry in enumerate(entries):
            problem = _entry_problem(entry)
            if problem:
                raise DataError(f"{path}: malformed {describe_entry(split, index, entry)}: {problem}")
    return data


def select_splits(data: dict[str, list[dict]], split: str, path: str) -> list[tuple[str, int]]:
    """``(split, index)`` of every entry of ``split``, which may join several with '+'."""
    chosen = []
    for name in split.split("+"):
        if name not in data:
            raise DataError(f"split '{name}' is not in {path}; its splits are {list(data)}")
        chosen += [(name, i) for i in range(len(data[name]))]
    return chosen


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _entry_problem(entry: Any) -> str | None:
    if not isinstance(entry, dict):
        return f"expected an object with iid, bbox and refs, got {type(entry).__name__}"
    missing = [key for key in ("iid", "bbox", "refs") if key not in entry]
    if missing:
        return f"missing {', '.join(missing)}"
    iid = entry["iid"]
    if not isinstance(iid, int) or isinstance(iid, bool) or iid < 0:
        return f"iid must be a non-negative integer, got {iid!r}"
    bbox = entry["bbox"]
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
        return f"bbox must be [x, y, w, h] of 4 finite numbers, got {bbox!r}"
    if bbox[2] < 0 or bbox[3] < 0:
        return f"bbox width and height must not be negative, got {bbox!r}"
    refs = entry["refs"]
    if not (isinstance(refs, list) and refs and all(isinstance(r, str) for r in refs)):
        return f"refs must be a non-empty list of strings, got {refs!r}"
    return None
