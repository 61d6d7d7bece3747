"""A synthetic referring-expression dataset, generated from a seed, for CPU demos and tests.

Without RefCOCO, COCO images or the reference's detector weights nothing of
the method can be seen working; this module draws a small stand-in: images
of 2-6 coloured shapes (circle, square, triangle; red, green, blue, yellow;
small, medium, big) on a lightly textured background, with several objects of
one category in each image so that an expression needs colour, size or
position to pick its referent ("the small red circle", "blue square on the
left", "the rightmost triangle", "the big green one").

Expressions come from a template grammar and are checked by
:func:`resolve`, a parser of that grammar: an expression is kept only if it
picks out exactly its referent and is minimal (dropping its size, colour or
position word would make it ambiguous); the category noun is always allowed.
Each referent gets up to three different expressions. A position word holds
both ways it can be read: "the circle on the left" is the leftmost circle,
clearly, and the only circle in the left part of the image. An object is
described by where it is only when nothing of what it is (colour, size,
category) singles it out: with image-level supervision alone, position words
are the hardest to learn (an image that holds the circle on the left almost
always holds another circle elsewhere, so images do not differ by them), and
a dataset of mostly positional expressions teaches the model next to nothing.

Layout under ``root`` (``python -m datasets.synthetic --out DIR``)::

    images/<iid>.jpg                   JPEG, quality 95
    anns/synthetic.json                {split: [entry]} in the SimREC/RefCLIP format
    detection/instances_train.json     COCO detection format: every image
    detection/instances_val.json       COCO detection format: the images of split 'val'
    scenes.json                        every object with its category, colour, size and box
    manifest.json                      the generation parameters (written last)

and, with ``--probe-images N`` (``generate(..., probe_images=N)``), the probe splits::

    images/<iid>.jpg                   the probe images, iids after the main ones
    anns/probe.json                    {"position": [entry], "size": [entry]}, the same format
    probe_scenes.json                  the probe images' objects, as scenes.json
    probe_manifest.json                N and the data's manifest (written last)

Splits: ``val``, ``testA``, ``testB`` (10 % of the images each, or
``--eval-images`` each), ``train`` the rest; no image shared between splits.
As RefCOCO's testA holds images with several people and only people as
referents and testB the other objects, testA's images hold
several circles and only circles are referred to; testB's hold several squares
or triangles and only those are referred to. Training entries hold all
expressions of one object; evaluation entries one expression each.

Detection categories are coloured shapes ("red circle", ..., 12 of them): a
detector pre-trained on shapes alone has no reason to keep colour in its
features, and the weakly supervised model can only ground words in what the
frozen features hold (README.md, Configuration, has the figures). The REC
entries' ``cat_id`` is the same category, as in RefCOCO.

The detection files mirror COCO: ``instances_train.json`` holds every image,
as COCO train2014 holds the RefCOCO images of every split, and
``pretrain.py`` removes the REC val/test images from it (``DET_EXCLUDE_ANNS``);
``instances_val.json`` holds the val split, on which the detector's mAP is
measured. ``mask_id`` of a REC entry is the id of its object's annotation in
the detection files.

Probe splits measure the words the evaluation splits hold too few of to
measure (val: 15 position-only expressions, each 6.7 points of their
accuracy). ``position`` holds only expressions of kind (:func:`expression_kind`)
exactly "position" (the category noun or "one", "shape", "object" with a
position word: "the leftmost circle", "upper one"), ``size`` only expressions
of kind "size" ("the small square", "big one"), each chosen, worded and
checked (unambiguous, minimal) as the other splits' are, so that both measure
what val's rows of those kinds measure, on more expressions: an object is
described by position only when nothing of what it is singles it out. Each
probe image is a scene drawn as val's (all categories), redrawn until one of
its objects can be described that way (on average about 5 draws for position,
1 for size; at most 1000); up to three such objects are referents, with up to
three expressions each, one entry per expression. N images go to each split,
position first; the quickstart's data (seed 0, 2280 images, image_size 256)
needs N = 55 for 200 position expressions and 37 for 200 size ones, and the
quickstart makes N = ``PROBE_IMAGES`` = 80: 298 position and 405 size
expressions. Probe images and objects are in no detection file (the
detector never sees them) nor in any other file of the main data: adding,
changing or leaving out probes keeps every other file, manifest.json
included, byte for byte, so the figures and the detector made from them stay
valid. Regenerating the main data removes the probe files.
``python -m tools.diagnose_synthetic --split val,position,size`` evaluates
on them (:func:`checked_probe_annotations` finds the file, or says how to
make it).

The same ``(num_images, image_size, seed)`` give byte-identical files; each
image is drawn from its own generator seeded with ``(seed, iid)``, a probe
image from one seeded with ``(seed, iid, a probe tag)``.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import time
from typing import Any, Sequence

import cv2
import numpy as np

from .annotations import DataError

CATEGORIES = ("circle", "square", "triangle")
TEST_A_CATEGORIES = ("circle",)
COLOURS = {"red": (215, 40, 40), "green": (35, 160, 60), "blue": (40, 80, 215), "yellow": (225, 190, 30)}
# What the detector learns to find; category id = position + 1.
DETECTION_CATEGORIES = tuple((colour, shape) for shape in CATEGORIES for colour in COLOURS)
SIZES = {"small": 0.13, "medium": 0.19, "big": 0.26}  # object extent / the image's long side
EVAL_SPLITS = ("val", "testA", "testB")
ANN_NAME = "synthetic.json"
PROBE_SPLITS = ("position", "size")
PROBE_ANN_NAME = "probe.json"
# Probe images per probe split at which the quickstart's data (seed 0, 2280 images, image_size 256)
# holds at least 200 expressions in each.
PROBE_IMAGES = 80

_FORMAT_VERSION = 3
_JPEG_QUALITY = 95
_SIZE_JITTER = 0.07
_MAX_REFERENTS = 3
_MAX_EXPRESSIONS = 3
# An object is the leftmost (rightmost, ...) of its group only if its centre is clearly so,
# and "on the left" only if it is also the only one of them in the left part of the image.
_POSITION_MARGIN = 0.1
_POSITION_REGION = 0.45
# Mixed into a probe image's seed: its scene differs from that of a main image of the same iid,
# which it has when the data holds more images.
_PROBE_TAG = 0x70726F6265  # "probe"
# Scenes drawn per probe image until one holds a referent for the split (the module docstring
# gives the usual counts).
_PROBE_ATTEMPTS = 1000

_SIZE_WORDS = {"small": ("small", "little"), "medium": ("medium",), "big": ("big", "large")}
_GENERIC_NOUNS = ("one", "shape", "object")
_POSITION_WORDS = {
    "left": ("left", "leftmost"),
    "right": ("right", "rightmost"),
    "top": ("top", "topmost", "upper"),
    "bottom": ("bottom", "lowest", "lower"),
}
_POSITION_TEMPLATES = {
    "left": ("the {} on the left", "the leftmost {}", "left {}"),
    "right": ("the {} on the right", "the rightmost {}", "right {}"),
    "top": ("the {} at the top", "the topmost {}", "upper {}"),
    "bottom": ("the {} at the bottom", "the lowest {}", "bottom {}"),
}


def _word_table() -> dict[str, tuple[str, str]]:
    table = {}
    for category in CATEGORIES:
        table[category] = ("category", category)
    for colour in COLOURS:
        table[colour] = ("colour", colour)
    for size, words in _SIZE_WORDS.items():
        table.update({w: ("size", size) for w in words})
    for position, words in _POSITION_WORDS.items():
        table.update({w: ("position", position) for w in words})
    return table


_WORDS = _word_table()


def resolve(expression: str, objects: Sequence[dict], width: int, height: int) -> list[int]:
    """Indices of the objects ``expression`` can refer to: exactly one when it is unambiguous.

    Size, colour and category words filter the objects. A position word then
    keeps the one of them that is both in that part of the image (its centre
    in the outer ``_POSITION_REGION`` of the width or height) and the only one
    there, and clearly (by ``_POSITION_MARGIN`` of the long side) the leftmost,
    rightmost, topmost or lowest; when none is, every filtered object stays a
    candidate. The two readings of "the circle on the left" (left in the
    image, leftmost of the circles) so always agree. Objects are dicts with
    ``category``, ``colour``, ``size`` and ``bbox`` ([x, y, w, h]).
    """
    wanted: dict[str, str] = {}
    for word in re.findall(r"[a-z]+", expression.lower()):
        if word in _WORDS:
            kind, value = _WORDS[word]
            wanted[kind] = value
    position = wanted.pop("position", None)
    matches = [i for i, obj in enumerate(objects) if all(obj[k] == v for k, v in wanted.items())]
    if position is None or len(matches) < 2:
        return matches
    axis, sign = {"left": (0, 1), "right": (0, -1), "top": (1, 1), "bottom": (1, -1)}[position]
    extent = (width, height)[axis]
    # Signed so that smaller is further towards the named side; the side's region ends at 0.
    coords = sorted((sign * (objects[i]["bbox"][axis] + objects[i]["bbox"][axis + 2] / 2
                             - (_POSITION_REGION * extent if sign > 0 else (1 - _POSITION_REGION) * extent)), i)
                    for i in matches)
    (first, index), (second, _) = coords[0], coords[1]
    if first > 0 or second <= 0 or second - first < _POSITION_MARGIN * max(width, height):
        return matches
    return [index]


def expression_kind(expression: str) -> str:
    """Which kinds of words pick the referent: ``'colour'``, ``'colour+position'``, ...; ``'category'``
    for the category noun alone."""
    kinds = {_WORDS[w][0] for w in re.findall(r"[a-z]+", expression.lower()) if w in _WORDS} - {"category"}
    return "+".join(sorted(kinds)) or "category"


def _render(spec: dict, rng: np.random.Generator) -> str:
    """One wording of ``spec`` (category or None, size, colour, position; absent ones None)."""
    words = []
    if spec["size"]:
        words.append(str(rng.choice(_SIZE_WORDS[spec["size"]])))
    if spec["colour"]:
        words.append(spec["colour"])
    words.append(spec["category"] or str(rng.choice(_GENERIC_NOUNS)))
    phrase = " ".join(words)
    if spec["position"]:
        return str(rng.choice(_POSITION_TEMPLATES[spec["position"]])).format(phrase)
    return phrase if rng.random() < 0.4 else f"the {phrase}"


def _minimal_specs(index: int, objects: Sequence[dict], frame: tuple[int, int],
                   rng: np.random.Generator) -> list[dict]:
    """Every description of object ``index`` that is unambiguous and minimal."""
    obj = objects[index]
    specs = []
    for category, size, colour, position in itertools.product(
            (obj["category"], None), (obj["size"], None), (obj["colour"], None),
            (None, "left", "right", "top", "bottom")):
        spec = {"category": category, "size": size, "colour": colour, "position": position}
        if not _unique(spec, index, objects, frame, rng):
            continue
        droppable = [k for k in ("size", "colour", "position") if spec[k]]
        if any(_unique({**spec, k: None}, index, objects, frame, rng) for k in droppable):
            continue
        specs.append(spec)
    return specs


def _unique(spec: dict, index: int, objects: Sequence[dict], frame: tuple[int, int],
            rng: np.random.Generator) -> bool:
    if not (spec["category"] or spec["size"] or spec["colour"] or spec["position"]):
        return False
    return resolve(_render(spec, rng), objects, *frame) == [index]


def describe(index: int, objects: Sequence[dict], frame: tuple[int, int], rng: np.random.Generator) -> list[str]:
    """Up to three different expressions, each verified by :func:`resolve`, for object ``index``."""
    return _wordings(_descriptions(index, objects, frame, rng), index, objects, frame, rng)


def _descriptions(index: int, objects: Sequence[dict], frame: tuple[int, int], rng: np.random.Generator) -> list[dict]:
    """The minimal descriptions object ``index`` may be given."""
    specs = _minimal_specs(index, objects, frame, rng)
    # Where it is only when what it is does not single it out (the module docstring says why).
    by_attributes = [spec for spec in specs if spec["position"] is None]
    return by_attributes or specs


def _wordings(specs: Sequence[dict], index: int, objects: Sequence[dict], frame: tuple[int, int],
              rng: np.random.Generator) -> list[str]:
    """Up to ``_MAX_EXPRESSIONS`` different renderings of ``specs`` that pick out object ``index``."""
    order = rng.permutation(len(specs))
    expressions: list[str] = []
    # Different descriptions first, then other wordings of them.
    for _ in range(3):
        for k in order:
            text = _render(specs[k], rng)
            if text not in expressions and resolve(text, objects, *frame) == [index]:
                expressions.append(text)
            if len(expressions) == _MAX_EXPRESSIONS:
                return expressions
    return expressions


def _spec_kind(spec: dict) -> str:
    """:func:`expression_kind` of every rendering of ``spec``."""
    return "+".join(k for k in ("colour", "position", "size") if spec[k]) or "category"


def _split_of_images(num_images: int, eval_images: int | None) -> list[str]:
    if eval_images is None:
        eval_images = max(1, round(0.1 * num_images))
    train = num_images - len(EVAL_SPLITS) * eval_images
    if eval_images < 1 or train < 1:
        raise ValueError(f"{num_images} images cannot hold {eval_images} for each of val, testA and testB and "
                         "one or more for train: raise num_images or lower eval_images")
    return ["train"] * train + [name for name in EVAL_SPLITS for _ in range(eval_images)]


def _referable(category: str, split: str) -> bool:
    if split == "testA":
        return category in TEST_A_CATEGORIES
    if split == "testB":
        return category not in TEST_A_CATEGORIES
    return True


def _place(rng: np.random.Generator, extents: list[float], width: int, height: int) -> list[tuple[float, float]] | None:
    """Centres for objects of the given extents, inside the image and apart; None when they do not fit."""
    long_side = max(width, height)
    centres: list[tuple[float, float]] = []
    for extent in extents:
        for _ in range(200):
            half = extent / 2 + 2
            c = (float(rng.uniform(half, width - half)), float(rng.uniform(half, height - half)))
            if all(np.hypot(c[0] - o[0], c[1] - o[1]) >= max(0.55 * (extent + e) + 0.03 * long_side,
                                                               0.22 * long_side)
                   for o, e in zip(centres, extents)):
                centres.append(c)
                break
        else:
            return None
    return centres


def _sample_scene(rng: np.random.Generator, split: str, image_size: int) -> tuple[int, int, list[dict]]:
    width, height = [(image_size, image_size), (image_size, image_size * 3 // 4),
                     (image_size * 3 // 4, image_size)][int(rng.integers(3))]
    if split == "testA":
        focus = str(rng.choice(TEST_A_CATEGORIES))
    elif split == "testB":
        focus = str(rng.choice([c for c in CATEGORIES if c not in TEST_A_CATEGORIES]))
    else:
        focus = str(rng.choice(CATEGORIES))
    while True:
        count = int(rng.integers(2, 7))
        repeats = int(rng.integers(2, min(count, 3) + 1))  # distractors of the same category
        categories = [focus] * repeats + [str(rng.choice(CATEGORIES)) for _ in range(count - repeats)]
        sizes = [str(rng.choice(list(SIZES))) for _ in range(count)]
        extents = [SIZES[s] * image_size * (1 + rng.uniform(-_SIZE_JITTER, _SIZE_JITTER)) for s in sizes]
        centres = _place(rng, extents, width, height)
        if centres is not None:
            break
    objects = []
    for category, size, extent, (cx, cy) in zip(categories, sizes, extents, centres):
        w = round(extent)
        h = round(extent * np.sqrt(3) / 2) if category == "triangle" else w
        x, y = round(cx - w / 2), round(cy - h / 2)
        objects.append({"category": category, "colour": str(rng.choice(list(COLOURS))), "size": size,
                        "bbox": [float(x), float(y), float(w), float(h)]})
    return width, height, objects


def _draw(rng: np.random.Generator, width: int, height: int, objects: Sequence[dict]) -> np.ndarray:
    """An RGB image: a light background with a faint gradient and noise, the shapes filled on it."""
    base = rng.uniform(195, 245, size=3)
    ramp = np.linspace(-1, 1, width)[None, :, None] * rng.uniform(-12, 12, size=3)
    image = base + ramp + rng.normal(0, 3, size=(height, width, 3))
    image = np.clip(image, 0, 255).astype(np.uint8)
    for obj in objects:
        x, y, w, h = (int(v) for v in obj["bbox"])
        colour = tuple(int(np.clip(c + rng.integers(-15, 16), 0, 255)) for c in COLOURS[obj["colour"]])
        if obj["category"] == "circle":
            cv2.ellipse(image, (x + w // 2, y + h // 2), (w // 2, h // 2), 0, 0, 360, colour, -1, cv2.LINE_AA)
        elif obj["category"] == "square":
            cv2.rectangle(image, (x, y), (x + w - 1, y + h - 1), colour, -1)
        else:
            points = np.array([[x + w // 2, y], [x, y + h - 1], [x + w - 1, y + h - 1]], dtype=np.int32)
            cv2.fillPoly(image, [points], colour, cv2.LINE_AA)
    return image


def _make_image(seed: int, iid: int, split: str, image_size: int) -> tuple[dict, np.ndarray]:
    """One image's scene (objects, referents and their expressions) and pixels."""
    rng = np.random.default_rng([seed, iid])
    while True:
        width, height, objects = _sample_scene(rng, split, image_size)
        described = [(i, describe(i, objects, (width, height), rng)) for i in range(len(objects))
                     if _referable(objects[i]["category"], split)]
        described = [(i, refs) for i, refs in described if refs]
        if described:
            break
    return _finish_scene(rng, iid, split, width, height, objects, described)


