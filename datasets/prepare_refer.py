"""Convert the original REFER layout into the annotation format the dataset reads.

    python -m datasets.prepare_refer --data-root DIR --dataset refcoco --split-by unc --out anns/refcoco.json

reads ``DIR/<dataset>/refs(<split-by>).p`` and ``DIR/<dataset>/instances.json``
and writes what SimREC's ``data/data_process.py`` writes (the conversion the
RefCLIP family's READMEs point to), masks excepted:

- splits per dataset and split-by, in this order: refcoco and refcoco+
  train/val/testA/testB; refcocog google train/val, umd train/val/test;
  refclef unc train/val/testA/testB/testC, berkeley train/val/test;
- a ref belongs to testA (B, C) when its split contains that letter (so a
  'testAB' ref is in both testA and testB), to test when its split contains
  'test', to train or val when its split is exactly that;
- refs in the order of the refs file; a train entry holds every sentence of
  one ref, any other split has one entry per sentence;
- ``refs`` are the sentences' normalised ``sent`` strings (not ``raw``);
  ``bbox`` is the instance's COCO box; ``mask_id`` is the ref id;
- ``cat_id`` maps COCO's 1..90 category ids onto 0..79 with the reference's
  fixed table, applied to every dataset (ids outside the table stay as they are);
- three refclef images the reference leaves out (19579, 17975, 19575) are left out.

The refs file is a pickle, the format REFER ships: only convert files you trust.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
from typing import Any, Sequence

_SPLITS = {
    ("refcoco", None): ("train", "val", "testA", "testB"),
    ("refcoco+", None): ("train", "val", "testA", "testB"),
    ("refcocog", "google"): ("train", "val"),
    ("refcocog", None): ("train", "val", "test"),
    ("refclef", "unc"): ("train", "val", "testA", "testB", "testC"),
    ("refclef", None): ("train", "val", "test"),
}

_REFCLEF_EXCLUDED_IMAGES = {"19579.jpg", "17975.jpg", "19575.jpg"}

# (first COCO id, last COCO id, offset): COCO's 80 categories use ids 1..90 with gaps.
_CATEGORY_RANGES = ((1, 11, 1), (13, 25, 2), (27, 28, 3), (31, 44, 5), (46, 65, 6),
                    (67, 67, 7), (70, 70, 9), (72, 82, 10), (84, 90, 11))


def splits_for(dataset: str, split_by: str) -> tuple[str, ...]:
    return _SPLITS.get((dataset, split_by)) or _SPLITS[(dataset, None)]


def category_index(category_id: int) -> int:
    """COCO category id -> contiguous index, as the reference's table does it."""
    for first, last, offset in _CATEGORY_RANGES:
        if first <= category_id <= last:
            return category_id - offset
    return category_id


def in_split(ref_split: str, split: str) -> bool:
    """Whether a ref whose own split is ``ref_split`` is taken for ``split``."""
    if split in ("testA", "testB", "testC"):
        return split[-1] in ref_split
    if split == "test":
        return "test" in ref_split
    return ref_split == split


def convert(refs: Sequence[dict], instances: dict, dataset: str, split_by: str) -> dict[str, list[dict]]:
    """The annotation file's content, ``{split: [entry]}``."""
    boxes = {ann["id"]: ann["bbox"] for ann in instances["annotations"]}
    file_names = {image["id"]: image["file_name"] for image in instances["images"]}
    result = {}
    for split in splits_for(dataset, split_by):
        entries = []
        for ref in refs:
            if not in_split(ref["split"], split):
                continue
            ref_id = ref["ref_id"]
            if ref["ann_id"] not in boxes:
                raise ValueError(f"ref {ref_id}: its annotation {ref['ann_id']} is not in instances.json")
            if ref["image_id"] not in file_names:
                raise ValueError(f"ref {ref_id}: its image {ref['image_id']} is not in instances.json")
            bbox, file_name = boxes[ref["ann_id"]], file_names[ref["image_id"]]
            if dataset == "refclef" and file_name in _REFCLEF_EXCLUDED_IMAGES:
                continue
            sentences = [sentence["sent"] for sentence in ref["sentences"]]
            groups = [sentences] if split == "train" else [[s] for s in sentences]
            entries += [{"iid": ref["image_id"], "bbox": bbox, "cat_id": category_index(ref["category_id"]),
                         "refs": group, "mask_id": ref_id} for group in groups]
        result[split] = entries
    return result


def load_refer(data_root: str, dataset: str, split_by: str) -> tuple[list[dict], dict[str, Any]]:
    folder = os.path.join(data_root, dataset)
    refs_path = os.path.join(folder, f"refs({split_by}).p")
    instances_path = os.path.join(folder, "instances.json")
    for path in (refs_path, instances_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found: --data-root must hold <dataset>/refs(<split-by>).p "
                                    f"and <dataset>/instances.json (the REFER layout)")
    with open(refs_path, "rb") as f:
        # REFER's pickles were written by Python 2; their byte strings are UTF-8 text.
        refs = pickle.load(f, encoding="utf-8")
    with open(instances_path) as f:
        instances = json.load(f)
    return refs, instances


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m datasets.prepare_refer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", required=True, help="folder holding <dataset>/refs(<split-by>).p")
    parser.add_argument("--dataset", required=True, choices=["refcoco", "refcoco+", "refcocog", "refclef"])
    parser.add_argument("--split-by", required=True, choices=["unc", "google", "umd", "berkeley"])
    parser.add_argument("--out", required=True, help="annotation file to write (JSON)")
    args = parser.parse_args(argv)

    refs, instances = load_refer(args.data_root, args.dataset, args.split_by)
    annotations = convert(refs, instances, args.dataset, args.split_by)
    folder = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(folder, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(annotations, f)
    counts = ", ".join(f"{split} {len(entries)}" for split, entries in annotations.items())
    print(f"wrote {args.out}: {counts} entries", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
