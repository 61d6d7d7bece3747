"""A tiny referring dataset for pipeline tests: coloured squares on grey, named by colour."""
from __future__ import annotations

import json
import os

import cv2
import numpy as np

from utils.config import Config, load_config

COLOURS = {"red": (0, 0, 255), "green": (0, 255, 0), "blue": (255, 0, 0)}


def make_tiny_dataset(root: str, images: int = 12, size: int = 96, seed: int = 0) -> tuple[str, str]:
    """``root/images/<iid>.jpg`` and ``root/anns.json`` with splits train / val / testA / testB;
    returns (annotation file, image folder)."""
    rng = np.random.default_rng(seed)
    image_dir = os.path.join(root, "images")
    os.makedirs(image_dir, exist_ok=True)
    splits = {"train": [], "val": [], "testA": [], "testB": []}
    names = list(COLOURS)
    for iid in range(1, images + 1):
        canvas = np.full((size, size + 16, 3), 127, np.uint8)
        objects = []
        for k, name in enumerate(rng.permutation(names)[:2]):
            s = int(rng.integers(20, 36))
            x = int(rng.integers(0, canvas.shape[1] - s)) if k == 0 else (int(objects[0][0]) + 40) % (canvas.shape[1] - s)
            y = int(rng.integers(0, size - s))
            canvas[y:y + s, x:x + s] = COLOURS[name]
            objects.append((x, y, s, name))
        cv2.imwrite(os.path.join(image_dir, f"{iid}.jpg"), canvas)
        split = ["train"] * 6 + ["val", "val", "testA", "testB"]
        split = split[(iid - 1) % len(split)]
        for k, (x, y, s, name) in enumerate(objects):
            if split.startswith("test") and k:
                continue  # one object per test image: odd split sizes catch padded shards
            refs = [f"the {name} square", f"{name} one", f"{name}"]
            bbox = [float(x), float(y), float(s), float(s)]
            if split == "train":
                splits[split].append({"iid": iid, "bbox": bbox, "cat_id": 0, "refs": refs, "mask_id": len(splits[split])})
            else:
                splits[split].append({"iid": iid, "bbox": bbox, "cat_id": 0, "refs": refs[:1], "mask_id": 0})
    ann = os.path.join(root, "anns.json")
    with open(ann, "w") as f:
        json.dump(splits, f)
    return ann, image_dir


def tiny_cli_overrides(root: str, ann: str, image_dir: str) -> list[str]:
    """Config overrides for train.py / test.py on the tiny dataset and the tiny model."""
    return ["DATASET=synthetic", f"ANN_PATH={{synthetic: {ann}}}", f"IMAGE_PATH={{synthetic: {image_dir}}}",
            "INPUT_SHAPE=[64, 64]", "VIS_WIDTH=0.125", "HIDDEN_SIZE=32", "FF_SIZE=64", "MULTI_HEAD=4",
            "N_SA=1", "SELECT_NUM=3", "WORD_EMBED_SIZE=8", "USE_GLOVE=false", "MAX_TOKEN=4", "CLASS_NUM=2",
            "PRETRAIN_WEIGHT=none", "BATCH_SIZE=4", "NUM_WORKER=0", "EPOCHS=2", "WARMUP=1", "LR=0.001",
            "PRINT_FREQ=2", f"LOG_PATH={root}/logs"]


def tiny_config(tiny: tuple, *extra: str) -> Config:
    """The quickstart's config on the tiny dataset (the ``tiny`` fixture) and the tiny model, without
    dropout (so that two models built alike answer alike), with ``extra`` overrides."""
    root, ann, images = tiny
    return load_config("config/synthetic/quickstart.yaml",
                       [*tiny_cli_overrides(str(root), ann, images), "DROPOUT_R=0.0", *extra])
