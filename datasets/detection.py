"""COCO-format detection data for pre-training the detector (``pretrain.py``).

Images are letterboxed to INPUT_SHAPE as for REC training, optionally flipped horizontally
(DET_FLIP); detection category ids, sorted, become class indices 0..CLASS_NUM-1. The training set
leaves out every image that appears in any split other than ``train`` of the REC annotation files
DET_EXCLUDE_ANNS (an REC ``iid`` is the detection file's image id, as for COCO), and the
DET_VAL_ANN_PATH images when both files share one image folder.
"""
from __future__ import annotations

import json
import os
from typing import Iterable, Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from utils.text_io import read_text

from .annotations import DataError, load_annotations
from .image_io import read_image
from .letterbox import chw, letterbox_image


def excluded_image_ids(rec_ann_paths: Iterable[str]) -> set[int]:
    """Image ids of every entry outside the ``train`` split of the REC annotation files."""
    ids: set[int] = set()
    for path in rec_ann_paths:
        for split, entries in load_annotations(path, "DET_EXCLUDE_ANNS").items():
            if split != "train":
                ids.update(entry["iid"] for entry in entries)
    return ids


class DetectionDataset(Dataset):
    """Letterboxed images of a COCO detection file with their boxes.

    An item: ``image`` uint8 [3,S,S] (normalised on the device: ``normalize_images``), ``boxes``
    [N,4] x1,y1,x2,y2 in letterboxed pixels, ``labels`` [N] class indices, ``info`` [7] (h, w, nh, nw,
    dx, dy, image id) for mapping boxes back. Crowd and empty boxes are left out. A key is an index, or ``(index, draw_key)`` as
    ``EpochSampler`` gives them: the flip is then drawn from ``draw_key`` (repeatable).
    """

    def __init__(self, ann_path: str, image_dir: str, cfg, exclude: Iterable[int] = (), flip: bool = False):
        if not os.path.isfile(ann_path):
            raise DataError(f"detection annotation file not found: {ann_path} (DET_ANN_PATH / DET_VAL_ANN_PATH)")
        try:
            coco = json.loads(read_text(ann_path, "detection annotation file", DataError))
        except json.JSONDecodeError as err:
            raise DataError(f"detection annotation file {ann_path} is not valid JSON: {err}") from None
        self.image_dir = image_dir
        self.size = cfg.INPUT_SHAPE[0]
        self.flip = flip
        self.category_ids = sorted(c["id"] for c in coco["categories"])
        label_of = {cid: i for i, cid in enumerate(self.category_ids)}
        exclude = set(exclude)
        images = sorted((im for im in coco["images"] if im["id"] not in exclude), key=lambda im: im["id"])
        self.num_excluded = len(coco["images"]) - len(images)
        self.image_ids = [im["id"] for im in images]
        self.file_names = {im["id"]: im["file_name"] for im in images}
        self.targets: dict[int, list[tuple[int, list[float]]]] = {iid: [] for iid in self.image_ids}
        for ann in coco["annotations"]:
            x, y, w, h = ann["bbox"]
            if ann["image_id"] in self.targets and not ann.get("iscrowd", 0) and w >= 1 and h >= 1:
                self.targets[ann["image_id"]].append((label_of[ann["category_id"]], [x, y, x + w, y + h]))

    def __len__(self) -> int:
        return len(self.image_ids)

    def gt(self, iid: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Original-pixel boxes ``[N,4]`` (x1, y1, x2, y2) and labels ``[N]`` of image ``iid``."""
        items = self.targets[iid]
        boxes = torch.tensor([b for _, b in items], dtype=torch.float64).reshape(-1, 4)
        return boxes, torch.tensor([c for c, _ in items], dtype=torch.int64)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        if isinstance(key, tuple):
            index, draw_key = key
            flip = self.flip and np.random.default_rng(draw_key).random() < 0.5
        else:
            index = key
            flip = self.flip and bool(torch.rand(()) < 0.5)
        iid = self.image_ids[index]
        path = os.path.join(self.image_dir, self.file_names[iid])
        image = read_image(path, " (DET_IMAGE_PATH / DET_VAL_IMAGE_PATH)")
        square, (h, w, nh, nw, dx, dy) = letterbox_image(cv2.cvtColor(image, cv2.COLOR_BGR2RGB), self.size)
        boxes, labels = self.gt(iid)
        boxes = boxes.float()
        boxes[:, 0::2] = boxes[:, 0::2] * (nw / w) + dx
        boxes[:, 1::2] = boxes[:, 1::2] * (nh / h) + dy
        if flip:
            square = np.ascontiguousarray(square[:, ::-1])
            boxes[:, 0::2] = self.size - boxes[:, [2, 0]]
        return {"image": chw(square), "boxes": boxes, "labels": labels,
                "info": torch.tensor([h, w, nh, nw, dx, dy, iid], dtype=torch.float64)}


def collate_detections(samples: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Images stacked; targets as one ``[M,6]`` tensor of (sample index, class, x1, y1, x2, y2)."""
    targets = [torch.cat([torch.full((len(s["labels"]), 1), float(i)), s["labels"][:, None].float(), s["boxes"]], 1)
               for i, s in enumerate(samples)]
    return {"image": torch.stack([s["image"] for s in samples]), "targets": torch.cat(targets),
            "info": torch.stack([s["info"] for s in samples])}


def build_detection_datasets(cfg) -> tuple[DetectionDataset, DetectionDataset]:
    """The training set (with the exclusions of the module docstring) and the validation set."""
    val_dir = cfg.DET_VAL_IMAGE_PATH or cfg.DET_IMAGE_PATH
    val_set = DetectionDataset(cfg.DET_VAL_ANN_PATH, val_dir, cfg)
    exclude = excluded_image_ids(cfg.DET_EXCLUDE_ANNS)
    if os.path.abspath(val_dir) == os.path.abspath(cfg.DET_IMAGE_PATH):
        exclude |= set(val_set.image_ids)
    train_set = DetectionDataset(cfg.DET_ANN_PATH, cfg.DET_IMAGE_PATH, cfg, exclude, flip=cfg.DET_FLIP)
    for name, dataset in (("DET_ANN_PATH", train_set), ("DET_VAL_ANN_PATH", val_set)):
        if len(dataset.category_ids) != cfg.CLASS_NUM:
            raise DataError(f"{name} has {len(dataset.category_ids)} categories but CLASS_NUM is "
                            f"{cfg.CLASS_NUM}; set CLASS_NUM: {len(dataset.category_ids)}")
    if train_set.category_ids != val_set.category_ids:
        raise DataError("DET_ANN_PATH and DET_VAL_ANN_PATH have different category ids")
    if not len(train_set):
        raise DataError(f"no training images left in {cfg.DET_ANN_PATH} after the exclusions")
    return train_set, val_set
