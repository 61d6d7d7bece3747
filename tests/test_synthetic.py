"""The synthetic dataset: determinism, unambiguous expressions, splits, and COCO/REC consistency."""
import json
import os
import re

import cv2
import pytest

from datasets import load_annotations
from datasets.synthetic import (CATEGORIES, DETECTION_CATEGORIES, TEST_A_CATEGORIES, expression_kind, generate,
                                resolve)

NUM_IMAGES, IMAGE_SIZE = 12, 96


def _load(path):
    with open(path) as f:
        return json.load(f)


def _bytes(path):
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return generate(str(tmp_path_factory.mktemp("synthetic")), NUM_IMAGES, IMAGE_SIZE, seed=0)


def test_same_seed_same_bytes_other_seed_other_data(data, tmp_path):
    again = generate(str(tmp_path / "again"), NUM_IMAGES, IMAGE_SIZE, seed=0)
    other = generate(str(tmp_path / "other"), NUM_IMAGES, IMAGE_SIZE, seed=1)
    for key in ("annotations", "detection_train", "detection_val", "scenes"):
        assert _bytes(data[key]) == _bytes(again[key])
    images = os.listdir(data["images"])
    assert set(images) == {f"{i}.jpg" for i in range(1, NUM_IMAGES + 1)}
    assert all(_bytes(os.path.join(data["images"], n)) == _bytes(os.path.join(again["images"], n)) for n in images)
    assert _bytes(data["annotations"]) != _bytes(other["annotations"])
    assert any(_bytes(os.path.join(data["images"], n)) != _bytes(os.path.join(other["images"], n)) for n in images)


def test_existing_data_is_kept_and_other_parameters_replace_it(tmp_path):
    paths = generate(str(tmp_path), 8, 64, seed=3)
    stamp = os.stat(paths["annotations"]).st_mtime_ns
    assert generate(str(tmp_path), 8, 64, seed=3) == paths
    assert os.stat(paths["annotations"]).st_mtime_ns == stamp
    generate(str(tmp_path), 6, 64, seed=3)
    assert set(os.listdir(paths["images"])) == {f"{i}.jpg" for i in range(1, 7)}
    assert _load(paths["manifest"])["num_images"] == 6


def test_every_expression_picks_out_its_referent_and_needs_its_words(data):
    scenes = _load(data["scenes"])
    expressions = 0
    for scene in scenes["images"]:
        objects, frame = scene["objects"], (scene["width"], scene["height"])
        for index, obj in enumerate(objects):
            for ref in obj.get("refs", []):
                expressions += 1
                assert resolve(ref, objects, *frame) == [index], ref
                # Minimal: without any one of its size, colour or position words it is ambiguous.
                words = ref.split()
                for k, word in enumerate(words):
                    if word in CATEGORIES or resolve(word, objects, *frame) == list(range(len(objects))):
                        continue
                    shorter = " ".join(words[:k] + words[k + 1:])
                    assert resolve(shorter, objects, *frame) != [index], (ref, shorter)
    assert expressions >= NUM_IMAGES


def test_position_words_only_where_attributes_do_not_suffice(data):
    positional = {"left", "leftmost", "right", "rightmost", "top", "topmost", "upper", "bottom", "lowest", "lower"}
    kinds = set()
    for scene in _load(data["scenes"])["images"]:
        for obj in scene["objects"]:
            uses = {bool(positional & set(ref.split())) for ref in obj.get("refs", [])}
            assert len(uses) <= 1, obj["refs"]  # all of an object's expressions name its position, or none
            kinds |= uses
    assert kinds == {True, False}


def test_resolve_positions_need_a_clear_margin():
    def obj(category, colour, x):
        return {"category": category, "colour": colour, "size": "small", "bbox": [x, 10.0, 10.0, 10.0]}

    objects = [obj("circle", "red", 10.0), obj("circle", "blue", 60.0), obj("square", "red", 63.0)]
    assert resolve("the leftmost circle", objects, 100, 100) == [0]
    assert resolve("the circle on the right", objects, 100, 100) == [1]
    assert resolve("red one", objects, 100, 100) == [0, 2]
    assert resolve("the rightmost object", objects, 100, 100) == [0, 1, 2]  # 3 px apart: no clear winner
    assert resolve("big circle", objects, 100, 100) == []


def test_resolve_positions_agree_with_the_part_of_the_image():
    def obj(x, y):
        return {"category": "circle", "colour": "red", "size": "small", "bbox": [x, y, 10.0, 10.0]}

    # Both circles right of the middle: the left one of them is not "on the left" of the image.
    right_pair = [obj(50.0, 10.0), obj(80.0, 10.0)]
    assert resolve("the leftmost circle", right_pair, 100, 100) == [0, 1]
    assert resolve("the rightmost circle", right_pair, 100, 100) == [1]
    # Two circles in the top part: "at the top" names neither, even with a clear margin.
    top_pair = [obj(10.0, 0.0), obj(60.0, 25.0), obj(30.0, 80.0)]
    assert resolve("the circle at the top", top_pair, 100, 100) == [0, 1, 2]
    assert resolve("the lowest circle", top_pair, 100, 100) == [2]
    # The part of the image is measured along its own side: a centre at x = 35 is in the left part
    # of an image 100 px wide, not of one 70 px wide (however tall).
    pair = [obj(30.0, 0.0), obj(55.0, 0.0)]
    assert resolve("the leftmost circle", pair, 100, 200) == [0]
    assert resolve("the leftmost circle", pair, 70, 200) == [0, 1]


