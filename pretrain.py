"""Pretrain the frozen detector (YOLOv3 with guided-anchor heads) on COCO-format detection data.

    python pretrain.py --config config/synthetic.yaml [--resume] [KEY=VALUE ...]
    torchrun --nproc_per_node=8 pretrain.py --config config/refcoco.yaml

The reference ships its detector only as a weight file (``yolov3_coco.pth``,
made from COCO without the images of RefCOCO/+/g's val and test splits); this
script makes one. It trains on DET_ANN_PATH minus every image that appears in
any split other than ``train`` of the REC annotation files DET_EXCLUDE_ANNS (an
REC ``iid`` is the detection file's image id, as for COCO), and minus the
DET_VAL_ANN_PATH images when both files share one image folder. It then
measures mAP@0.5 on DET_VAL_ANN_PATH, prints ``mAP@0.5: XX.X`` and writes
DET_OUTPUT with exactly the keys of the reference's weight file, ready to be
used as PRETRAIN_WEIGHT. Checkpoints (``last.pth``, for ``--resume``), the
metrics JSON, the log and TensorBoard events go to DET_LOG_PATH.

Images are letterboxed to INPUT_SHAPE as for REC training (docs/method.md),
optionally flipped horizontally (DET_FLIP); detection category ids, sorted,
become class indices 0..CLASS_NUM-1.

The loss (:func:`detection_loss`), YOLOv3 adapted to guided anchors:

- Assignment: each ground-truth box goes to the one prior of the nine
  (ANCHORS, split over the heads by ANCH_MASK) whose shape (width, height,
  centres aligned) overlaps it best; that fixes the head, and the cell holding
  the box centre. The box is a positive for that prior's slot and for the
  head's anchor-free slot (slot 3) in that cell: two positives per box.
- Anchor shape: L1 between the predicted log-shape (``shape_pred``) of each
  positive and ``log(box size / slot base size)`` (the prior, or 4 x stride
  for the anchor-free slot), as guided anchoring trains its shape branch.
- Box: binary cross-entropy between the centre-offset logits and the box
  centre's position inside its cell, and L1 between the log-size outputs and
  ``log(box size / predicted anchor size)``, the anchor size detached so that
  the box branch refines the shape branch instead of pulling it.
- Objectness: binary cross-entropy, 1 at positives, 0 elsewhere, except that
  predictions whose decoded box overlaps a ground-truth box of their image
  with IoU above DET_IGNORE_IOU are left out (neither pushed up nor down).
- Classes: binary cross-entropy on the one-hot class at positives.

Each term is summed and divided by the number of positives in the batch, and
the class term weighted by DET_CLS_WEIGHT; the objectness biases start at
logit(0.01) so that the many empty cells do not swamp the first steps.
Evaluation: score = objectness x class probability, ``torchvision.ops.batched_nms``
at IoU 0.5 per class, up to 100 boxes per image, then VOC-style all-point AP at
IoU 0.5 per class, averaged over classes.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from typing import Iterable, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torch.utils.tensorboard import SummaryWriter
from torchvision.ops import batched_nms, box_iou
from tqdm import tqdm

from datasets import DataError, letterbox_image, letterbox_to_original, load_annotations
from models.detector import YOLOv3
from models.reference_keys import detector_weight_file_state_dict
from utils import distributed as dist_utils
from utils.checkpoint import load_checkpoint, restore_training_state, rng_state, save_atomic
from utils.cli import run_main
from utils.config import Config, ConfigError, load_config
from utils.ema import ModelEMA
from utils.engine import autocast, check_finite, optimize
from utils.logger import setup_logger

log = logging.getLogger("rec")

CHECKPOINT_FORMAT = "detector-pretrain-v1"
_OBJECTNESS_PRIOR = 0.01
_GRAD_CLIP = 10.0
_NMS_IOU = 0.5
_SCORE_MIN = 0.001
_MAX_DETECTIONS = 100
_AP_IOU = 0.5
_LR_END = 0.02  # the cosine decay ends at this share of DET_LR


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (e.g. config/synthetic.yaml)")
    parser.add_argument("--resume", action="store_true", help="continue from DET_LOG_PATH/last.pth")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: CUDA when present)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    return parser


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

    An item: ``image`` [3,S,S] (normalised), ``boxes`` [N,4] x1,y1,x2,y2 in
    letterboxed pixels, ``labels`` [N] class indices, ``info`` [7] (h, w, nh,
    nw, dx, dy, image id) for mapping boxes back. Crowd and empty boxes are left out.
    """

    def __init__(self, ann_path: str, image_dir: str, cfg: Config, exclude: Iterable[int] = (),
                 flip: bool = False):
        if not os.path.isfile(ann_path):
            raise DataError(f"detection annotation file not found: {ann_path} (DET_ANN_PATH / DET_VAL_ANN_PATH)")
        with open(ann_path) as f:
            coco = json.load(f)
        self.image_dir = image_dir
        self.size = cfg.INPUT_SHAPE[0]
        self.mean = np.asarray(cfg.MEAN, dtype=np.float32)
        self.std = np.asarray(cfg.STD, dtype=np.float32)
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

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        iid = self.image_ids[index]
        path = os.path.join(self.image_dir, self.file_names[iid])
        image = cv2.imread(path)
        if image is None:
            raise DataError(f"cannot read image {path} (DET_IMAGE_PATH / DET_VAL_IMAGE_PATH)")
        square, (h, w, nh, nw, dx, dy) = letterbox_image(cv2.cvtColor(image, cv2.COLOR_BGR2RGB), self.size)
        boxes, labels = self.gt(iid)
        boxes = boxes.float()
        boxes[:, 0::2] = boxes[:, 0::2] * (nw / w) + dx
        boxes[:, 1::2] = boxes[:, 1::2] * (nh / h) + dy
        if self.flip and torch.rand(()) < 0.5:
            square = square[:, ::-1]
            boxes[:, 0::2] = self.size - boxes[:, [2, 0]]
        pixels = (square.astype(np.float32) / 255.0 - self.mean) / self.std
        return {"image": torch.from_numpy(pixels.transpose(2, 0, 1).copy()), "boxes": boxes, "labels": labels,
                "info": torch.tensor([h, w, nh, nw, dx, dy, iid], dtype=torch.float64)}


