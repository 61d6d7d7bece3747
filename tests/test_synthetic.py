"""The synthetic dataset: determinism, unambiguous expressions, splits, and COCO/REC consistency."""
import json
import os
import re

import cv2
import pytest

from datasets import DataError, load_annotations
from datasets.synthetic import (CATEGORIES, DETECTION_CATEGORIES, PROBE_SPLITS, TEST_A_CATEGORIES,
                                checked_probe_annotations, expression_kind, generate, resolve)
from tools.diagnose_synthetic import split_dataset
from utils.config import load_config

NUM_IMAGES, IMAGE_SIZE = 12, 96
# The probe splits' tests: data of their own, 10 images per probe split.
PROBED_IMAGES, PROBES = 30, 10
MAIN_FILES = ("annotations", "detection_train", "detection_val", "scenes", "manifest")


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


def _check_expressions(scenes) -> int:
    """Every expression of ``scenes`` picks out its referent and needs each of its words; their count."""
    expressions = 0
    for scene in scenes:
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
    return expressions


def test_every_expression_picks_out_its_referent_and_needs_its_words(data):
    assert _check_expressions(_load(data["scenes"])["images"]) >= NUM_IMAGES


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


@pytest.fixture(scope="module")
def probed(tmp_path_factory):
    return generate(str(tmp_path_factory.mktemp("probed")), PROBED_IMAGES, IMAGE_SIZE, seed=0, probe_images=PROBES)


def _tree(root):
    """{relative path: (bytes, mtime_ns)} of every file under ``root``."""
    files = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            files[os.path.relpath(path, root)] = (_bytes(path), os.stat(path).st_mtime_ns)
    return files


def test_probes_leave_every_main_file_as_it_is_made_without_them(probed, tmp_path):
    plain = generate(str(tmp_path), PROBED_IMAGES, IMAGE_SIZE, seed=0)
    before = _tree(tmp_path)
    assert not any(os.path.exists(plain[k]) for k in ("probe_annotations", "probe_scenes", "probe_manifest"))
    main_images = [f"{i}.jpg" for i in range(1, PROBED_IMAGES + 1)]
    assert set(os.listdir(plain["images"])) == set(main_images)
    for key in MAIN_FILES:
        assert _bytes(probed[key]) == _bytes(plain[key]), key
    for name in main_images:
        assert _bytes(os.path.join(probed["images"], name)) == _bytes(os.path.join(plain["images"], name))

    # Added to existing data: its files are not even rewritten, and the probes are those made with it.
    generate(str(tmp_path), PROBED_IMAGES, IMAGE_SIZE, seed=0, probe_images=PROBES)
    after = _tree(tmp_path)
    assert {path: after[path] for path in before} == before
    for key in ("probe_annotations", "probe_scenes", "probe_manifest"):
        assert _bytes(probed[key]) == _bytes(plain[key]), key
    added = sorted(set(after) - set(before))
    assert added == sorted(["anns/probe.json", "probe_scenes.json", "probe_manifest.json"]
                           + [f"images/{i}.jpg" for i in range(PROBED_IMAGES + 1, PROBED_IMAGES + 1 + 2 * PROBES)])


def test_probe_splits_hold_only_expressions_of_their_kind_each_naming_its_referent(probed):
    anns = load_annotations(probed["probe_annotations"], "synthetic")
    assert tuple(anns) == PROBE_SPLITS == ("position", "size")
    scenes = _load(probed["probe_scenes"])["images"]
    by_iid = {scene["iid"]: scene for scene in scenes}
    first = PROBED_IMAGES + 1
    assert [scene["iid"] for scene in scenes] == list(range(first, first + 2 * PROBES))
    for k, split in enumerate(PROBE_SPLITS):
        iids = set(range(first + k * PROBES, first + (k + 1) * PROBES))
        assert {e["iid"] for e in anns[split]} == iids  # every probe image holds a referent
        assert {by_iid[iid]["split"] for iid in iids} == {split}
        for e in anns[split]:
            assert len(e["refs"]) == 1 and expression_kind(e["refs"][0]) == split, e
            scene = by_iid[e["iid"]]
            index = next(i for i, obj in enumerate(scene["objects"]) if obj["id"] == e["mask_id"])
            assert resolve(e["refs"][0], scene["objects"], scene["width"], scene["height"]) == [index]
            assert e["bbox"] == scene["objects"][index]["bbox"]
        assert all(len(obj.get("refs", [])) <= 3 for scene in scenes for obj in scene["objects"])
        assert all(sum("refs" in obj for obj in scene["objects"]) <= 3 for scene in scenes)
    assert _check_expressions(scenes) == sum(len(entries) for entries in anns.values())
    # Object ids continue the main data's, which keeps its own.
    main_ids = [obj["id"] for scene in _load(probed["scenes"])["images"] for obj in scene["objects"]]
    probe_ids = [obj["id"] for scene in scenes for obj in scene["objects"]]
    assert probe_ids == list(range(max(main_ids) + 1, max(main_ids) + 1 + len(probe_ids)))


