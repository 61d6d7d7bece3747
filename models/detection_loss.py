"""The detector's training loss: YOLOv3's, adapted to guided anchors (``pretrain.py`` trains with it).

- Assignment: each ground-truth box goes to the one prior of the nine (ANCHORS, split over the heads
  by ANCH_MASK) whose shape (width, height, centres aligned) overlaps it best; that fixes the head,
  and the cell holding the box centre. The box is a positive for that prior's slot and for the
  head's anchor-free slot (slot 3) in that cell: two positives per box.
- Anchor shape: L1 between the predicted log-shape (``shape_pred``) of each positive and
  ``log(box size / slot base size)`` (the prior, or 4 x stride for the anchor-free slot), as guided
  anchoring trains its shape branch.
- Box: binary cross-entropy between the centre-offset logits and the box centre's position inside
  its cell, and L1 between the log-size outputs and ``log(box size / predicted anchor size)``, the
  anchor size detached so that the box branch refines the shape branch instead of pulling it.
- Objectness: binary cross-entropy, 1 at positives, 0 elsewhere, except that predictions whose
  decoded box overlaps a ground-truth box of their image with IoU above ``ignore_iou`` are left out
  (neither pushed up nor down).
- Classes: binary cross-entropy on the one-hot class at positives.

Each term is summed and divided by the number of positives in the batch, and the class term
weighted by ``cls_weight``. Everything is computed for the whole batch at once: the ignore test
compares every prediction with its image's boxes padded to the batch's largest count.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .detector import YOLOv3


def _shape_iou(wh: torch.Tensor, priors: torch.Tensor) -> torch.Tensor:
    """IoU of boxes ``[M,2]`` and priors ``[P,2]`` with centres aligned: ``[M,P]``."""
    inter = torch.min(wh[:, None], priors[None]).prod(-1)
    return inter / (wh.prod(-1)[:, None] + priors.prod(-1)[None] - inter)


def cxcywh_to_xyxy(cxcywh: torch.Tensor) -> torch.Tensor:
    """``[..., 4+]`` cx, cy, w, h -> ``[..., 4]`` x1, y1, x2, y2."""
    return torch.cat([cxcywh[..., :2] - cxcywh[..., 2:4] / 2, cxcywh[..., :2] + cxcywh[..., 2:4] / 2], -1)


def _batched_iou(boxes: torch.Tensor, gts: torch.Tensor) -> torch.Tensor:
    """``torchvision.ops.box_iou`` per image: boxes ``[B,N,4]``, gts ``[B,G,4]`` -> ``[B,N,G]``."""
    area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    gt_area = (gts[..., 2] - gts[..., 0]) * (gts[..., 3] - gts[..., 1])
    lt = torch.max(boxes[:, :, None, :2], gts[:, None, :, :2])
    rb = torch.min(boxes[:, :, None, 2:], gts[:, None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area[:, :, None] + gt_area[:, None, :] - inter)


def _boxes_per_image(targets: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ground-truth boxes padded per image: ``[B,G,4]`` x1, y1, x2, y2 and a validity mask ``[B,G]``,
    G the largest count of the batch."""
    image = targets[:, 0].long()
    counts = torch.bincount(image, minlength=batch)
    width = int(counts.max()) if len(targets) else 0
    order = torch.argsort(image, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(len(targets), device=targets.device) - starts[image[order]]
    padded = targets.new_zeros(batch, width, 4)
    valid = torch.zeros(batch, width, dtype=torch.bool, device=targets.device)
    padded[image[order], slot] = targets[order, 2:6]
    valid[image[order], slot] = True
    return padded, valid


def detection_loss(model: YOLOv3, raw: Sequence[tuple[torch.Tensor, torch.Tensor]], targets: torch.Tensor,
                   ignore_iou: float = 0.5, cls_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """The loss of the module docstring. ``raw``: each head's ``(shape_pred, out)`` from
    ``GuidedAnchorHead.raw``; ``targets`` ``[M,6]`` (image index in the batch, class, x1, y1, x2, y2
    in letterboxed pixels), as ``datasets.detection.collate_detections`` makes them. Returns the
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
    padded_gts, valid_gts = _boxes_per_image(targets, raw[0][1].shape[0])

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
        if padded_gts.shape[1]:
            with torch.no_grad():
                decoded = cxcywh_to_xyxy(head.decode(shape_pred, out)[..., :4]).view(b, -1, 4)
                overlap = _batched_iou(decoded, padded_gts).masked_fill(~valid_gts[:, None], 0.0).amax(2)
                weight[overlap.view(b, ny, nx, -1) > ignore_iou] = 0.0
        obj_target[img, gj, gi, slot] = 1.0
        weight[img, gj, gi, slot] = 1.0
        sums["obj"] = sums["obj"] + F.binary_cross_entropy_with_logits(out[..., 4], obj_target, weight,
                                                                       reduction="sum")
    parts = {k: v / max(num_pos, 1) for k, v in sums.items()}
    parts["loss"] = parts["shape"] + parts["box"] + parts["obj"] + cls_weight * parts["cls"]
    return parts