def test_splits_are_disjoint_by_image_and_testA_testB_split_by_category(data):
    anns = load_annotations(data["annotations"], "synthetic")
    assert set(anns) == {"train", "val", "testA", "testB"}
    images = {split: {e["iid"] for e in entries} for split, entries in anns.items()}
    assert all(images.values())
    splits = list(images)
    for i, a in enumerate(splits):
        for b in splits[i + 1:]:
            assert not images[a] & images[b], (a, b)
    assert set().union(*images.values()) == set(range(1, NUM_IMAGES + 1))
    circle_ids = {i + 1 for i, (_, shape) in enumerate(DETECTION_CATEGORIES) if shape in TEST_A_CATEGORIES}
    assert all(e["cat_id"] in circle_ids for e in anns["testA"])
    assert all(e["cat_id"] not in circle_ids for e in anns["testB"])
    assert all(1 <= len(e["refs"]) <= 3 and len(set(e["refs"])) == len(e["refs"]) for e in anns["train"])
    for split in ("val", "testA", "testB"):
        assert all(len(e["refs"]) == 1 for e in anns[split])
    # Evaluation splits hold one entry per expression: several entries may share an object.
    assert len({e["mask_id"] for e in anns["val"]}) <= len(anns["val"])


def test_detection_files_match_the_rec_file_and_the_images(data):
    anns = load_annotations(data["annotations"], "synthetic")
    train, val = _load(data["detection_train"]), _load(data["detection_val"])
    names = [c["name"] for c in sorted(train["categories"], key=lambda c: c["id"])]
    assert names == [f"{colour} {shape}" for colour, shape in DETECTION_CATEGORIES]
    assert len(names) == len(CATEGORIES) * 4
    scenes = {s["iid"]: s for s in _load(data["scenes"])["images"]}
    objects = {o["id"]: o for s in scenes.values() for o in s["objects"]}
    assert {im["id"] for im in train["images"]} == set(range(1, NUM_IMAGES + 1))
    assert {im["id"] for im in val["images"]} == {e["iid"] for e in anns["val"]}
    for image in train["images"]:
        assert re.fullmatch(r"\d+\.jpg", image["file_name"])
        pixels = cv2.imread(os.path.join(data["images"], image["file_name"]))
        assert pixels.shape[:2] == (image["height"], image["width"])
    by_id = {a["id"]: a for a in train["annotations"]}
    assert len(by_id) == len(train["annotations"])
    sizes = {im["id"]: (im["width"], im["height"]) for im in train["images"]}
    for a in train["annotations"]:
        x, y, w, h = a["bbox"]
        assert a["iscrowd"] == 0 and a["area"] == pytest.approx(w * h)
        assert x >= 0 and y >= 0 and x + w <= sizes[a["image_id"]][0] and y + h <= sizes[a["image_id"]][1]
    for entries in anns.values():
        for e in entries:
            a = by_id[e["mask_id"]]
            assert (a["image_id"], a["bbox"], a["category_id"]) == (e["iid"], e["bbox"], e["cat_id"])
            obj = objects[e["mask_id"]]
            assert names[a["category_id"] - 1] == f"{obj['colour']} {obj['category']}"
    val_ids = {a["id"] for a in val["annotations"]}
    assert val_ids == {a["id"] for a in train["annotations"] if a["image_id"] in {e["iid"] for e in anns["val"]}}


def test_expression_kind_names_the_words_that_pick_the_referent():
    assert expression_kind("the circle") == "category"
    assert expression_kind("the big green one") == "colour+size"
    assert expression_kind("blue square on the left") == "colour+position"
    assert expression_kind("the lowest small triangle") == "position+size"
    assert expression_kind("Little RED circle") == "colour+size"


def test_eval_images_fix_the_size_of_each_evaluation_split(tmp_path):
    paths = generate(str(tmp_path), 9, 64, seed=3, eval_images=2)
    assert [s["split"] for s in _load(paths["scenes"])["images"]] == \
        ["train"] * 3 + ["val"] * 2 + ["testA"] * 2 + ["testB"] * 2
    assert _load(paths["manifest"])["eval_images"] == 2
    with pytest.raises(ValueError, match="9 images cannot hold 3 for each of val, testA and testB"):
        generate(str(tmp_path / "small"), 9, 64, seed=3, eval_images=3)
