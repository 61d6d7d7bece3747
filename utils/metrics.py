"""The detector's metric: mAP@0.5 (VOC-style all-point AP per class, averaged over classes).

Detections: score = objectness x class probability, kept above DET_SCORE_MIN, per-class
``torchvision.ops.batched_nms`` at DET_NMS_IOU, up to DET_MAX_DETECTIONS per image. Under DDP each
process detects its own shard of the images (``ShardSampler``: every image exactly once) and the
detections are gathered before the AP is computed.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torchvision.ops import batched_nms, box_iou
from tqdm import tqdm

from datasets import build_loader, letterbox_to_original, normalize_images
from datasets.detection import DetectionDataset, collate_detections
from models.detection_loss import cxcywh_to_xyxy
from models.detector import YOLOv3

from . import distributed as dist_utils
from .engine import autocast

Detection = tuple[int, float, torch.Tensor]  # image id, score, box [4] in original pixels


@torch.no_grad()
def detect(model: YOLOv3, images: torch.Tensor, score_min: float, nms_iou: float,
           max_detections: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per image: boxes ``[K,4]`` (x1, y1, x2, y2, letterboxed pixels), scores ``[K]``, labels ``[K]``
    after per-class NMS."""
    _, outputs = model(images)
    boxes = torch.cat([o.flatten(1, 2) for o in outputs], 1).float()  # [B, N, 5 + C]
    results = []
    for pred in boxes:
        scores = pred[:, 4:5] * pred[:, 5:]
        idx, labels = (scores > score_min).nonzero(as_tuple=True)
        xyxy, score = cxcywh_to_xyxy(pred[idx, :4]), scores[idx, labels]
        keep = batched_nms(xyxy, score, labels, nms_iou)[:max_detections]
        results.append((xyxy[keep], score[keep], labels[keep]))
    return results


def average_precision(detections: list[Detection], ground_truth: dict[int, torch.Tensor],
                      iou_threshold: float = 0.5) -> float:
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
def evaluate_map(model: YOLOv3, dataset: DetectionDataset, cfg, device: torch.device,
                 distributed: bool = False) -> dict:
    """mAP@0.5 over the classes that have ground truth in ``dataset`` (boxes mapped back to original
    pixels), the class-agnostic AP, and the per-category APs; the same on every process."""
    model.eval()
    loader = build_loader(cfg, dataset, train=False, batch_size=cfg.DET_BATCH_SIZE, distributed=distributed,
                          collate_fn=collate_detections)
    detections: list[Detection] = []
    labels_of: list[int] = []
    for batch in tqdm(loader, desc="mAP", leave=False, disable=not dist_utils.is_main()):
        images = normalize_images(batch["image"].to(device), cfg.MEAN, cfg.STD)
        with autocast(device, cfg.AMP):
            results = detect(model, images, cfg.DET_SCORE_MIN, cfg.DET_NMS_IOU,
                             cfg.DET_MAX_DETECTIONS)
        for info, (boxes, scores, labels) in zip(batch["info"], results):
            original = letterbox_to_original(boxes.cpu().double(), info[None].expand(len(boxes), 7))
            for box, score, label in zip(original, scores.tolist(), labels.tolist()):
                detections.append((int(info[6]), score, box))
                labels_of.append(label)
    gathered = dist_utils.all_gather_objects(list(zip(detections, labels_of)))
    per_label: list[list[Detection]] = [[] for _ in dataset.category_ids]
    for shard in gathered:
        for detection, label in shard:
            per_label[label].append(detection)
    ground_truth = {iid: dataset.gt(iid) for iid in dataset.image_ids}
    per_class = {}
    for c, cid in enumerate(dataset.category_ids):
        truth = {iid: boxes[labels == c] for iid, (boxes, labels) in ground_truth.items()}
        per_class[cid] = average_precision(per_label[c], truth, cfg.DET_AP_IOU)
    valid = [ap for ap in per_class.values() if not math.isnan(ap)]
    # What the REC model uses of the detector: boxes and objectness, whatever the class.
    agnostic = average_precision([d for label in per_label for d in label],
                                 {iid: boxes for iid, (boxes, _) in ground_truth.items()}, cfg.DET_AP_IOU)
    return {"mAP@0.5": float(np.mean(valid)) if valid else 0.0, "AP@0.5_per_category": per_class,
            "AP@0.5_class_agnostic": agnostic, "images": len(dataset)}