def _make_probe_image(seed: int, iid: int, kind: str, image_size: int) -> tuple[dict, np.ndarray]:
    """One image of probe split ``kind``: a scene drawn as val's whose referents have unambiguous,
    minimal descriptions of exactly that kind, each referent described only by those."""
    rng = np.random.default_rng([seed, iid, _PROBE_TAG])
    for _ in range(_PROBE_ATTEMPTS):
        width, height, objects = _sample_scene(rng, "val", image_size)
        described = []
        for i in range(len(objects)):
            specs = [spec for spec in _descriptions(i, objects, (width, height), rng) if _spec_kind(spec) == kind]
            refs = _wordings(specs, i, objects, (width, height), rng)
            if refs:
                described.append((i, refs))
        if described:
            return _finish_scene(rng, iid, kind, width, height, objects, described)
    raise RuntimeError(f"no object of {_PROBE_ATTEMPTS} scenes of probe image {iid} can be described by {kind} "
                       f"words alone at image_size {image_size}: raise image_size")


def _finish_scene(rng: np.random.Generator, iid: int, split: str, width: int, height: int, objects: list[dict],
                  described: list[tuple[int, list[str]]]) -> tuple[dict, np.ndarray]:
    """The scene with up to ``_MAX_REFERENTS`` of the ``described`` objects as referents, and its pixels."""
    chosen = sorted(rng.permutation(len(described))[:_MAX_REFERENTS].tolist())
    for i, refs in (described[k] for k in chosen):
        objects[i]["refs"] = refs
    scene = {"iid": iid, "split": split, "width": width, "height": height, "objects": objects}
    return scene, _draw(rng, width, height, objects)


