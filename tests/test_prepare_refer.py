"""REFER layout -> annotation file, against what SimREC's data_process.py wrote (tests/fixtures/refer)."""
import json
import os
import pickle
import subprocess
import sys

import pytest

from datasets.prepare_refer import category_index, convert, main
from reference_weights import FIXTURES as ALL_FIXTURES

FIXTURES = os.path.join(ALL_FIXTURES, "refer")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_json(path):
    with open(path) as f:
        return json.load(f)


def test_reproduces_reference_conversion(tmp_path):
    out = tmp_path / "sub" / "refcoco.json"
    assert main(["--data-root", os.path.join(FIXTURES, "raw"), "--dataset", "refcoco",
                 "--split-by", "unc", "--out", str(out)]) == 0
    produced = load_json(out)
    expected = load_json(os.path.join(FIXTURES, "anns", "refcoco.json"))
    assert produced == expected
    assert list(produced) == list(expected)  # split order too


def test_command_line(tmp_path):
    out = tmp_path / "anns.json"
    result = subprocess.run([sys.executable, "-m", "datasets.prepare_refer", "--data-root",
                             os.path.join(FIXTURES, "raw"), "--dataset", "refcoco", "--split-by", "unc",
                             "--out", str(out)], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert load_json(out) == load_json(os.path.join(FIXTURES, "anns", "refcoco.json"))


def make_ref(ref_id, split, image_id, category_id=1, sentences=("a",)):
    return {"ref_id": ref_id, "ann_id": ref_id + 100, "image_id": image_id, "category_id": category_id,
            "split": split, "sentences": [{"sent": s, "raw": s.upper(), "tokens": s.split()} for s in sentences]}


def make_instances(refs, file_name=lambda iid: f"{iid}.jpg"):
    return {"images": [{"id": r["image_id"], "file_name": file_name(r["image_id"])} for r in refs],
            "annotations": [{"id": r["ann_id"], "bbox": [r["ref_id"], 0.5, 2, 3]} for r in refs],
            "categories": []}


def test_split_membership_and_grouping():
    refs = [make_ref(1, "testAB", 10, sentences=("x", "y")), make_ref(2, "train", 11, sentences=("p", "q")),
            make_ref(3, "testC", 12), make_ref(4, "val", 13), make_ref(5, "testB", 19579)]
    out = convert(refs, make_instances(refs), "refclef", "unc")
    assert list(out) == ["train", "val", "testA", "testB", "testC"]
    assert [e["refs"] for e in out["train"]] == [["p", "q"]]  # train: every sentence of a ref together
    assert [e["refs"] for e in out["testA"]] == [["x"], ["y"]]  # others: one sentence per entry
    assert [(e["mask_id"], e["refs"]) for e in out["testB"]] == [(1, ["x"]), (1, ["y"])]  # 19579.jpg dropped
    assert [e["mask_id"] for e in out["testC"]] == [3]
    assert out["val"][0] == {"iid": 13, "bbox": [4, 0.5, 2, 3], "cat_id": 0, "refs": ["a"], "mask_id": 4}

    berkeley = convert(refs, make_instances(refs), "refclef", "berkeley")
    assert list(berkeley) == ["train", "val", "test"]
    assert [e["mask_id"] for e in berkeley["test"]] == [1, 1, 3]
    # The exclusion is by file name within refclef: another dataset keeps image 19579.
    coco_names = make_instances(refs, lambda iid: f"COCO_train2014_{iid:012d}.jpg")
    assert [e["mask_id"] for e in convert(refs, coco_names, "refcoco", "unc")["testB"]] == [1, 1, 5]


@pytest.mark.parametrize("dataset,split_by,splits", [
    ("refcocog", "google", ["train", "val"]), ("refcocog", "umd", ["train", "val", "test"]),
    ("refcoco+", "unc", ["train", "val", "testA", "testB"]), ("refcoco", "google", ["train", "val", "testA", "testB"]),
])
def test_splits_per_dataset(dataset, split_by, splits):
    refs = [make_ref(1, "test", 5)]
    out = convert(refs, make_instances(refs), dataset, split_by)
    assert list(out) == splits
    assert sum(len(v) for v in out.values()) == (1 if "test" in splits else 0)


def test_category_table_maps_coco_ids_onto_80_classes():
    coco_ids = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
    assert [category_index(i) for i in coco_ids] == list(range(80))
    assert category_index(12) == 12 and category_index(95) == 95  # outside the table: unchanged


def test_missing_instance_is_an_error():
    refs = [make_ref(1, "train", 10)]
    instances = make_instances(refs)
    instances["annotations"] = []
    with pytest.raises(ValueError, match="ref 1: its annotation 101"):
        convert(refs, instances, "refcoco", "unc")


def test_missing_files_are_named(tmp_path):
    (tmp_path / "refcoco").mkdir()
    with pytest.raises(FileNotFoundError, match=r"refs\(google\)\.p"):
        main(["--data-root", str(tmp_path), "--dataset", "refcoco", "--split-by", "google", "--out",
              str(tmp_path / "o.json")])
    with open(tmp_path / "refcoco" / "refs(google).p", "wb") as f:
        pickle.dump([], f, protocol=2)
    with pytest.raises(FileNotFoundError, match="instances.json"):
        main(["--data-root", str(tmp_path), "--dataset", "refcoco", "--split-by", "google", "--out",
              str(tmp_path / "o.json")])