def test_probe_images_are_in_no_detection_file(probed):
    probe_iids = {scene["iid"] for scene in _load(probed["probe_scenes"])["images"]}
    probe_ids = {obj["id"] for scene in _load(probed["probe_scenes"])["images"] for obj in scene["objects"]}
    for key in ("detection_train", "detection_val"):
        coco = _load(probed[key])
        assert not probe_iids & {im["id"] for im in coco["images"]}
        assert not probe_iids & {a["image_id"] for a in coco["annotations"]}
        assert not probe_ids & {a["id"] for a in coco["annotations"]}
    assert {im["id"] for im in _load(probed["detection_train"])["images"]} == set(range(1, PROBED_IMAGES + 1))


def test_generating_probes_again_is_a_no_op_and_another_count_replaces_them(probed, tmp_path):
    before = _tree(probed["root"])
    assert generate(probed["root"], PROBED_IMAGES, IMAGE_SIZE, seed=0, probe_images=PROBES) == probed
    assert _tree(probed["root"]) == before
    assert generate(probed["root"], PROBED_IMAGES, IMAGE_SIZE, seed=0) == probed  # 0: the probes stay
    assert _tree(probed["root"]) == before

    paths = generate(str(tmp_path), 8, 64, seed=3, probe_images=3)
    main = {key: _bytes(paths[key]) for key in MAIN_FILES}
    generate(str(tmp_path), 8, 64, seed=3, probe_images=2)
    assert set(os.listdir(paths["images"])) == {f"{i}.jpg" for i in range(1, 13)}
    assert _load(paths["probe_manifest"])["probe_images"] == 2
    assert {key: _bytes(paths[key]) for key in MAIN_FILES} == main
    # Other data: the probes made for the old one go with it.
    generate(str(tmp_path), 7, 64, seed=3)
    assert set(os.listdir(paths["images"])) == {f"{i}.jpg" for i in range(1, 8)}
    assert not any(os.path.exists(paths[k]) for k in ("probe_annotations", "probe_scenes", "probe_manifest"))
    with pytest.raises(ValueError, match="probe_images must be 0"):
        generate(str(tmp_path), 7, 64, seed=3, probe_images=-1)


def test_asking_for_missing_or_stale_probes_says_how_to_make_them(probed, tmp_path):
    assert checked_probe_annotations(probed["annotations"]) == probed["probe_annotations"]
    plain = generate(str(tmp_path / "plain"), 8, 64, seed=3, eval_images=1)
    with pytest.raises(DataError, match=re.escape(
            f"has no probe splits (position, size): add them with python -m datasets.synthetic --out "
            f"{tmp_path / 'plain'} --num-images 8 --image-size 64 --seed 3 --eval-images 1 --probe-images 80")):
        checked_probe_annotations(plain["annotations"])
    generate(str(tmp_path / "plain"), 8, 64, seed=3, eval_images=1, probe_images=2)
    probe_manifest = _load(plain["probe_manifest"])
    probe_manifest["data"]["seed"] = 4
    with open(plain["probe_manifest"], "w") as f:
        json.dump(probe_manifest, f)
    with pytest.raises(DataError, match="were made for other data: make them again with .* --probe-images 2"):
        checked_probe_annotations(plain["annotations"])
    with pytest.raises(DataError, match="manifest.json not found"):
        checked_probe_annotations(str(tmp_path / "elsewhere" / "anns" / "synthetic.json"))


def test_probe_splits_are_read_with_the_data_s_vocabulary(probed):
    cfg = load_config("config/synthetic/quickstart.yaml", [
        f"ANN_PATH={{synthetic: {probed['annotations']}}}", f"IMAGE_PATH={{synthetic: {probed['images']}}}"])
    val, position = split_dataset(cfg, "val"), split_dataset(cfg, "position")
    assert position.vocab == val.vocab and position.max_token_seen == val.max_token_seen
    assert len(position) == len(_load(probed["probe_annotations"])["position"])
    assert len(split_dataset(cfg, "position+size")) == sum(map(len, _load(probed["probe_annotations"]).values()))
    with pytest.raises(DataError, match=r"joins probe splits .* give them comma-separated instead "
                                        r"\(--split val,position\)"):
        split_dataset(cfg, "val+position")