def _manifest(num_images: int, image_size: int, seed: int, eval_images: int | None) -> dict:
    return {"generator": "datasets.synthetic", "version": _FORMAT_VERSION, "num_images": num_images,
            "image_size": image_size, "seed": seed, "eval_images": eval_images}


def _probe_manifest(probe_images: int, data: dict) -> dict:
    # The data's own manifest inside: probes made for other data are stale.
    return {"generator": "datasets.synthetic", "version": _FORMAT_VERSION, "probe_images": probe_images,
            "data": data}


def _paths(root: str) -> dict[str, str]:
    return {
        "root": root,
        "images": os.path.join(root, "images"),
        "annotations": os.path.join(root, "anns", ANN_NAME),
        "detection_train": os.path.join(root, "detection", "instances_train.json"),
        "detection_val": os.path.join(root, "detection", "instances_val.json"),
        "scenes": os.path.join(root, "scenes.json"),
        "manifest": os.path.join(root, "manifest.json"),
        "probe_annotations": os.path.join(root, "anns", PROBE_ANN_NAME),
        "probe_scenes": os.path.join(root, "probe_scenes.json"),
        "probe_manifest": os.path.join(root, "probe_manifest.json"),
    }


def _write_json(path: str, obj: Any) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, separators=(",", ":"))
    os.replace(tmp, path)