def collate(samples: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Images stacked; targets as one ``[M,6]`` tensor of (sample index, class, x1, y1, x2, y2)."""
    targets = [torch.cat([torch.full((len(s["labels"]), 1), float(i)), s["labels"][:, None].float(), s["boxes"]], 1)
               for i, s in enumerate(samples)]
    return {"image": torch.stack([s["image"] for s in samples]), "targets": torch.cat(targets),
            "info": torch.stack([s["info"] for s in samples])}


def build_datasets(cfg: Config) -> tuple[DetectionDataset, DetectionDataset]:
    """The training set (with the exclusions of the module docstring) and the validation set."""
    val_dir = cfg.DET_VAL_IMAGE_PATH or cfg.DET_IMAGE_PATH
    val_set = DetectionDataset(cfg.DET_VAL_ANN_PATH, val_dir, cfg)
    exclude = excluded_image_ids(cfg.DET_EXCLUDE_ANNS)
    if os.path.abspath(val_dir) == os.path.abspath(cfg.DET_IMAGE_PATH):
        exclude |= set(val_set.image_ids)
    train_set = DetectionDataset(cfg.DET_ANN_PATH, cfg.DET_IMAGE_PATH, cfg, exclude, flip=cfg.DET_FLIP)
    for name, dataset in (("DET_ANN_PATH", train_set), ("DET_VAL_ANN_PATH", val_set)):
        if len(dataset.category_ids) != cfg.CLASS_NUM:
            raise ConfigError(f"{name} has {len(dataset.category_ids)} categories but CLASS_NUM is "
                              f"{cfg.CLASS_NUM}; set CLASS_NUM: {len(dataset.category_ids)}")
    if train_set.category_ids != val_set.category_ids:
        raise DataError("DET_ANN_PATH and DET_VAL_ANN_PATH have different category ids")
    if not len(train_set):
        raise DataError(f"no training images left in {cfg.DET_ANN_PATH} after the exclusions")
    return train_set, val_set


def build_detector(cfg: Config) -> YOLOv3:
    """A fresh detector of the config's shape: objectness biases at logit(0.01), class biases at
    logit(1 / CLASS_NUM), and the offsets of the deformable convolutions near zero (guided
    anchoring's initialisation), so that they start as plain 3x3 convolutions instead of sampling
    at random places, cells away on the coarse grids."""
    model = YOLOv3(cfg.CLASS_NUM, cfg.ANCHORS, cfg.ANCH_MASK, cfg.VIS_WIDTH, cfg.SPP_KERNELS, cfg.VIS_MIN_CHANNELS)
    with torch.no_grad():
        for head in model.heads:
            torch.nn.init.normal_(head.adaption.offset.weight, std=0.01)
            torch.nn.init.zeros_(head.adaption.offset.bias)
            bias = head.pred.bias.view(-1, head.num_outputs)
            bias[:, 4] = math.log(_OBJECTNESS_PRIOR / (1 - _OBJECTNESS_PRIOR))
            bias[:, 5:] = -math.log(max(cfg.CLASS_NUM - 1, 1))
    return model


def _shape_iou(wh: torch.Tensor, priors: torch.Tensor) -> torch.Tensor:
    """IoU of boxes ``[M,2]`` and priors ``[P,2]`` with centres aligned: ``[M,P]``."""
    inter = torch.min(wh[:, None], priors[None]).prod(-1)
    return inter / (wh.prod(-1)[:, None] + priors.prod(-1)[None] - inter)


def _xyxy(cxcywh: torch.Tensor) -> torch.Tensor:
    return torch.cat([cxcywh[..., :2] - cxcywh[..., 2:4] / 2, cxcywh[..., :2] + cxcywh[..., 2:4] / 2], -1)


def detection_loss(model: YOLOv3, raw: Sequence[tuple[torch.Tensor, torch.Tensor]], targets: torch.Tensor,
                   ignore_iou: float = 0.5, cls_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """The loss of the module docstring. ``raw``: each head's ``(shape_pred, out)`` from
    ``GuidedAnchorHead.raw``; ``targets`` ``[M,6]`` as :func:`collate` makes them. Returns the
    total ``loss`` (the class term weighted by ``cls_weight``) and its unweighted parts ``shape``,
    ``box``, ``obj``, ``cls``."""
    heads = model.heads
    targets = targets.to(raw[0][1].device, torch.float32)
    gt_xyxy = targets[:, 2:6]
    gt_wh = (gt_xyxy[:, 2:] - gt_xyxy[:, :2]).clamp(min=1.0)
    gt_c = (gt_xyxy[:, :2] + gt_xyxy[:, 2:]) / 2
    priors = torch.cat([head.anchor_wh[:3] for head in heads]).to(gt_wh)
    best = _shape_iou(gt_wh, priors).argmax(1) if len(targets) else torch.zeros(0, dtype=torch.long)
    best_head, best_prior = best // 3, best % 3

    zero = raw[0][1].sum() * 0.0
    sums = {"shape": zero, "box": zero, "obj": zero, "cls": zero}
    num_pos = 0
    for h, (head, (shape_pred, out)) in enumerate(zip(heads, raw)):
        shape_pred, out = shape_pred.float(), out.float()
        b, ny, nx = out.shape[:3]
        mine = (best_head == h).nonzero().squeeze(1)
        # Each box is a positive twice: at its prior's slot and at the anchor-free slot.
        gt_idx = mine.repeat(2)
        slot = torch.cat([best_prior[mine], torch.full_like(mine, 3)])
        img = targets[gt_idx, 0].long()
        gx = (gt_c[gt_idx, 0] / head.stride).clamp(0, nx - 1e-4)
        gy = (gt_c[gt_idx, 1] / head.stride).clamp(0, ny - 1e-4)
        gi, gj = gx.long(), gy.long()
        num_pos += len(gt_idx)

        base = head.anchor_wh.to(gt_wh)[slot]
        shape = shape_pred[img, gj, gi, slot]
        sums["shape"] = sums["shape"] + F.l1_loss(shape, torch.log(gt_wh[gt_idx] / base), reduction="sum")
        pos = out[img, gj, gi, slot]
        anchor = shape.detach().exp() * base
        offsets = torch.stack([gx - gi, gy - gj], 1)
        sums["box"] = sums["box"] + F.binary_cross_entropy_with_logits(pos[:, :2], offsets, reduction="sum") \
            + F.l1_loss(pos[:, 2:4], torch.log(gt_wh[gt_idx] / anchor), reduction="sum")
        one_hot = F.one_hot(targets[gt_idx, 1].long(), out.shape[-1] - 5).float()
        sums["cls"] = sums["cls"] + F.binary_cross_entropy_with_logits(pos[:, 5:], one_hot, reduction="sum")

        obj_target = torch.zeros(out.shape[:4], device=out.device)
        weight = torch.ones_like(obj_target)
        with torch.no_grad():
            decoded = _xyxy(head.decode(shape_pred, out).view(b, ny, nx, 4, -1)[..., :4])
            for k in range(b):
                gts = gt_xyxy[targets[:, 0] == k]
                if len(gts):
                    overlap = box_iou(decoded[k].reshape(-1, 4), gts).amax(1).view(ny, nx, 4)
                    weight[k][overlap > ignore_iou] = 0.0
        obj_target[img, gj, gi, slot] = 1.0
        weight[img, gj, gi, slot] = 1.0
        sums["obj"] = sums["obj"] + F.binary_cross_entropy_with_logits(out[..., 4], obj_target, weight,
                                                                       reduction="sum")
    parts = {k: v / max(num_pos, 1) for k, v in sums.items()}
    parts["loss"] = parts["shape"] + parts["box"] + parts["obj"] + cls_weight * parts["cls"]
    return parts


@torch.no_grad()
def detect(model: YOLOv3, images: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per image: boxes ``[K,4]`` (x1, y1, x2, y2, letterboxed pixels), scores ``[K]``, labels ``[K]``
    after per-class NMS."""
    _, outputs = model(images)
    boxes = torch.cat([o.flatten(1, 2) for o in outputs], 1).float()  # [B, N, 5 + C]
    results = []
    for pred in boxes:
        scores = pred[:, 4:5] * pred[:, 5:]
        idx, labels = (scores > _SCORE_MIN).nonzero(as_tuple=True)
        xyxy, score = _xyxy(pred[idx, :4]), scores[idx, labels]
        keep = batched_nms(xyxy, score, labels, _NMS_IOU)[:_MAX_DETECTIONS]
        results.append((xyxy[keep], score[keep], labels[keep]))
    return results


def average_precision(detections: list[tuple[int, float, torch.Tensor]],
                      ground_truth: dict[int, torch.Tensor], iou_threshold: float = _AP_IOU) -> float:
    """All-point interpolated AP of one class: ``detections`` (image id, score, box), ``ground_truth``
    image id -> boxes ``[N,4]``. Each ground-truth box matches at most one detection."""
    total = sum(len(b) for b in ground_truth.values())
    if total == 0:
        return float("nan")
    matched = {iid: torch.zeros(len(b), dtype=torch.bool) for iid, b in ground_truth.items()}
    hits = []
    for iid, _, box in sorted(detections, key=lambda d: -d[1]):
        gts = ground_truth.get(iid)
        hit = False
        if gts is not None and len(gts):
            ious = box_iou(box[None].double(), gts.double())[0]
            ious[matched[iid]] = -1.0
            best = int(ious.argmax())
            if ious[best] >= iou_threshold:
                matched[iid][best] = hit = True
        hits.append(hit)
    tp = np.cumsum(hits, dtype=np.float64)
    recall = np.concatenate([[0.0], tp / total, [1.0]])
    precision = np.concatenate([[1.0], tp / np.arange(1, len(hits) + 1), [0.0]])
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    changes = np.nonzero(recall[1:] != recall[:-1])[0]
    return float(np.sum((recall[changes + 1] - recall[changes]) * precision[changes + 1]))


@torch.no_grad()
def evaluate_map(model: YOLOv3, dataset: DetectionDataset, device: torch.device, batch_size: int,
                 amp: str = "none", num_workers: int = 0) -> dict:
    """mAP@0.5 over the classes that have ground truth in ``dataset`` (boxes mapped back to original pixels)."""
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate)
    num_classes = len(dataset.category_ids)
    detections: list[list] = [[] for _ in range(num_classes)]
    for batch in tqdm(loader, desc="mAP", leave=False, disable=not dist_utils.is_main()):
        with autocast(device, amp):
            results = detect(model, batch["image"].to(device))
        for info, (boxes, scores, labels) in zip(batch["info"], results):
            original = letterbox_to_original(boxes.cpu().double(), info[None].expand(len(boxes), 7))
            for box, score, label in zip(original, scores.tolist(), labels.tolist()):
                detections[label].append((int(info[6]), score, box))
    ground_truth = {iid: dataset.gt(iid) for iid in dataset.image_ids}
    per_class = {}
    for c, cid in enumerate(dataset.category_ids):
        truth = {iid: boxes[labels == c] for iid, (boxes, labels) in ground_truth.items()}
        per_class[cid] = average_precision(detections[c], truth)
    valid = [ap for ap in per_class.values() if not math.isnan(ap)]
    # What the REC model uses of the detector: boxes and objectness, whatever the class.
    agnostic = average_precision([d for per_label in detections for d in per_label],
                                 {iid: boxes for iid, (boxes, _) in ground_truth.items()})
    return {"mAP@0.5": float(np.mean(valid)) if valid else 0.0, "AP@0.5_per_category": per_class,
            "AP@0.5_class_agnostic": agnostic, "images": len(dataset)}


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up from 1 % over ``warmup`` steps, then cosine decay to ``_LR_END``."""
    if step < warmup:
        return 0.01 + 0.99 * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return _LR_END + 0.5 * (1 - _LR_END) * (1 + math.cos(math.pi * progress))


def build_optimizer(model: YOLOv3, cfg: Config) -> torch.optim.Optimizer:
    # Weight decay on convolution kernels only: decaying BatchNorm scales and biases only hurts.
    decay = [p for p in model.parameters() if p.ndim > 1]
    other = [p for p in model.parameters() if p.ndim <= 1]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.DET_WEIGHT_DECAY},
                              {"params": other, "weight_decay": 0.0}], lr=cfg.DET_LR)


def main(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    device = dist_utils.local_device(args.device)
    distributed = dist_utils.init_distributed(device, cfg.DIST_BACKEND)
    is_main = dist_utils.is_main()
    setup_logger(cfg.DET_LOG_PATH, "pretrain", is_main)
    torch.manual_seed(cfg.SEED + dist_utils.rank())
    if is_main:
        os.makedirs(cfg.DET_LOG_PATH, exist_ok=True)
        cfg.dump(os.path.join(cfg.DET_LOG_PATH, "config.yaml"))

    train_set, val_set = build_datasets(cfg)
    log.info("detector pretraining on %d images of %s (%d left out), mAP on %d images of %s",
             len(train_set), cfg.DET_ANN_PATH, train_set.num_excluded,
             len(val_set), cfg.DET_VAL_ANN_PATH)
    world = dist_utils.world_size()
    if cfg.DET_BATCH_SIZE % world:
        raise ConfigError(f"DET_BATCH_SIZE {cfg.DET_BATCH_SIZE} is not divisible by the {world} processes")
    per_rank = cfg.DET_BATCH_SIZE // world
    sampler = (DistributedSampler(train_set, shuffle=True, seed=cfg.SEED, drop_last=True) if distributed
               else None)
    generator = torch.Generator()
    loader = DataLoader(train_set, batch_size=per_rank, shuffle=sampler is None, sampler=sampler, drop_last=True,
                        num_workers=cfg.NUM_WORKER, persistent_workers=cfg.NUM_WORKER > 0, collate_fn=collate,
                        generator=generator, pin_memory=device.type == "cuda")
    if len(loader) == 0:
        raise ConfigError(f"{len(train_set)} training images are too few for one batch of {per_rank} per "
                          "process; lower DET_BATCH_SIZE")

    model = build_detector(cfg).to(device)
    ema = ModelEMA(model, cfg.EMA_DECAY) if cfg.DET_EMA else None
    optimizer = build_optimizer(model, cfg)
    total_steps = cfg.DET_EPOCHS * len(loader)
    warmup = round(cfg.DET_WARMUP * len(loader))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, warmup))
    scaler = torch.amp.GradScaler(device.type) if cfg.AMP == "fp16" else None

    last_path = os.path.join(cfg.DET_LOG_PATH, "last.pth")
    start_epoch, step = 0, 0
    if args.resume:
        ckpt = load_checkpoint(last_path, "checkpoint to resume")
        if ckpt.get("format") != CHECKPOINT_FORMAT:
            raise ConfigError(f"{last_path} is not a detector pretraining checkpoint")
        restore_training_state(ckpt, last_path, model, ema, optimizer, scheduler, scaler)
        start_epoch, step = ckpt["epoch"], ckpt["step"]
        log.info("resumed from %s: epoch %d, step %d", last_path, start_epoch, step)

    train_model = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None) \
        if distributed else model
    writer = SummaryWriter(os.path.join(cfg.DET_LOG_PATH, "tensorboard")) if is_main else None
    start = time.perf_counter()
    try:
        for epoch in range(start_epoch, cfg.DET_EPOCHS):
            # The order of an epoch depends on (seed, epoch) only, so that a resumed run sees the
            # batches an uninterrupted one would (flips too, with NUM_WORKER 0: the RNG is restored).
            generator.manual_seed(cfg.SEED + 1000 * epoch + dist_utils.rank())
            if sampler is not None:
                sampler.set_epoch(epoch)
            train_model.train()
            progress = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.DET_EPOCHS}", disable=not is_main,
                            dynamic_ncols=True, leave=False)
            for batch in progress:
                images = batch["image"].to(device, non_blocking=True)
                with autocast(device, cfg.AMP):
                    _, raw = train_model(images, decode=False)
                parts = detection_loss(model, raw, batch["targets"], cfg.DET_IGNORE_IOU, cfg.DET_CLS_WEIGHT)
                optimize(parts["loss"], optimizer, scheduler, scaler, _GRAD_CLIP, ema, model)
                step += 1
                if step % cfg.PRINT_FREQ == 0 or step == total_steps:
                    values = check_finite({k: v.detach() for k, v in parts.items()}, step)
                    progress.set_postfix(loss=f"{values['loss']:.3f}")
                    if writer is not None:
                        for key, value in {**values, "lr": optimizer.param_groups[0]["lr"]}.items():
                            writer.add_scalar(f"pretrain/{key}", value, step)
                    log.info("epoch %d step %d: %s", epoch + 1, step,
                             ", ".join(f"{k} {v:.4f}" for k, v in values.items()))
            progress.close()
            if is_main:
                save_atomic({"format": CHECKPOINT_FORMAT, "epoch": epoch + 1, "step": step,
                             "model": model.state_dict(), "ema": ema.state_dict() if ema is not None else None,
                             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                             "scaler": scaler.state_dict() if scaler is not None else None,
                             "rng": rng_state(), "config": cfg.to_dict()}, last_path)
            dist_utils.barrier()
        train_seconds = time.perf_counter() - start
        final = ema.module if ema is not None else model
        if is_main:
            result = evaluate_map(final, val_set, device, per_rank, cfg.AMP)
            save_atomic(detector_weight_file_state_dict(final), cfg.DET_OUTPUT)
            result.update(step=step, train_images=len(train_set), train_seconds=train_seconds,
                          weights=cfg.DET_OUTPUT)
            with open(os.path.join(cfg.DET_LOG_PATH, "metrics.json"), "w") as f:
                json.dump(result, f, indent=1)
            if writer is not None:
                writer.add_scalar("pretrain/val_mAP@0.5", 100 * result["mAP@0.5"], step)  # percent, as printed
            log.info("wrote %s (step %d, %.0f s of training)", cfg.DET_OUTPUT, step, train_seconds)
            print(f"mAP@0.5: {100 * result['mAP@0.5']:.1f}")
        dist_utils.barrier()
    finally:
        if writer is not None:
            writer.close()
        dist_utils.cleanup()
    return 0


if __name__ == "__main__":
    run_main(main, get_args_parser())