def _read_json(path: str) -> Any:
    """The file's contents; None when it is missing or unreadable."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def _write_image(folder: str, iid: int, image: np.ndarray) -> None:
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, _JPEG_QUALITY])
    if not ok:
        raise RuntimeError(f"JPEG encoding of synthetic image {iid} failed")
    with open(os.path.join(folder, f"{iid}.jpg"), "wb") as f:
        f.write(data.tobytes())


def _remove_images(folder: str, after: int = 0) -> None:
    """Remove the generated images (``<iid>.jpg``) of iid above ``after``."""
    for name in os.listdir(folder):
        match = re.fullmatch(r"(\d+)\.jpg", name)
        if match and int(match.group(1)) > after:
            os.remove(os.path.join(folder, name))


def category_id(obj: dict) -> int:
    """The detection category (a coloured shape) of a scene object, as in the COCO files."""
    return DETECTION_CATEGORIES.index((obj["colour"], obj["category"])) + 1


def _coco(scenes: Sequence[dict]) -> dict:
    images, annotations = [], []
    for scene in scenes:
        images.append({"id": scene["iid"], "file_name": f"{scene['iid']}.jpg",
                       "width": scene["width"], "height": scene["height"]})
        for obj in scene["objects"]:
            x, y, w, h = obj["bbox"]
            annotations.append({"id": obj["id"], "image_id": scene["iid"], "bbox": obj["bbox"],
                                "category_id": category_id(obj), "area": w * h, "iscrowd": 0})
    categories = [{"id": i + 1, "name": f"{colour} {shape}", "supercategory": shape}
                  for i, (colour, shape) in enumerate(DETECTION_CATEGORIES)]
    return {"images": images, "annotations": annotations, "categories": categories}


def _rec(scenes: Sequence[dict], split_names: Sequence[str]) -> dict[str, list[dict]]:
    splits: dict[str, list[dict]] = {name: [] for name in split_names}
    for scene in scenes:
        for obj in scene["objects"]:
            if "refs" not in obj:
                continue
            entry = {"iid": scene["iid"], "bbox": obj["bbox"],
                     "cat_id": category_id(obj), "mask_id": obj["id"]}
            if scene["split"] == "train":
                splits["train"].append({**entry, "refs": list(obj["refs"])})
            else:
                splits[scene["split"]] += [{**entry, "refs": [ref]} for ref in obj["refs"]]
    return splits


def _scenes_file(image_size: int, scenes: list[dict]) -> dict:
    return {"image_size": image_size, "categories": list(CATEGORIES), "test_a_categories": list(TEST_A_CATEGORIES),
            "images": scenes}


def generate(root: str, num_images: int = 600, image_size: int = 256, seed: int = 0,
             eval_images: int | None = None, probe_images: int = 0) -> dict:
    """Write the dataset under ``root`` (see the module docstring) and return its paths.
    ``eval_images`` images go to each of val, testA and testB (default: 10 % of ``num_images``),
    the rest to train; ``probe_images`` (0: none) to each of the probe splits, position and size.

    Nothing is rewritten when ``root`` already holds the data of the same
    parameters; other parameters replace it (stale ``<iid>.jpg`` files and probe splits are removed).
    Probe splits are added to, or replaced in, data that is up to date without touching its files.
    """
    if image_size < 64:
        raise ValueError(f"image_size must be at least 64 pixels, got {image_size}")
    if probe_images < 0:
        raise ValueError(f"probe_images must be 0 (no probe splits) or more, got {probe_images}")
    paths = _paths(root)
    manifest = _manifest(num_images, image_size, seed, eval_images)
    if not _up_to_date(paths, manifest):
        _generate_data(paths, manifest)
    if probe_images:
        _generate_probes(paths, manifest, probe_images)
    return paths


def _generate_data(paths: dict[str, str], manifest: dict) -> None:
    os.makedirs(paths["images"], exist_ok=True)
    _remove_images(paths["images"])
    for key in ("manifest", "probe_manifest", "probe_annotations", "probe_scenes"):
        if os.path.exists(paths[key]):
            os.remove(paths[key])

    seed, image_size = manifest["seed"], manifest["image_size"]
    scenes, next_id = [], 1
    for iid, split in enumerate(_split_of_images(manifest["num_images"], manifest["eval_images"]), start=1):
        scene, image = _make_image(seed, iid, split, image_size)
        for obj in scene["objects"]:
            obj["id"], next_id = next_id, next_id + 1
        scenes.append(scene)
        _write_image(paths["images"], iid, image)

    _write_json(paths["annotations"], _rec(scenes, ("train", *EVAL_SPLITS)))
    _write_json(paths["detection_train"], _coco(scenes))
    _write_json(paths["detection_val"], _coco([s for s in scenes if s["split"] == "val"]))
    _write_json(paths["scenes"], _scenes_file(image_size, scenes))
    _write_json(paths["manifest"], manifest)


def _generate_probes(paths: dict[str, str], manifest: dict, probe_images: int) -> None:
    """The probe splits of the data ``manifest`` describes, unless they are there; its files stay as they are."""
    probe_manifest = _probe_manifest(probe_images, manifest)
    num_images, seed, image_size = manifest["num_images"], manifest["seed"], manifest["image_size"]
    probe_iids = range(num_images + 1, num_images + 1 + len(PROBE_SPLITS) * probe_images)
    if _read_json(paths["probe_manifest"]) == probe_manifest and all(
            os.path.isfile(paths[k]) for k in ("probe_annotations", "probe_scenes")) and all(
            os.path.isfile(os.path.join(paths["images"], f"{iid}.jpg")) for iid in probe_iids):
        return
    if os.path.exists(paths["probe_manifest"]):
        os.remove(paths["probe_manifest"])
    _remove_images(paths["images"], after=num_images)

    next_id = 1 + max(obj["id"] for scene in _read_json(paths["scenes"])["images"] for obj in scene["objects"])
    scenes = []
    for iid in probe_iids:
        kind = PROBE_SPLITS[(iid - num_images - 1) // probe_images]
        scene, image = _make_probe_image(seed, iid, kind, image_size)
        for obj in scene["objects"]:
            obj["id"], next_id = next_id, next_id + 1
        scenes.append(scene)
        _write_image(paths["images"], iid, image)

    _write_json(paths["probe_annotations"], _rec(scenes, PROBE_SPLITS))
    _write_json(paths["probe_scenes"], _scenes_file(image_size, scenes))
    _write_json(paths["probe_manifest"], probe_manifest)


def _up_to_date(paths: dict[str, str], manifest: dict) -> bool:
    if _read_json(paths["manifest"]) != manifest:
        return False
    files = [paths[k] for k in ("annotations", "detection_train", "detection_val", "scenes")]
    images = [os.path.join(paths["images"], f"{iid}.jpg") for iid in range(1, manifest["num_images"] + 1)]
    return all(os.path.isfile(p) for p in files + images)


def _generation_command(root: str, manifest: dict, probe_images: int) -> str:
    """The command line that makes (or keeps) the data of ``manifest`` under ``root`` with ``probe_images``
    probe images per probe split."""
    command = (f"python -m datasets.synthetic --out {root} --num-images {manifest['num_images']} "
               f"--image-size {manifest['image_size']} --seed {manifest['seed']}")
    if manifest["eval_images"] is not None:
        command += f" --eval-images {manifest['eval_images']}"
    return command + f" --probe-images {probe_images}"


def probe_annotation_path(ann_path: str) -> str:
    """The probe splits' annotation file of the data whose annotation file is ``ann_path``."""
    return os.path.join(os.path.dirname(ann_path), PROBE_ANN_NAME)


def checked_probe_annotations(ann_path: str) -> str:
    """:func:`probe_annotation_path` of ``ann_path``, once its probe splits are known to be made for
    the data there; otherwise a DataError that gives the command making them."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(ann_path)))
    paths = _paths(root)
    manifest = _read_json(paths["manifest"])
    if manifest is None:
        raise DataError(f"{paths['manifest']} not found: the probe splits (position, size) are made with the "
                        f"synthetic data, by python -m datasets.synthetic --out {root} --probe-images "
                        f"{PROBE_IMAGES} and the data's other options")
    probes = _read_json(paths["probe_manifest"]) or {}
    command = _generation_command(root, manifest, probes.get("probe_images", PROBE_IMAGES))
    if not probes or not os.path.isfile(paths["probe_annotations"]):
        raise DataError(f"the data in {root} has no probe splits (position, size): add them with {command} "
                        "(the data's own files stay as they are)")
    if probes.get("data") != manifest:
        raise DataError(f"the probe splits in {root} were made for other data: make them again with {command}")
    return paths["probe_annotations"]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Generate the synthetic referring-expression dataset.")
    parser.add_argument("--out", required=True, help="output folder (e.g. data/synthetic)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-images", type=int, default=600)
    parser.add_argument("--eval-images", type=int, default=None,
                        help="images in each of val, testA and testB (default: 10 %% of --num-images)")
    parser.add_argument("--image-size", type=int, default=256, help="long side of the images, pixels")
    parser.add_argument("--probe-images", type=int, default=0,
                        help="images in each of the probe splits 'position' and 'size' (anns/probe.json), whose "
                             "expressions use only position, or only size, words; 0: none. Added to existing data "
                             "of the same other options without changing its files. The quickstart uses "
                             f"{PROBE_IMAGES}: at least 200 expressions per split")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    paths = generate(args.out, args.num_images, args.image_size, args.seed, args.eval_images, args.probe_images)
    counts = {}
    for key in ("annotations", "probe_annotations") if args.probe_images else ("annotations",):
        counts.update({split: len(entries) for split, entries in _read_json(paths[key]).items()})
    print(f"synthetic data in {paths['root']} ({time.perf_counter() - start:.1f} s): "
          + ", ".join(f"{split} {n} entries" for split, n in counts.items()))


if __name__ == "__main__":
    main()
