"""Pseudo-labels: a trained model's boxes for the training set, written as the annotation file with
the training boxes replaced (``test.py --export-pseudo-labels``, RefCLIP's "universal teacher" step).

A training entry is one referent with all of its expressions (PSEUDO_LABEL_EXPRESSIONS 'all'; 'first':
its first expression alone). Its box comes from:

- a model that ranks anchors (the weak models): each candidate's similarities to the entry's
  expressions are summed (:func:`utils.evaluation.entry_votes`). With PSEUDO_LABEL_ASSIGNMENT
  'independent' the best candidate is the label; with 'joint' the entries of one image are solved
  together (:func:`assign_image`), so that two referents of an image do not get the same box while
  another is available. With POSITION_WORDS 'lexicon', an entry whose expressions say where it is
  has its plausible candidates ordered by position first (:mod:`models.position_words`);
- a model that regresses its box (the student, APL's head answering): each expression's answer, the
  label being the answer that agrees most with the others' (:func:`agreement_labels`).

Each label's margin (:data:`MARGIN_FIELD`) says how decided the choice was, for the student to keep or
weight the labels by (PSEUDO_LABEL_KEEP, PSEUDO_LABEL_WEIGHTING; only the order of the margins
matters there). A vote's margin (:func:`vote_margins`) is the label's summed vote minus the best vote
of a box that differs from it, in the vote's units; ``None`` in the file where every candidate is the
label's box. A regressor's (:func:`agreement_labels`) sums the confidence of the expressions whose
answer is the label and subtracts that of the others.
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torch.utils.data import DataLoader
from torchvision.ops import box_iou
from tqdm import tqdm

from datasets import DataError, EntryExpressions, FirstExpression, RefDataset, clip_to_image, load_annotations
from datasets.pseudo_labels import MARGIN_FIELD
from datasets.tokens import tokenize
from models.box_head import aligned_iou
from models.detector_cache import DetectorCache
from models.position_words import MERGE_IOU, direction, reorder

from . import distributed as dist_utils
from .config import Config, ConfigError
from .distributed import unwrap_model
from .engine import prepare_batch
from .evaluation import entry_votes, expression_answers, gt_xyxy, hits
from .paths import prepare_output_file


def vote_margins(votes: torch.Tensor, boxes: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """``[N]``: each entry's vote for its label, candidate ``chosen`` ``[N]``, minus the best vote of a
    candidate whose box overlaps the label's with IoU <= :data:`MERGE_IOU` (``votes`` ``[N,K]``,
    ``boxes`` ``[N,K,4]`` x1, y1, x2, y2); ``inf`` where no candidate differs from the label.
    Negative where the label is not the entry's own first choice (the joint assignment or the
    position words moved it)."""
    rows = torch.arange(votes.shape[0])
    label = boxes[rows, chosen]
    distinct = aligned_iou(boxes, label[:, None].expand_as(boxes)) <= MERGE_IOU
    rival = torch.where(distinct, votes, -torch.inf).amax(dim=1)
    return votes[rows, chosen] - rival


def assign_image(scores: np.ndarray, boxes: np.ndarray, towards: np.ndarray | None = None,
                 tolerance: np.ndarray | None = None) -> np.ndarray:
    """The candidate each of the ``n`` entries of one image gets, ``[n]``, from their scores ``[n,K]``
    (log-probabilities, so that entries compare) and the candidates' boxes ``[n,K,4]`` (x1, y1, x2,
    y2; the entries of one image share the detector's candidates, up to rounding).

    The image's candidate boxes are merged into distinct boxes, greedily as non-maximum suppression
    does: the best-scored box not yet merged takes every other unmerged box overlapping it with IoU
    > :data:`MERGE_IOU`. An entry's score for a merged box is its best score among the box's
    members. Where ``towards`` ``[n,2]`` gives an entry a direction (its position words), its scores
    of the merged boxes within ``tolerance`` ``[n]`` of its best are handed out again along it
    (:func:`models.position_words.reorder`; a merged box is where its best-scored member is). The
    assignment of distinct boxes to entries that maximises the summed score
    (``scipy.optimize.linear_sum_assignment``) gives each entry its box, and within it the entry's
    best member; where the image has more entries than distinct boxes, those left over take their
    own best."""
    n, k = scores.shape
    flat_scores, flat_boxes = scores.reshape(-1), torch.as_tensor(boxes.reshape(-1, 4), dtype=torch.float64)
    overlap = (box_iou(flat_boxes, flat_boxes) > MERGE_IOU).numpy()
    group = np.full(n * k, -1)
    leaders = []
    for leader in np.argsort(-flat_scores, kind="stable"):
        if group[leader] < 0:
            group[(group < 0) & overlap[leader]] = len(leaders)
            group[leader] = len(leaders)  # a box without area overlaps nothing, itself included
            leaders.append(leader)
    groups = len(leaders)
    best = np.full((n, groups), -np.inf)
    member = np.zeros((n, groups), dtype=np.int64)
    for flat in np.argsort(flat_scores, kind="stable"):  # ascending: each entry's best member written last
        entry, candidate = divmod(int(flat), k)
        best[entry, group[flat]] = flat_scores[flat]
        member[entry, group[flat]] = candidate
    if towards is not None:
        centres = (flat_boxes[leaders, :2] + flat_boxes[leaders, 2:]) / 2
        for entry in np.flatnonzero(np.any(towards != 0, axis=1)):
            best[entry] = reorder(torch.from_numpy(best[entry]), centres, torch.from_numpy(towards[entry]),
                                  float(tolerance[entry])).numpy()
    own_best = best.argmax(axis=1)
    finite = np.isfinite(best)
    # An entry with no candidate in a merged box must not get it: far below every real score.
    cost = np.where(finite, best, best[finite].min() - 1e6 * (1 + np.abs(best[finite]).max()))
    rows, cols = linear_sum_assignment(cost, maximize=True)
    assigned = own_best.copy()
    usable = finite[rows, cols]
    assigned[rows[usable]] = cols[usable]
    return member[np.arange(n), assigned]


def assign_jointly(iids: Sequence[int], scores: np.ndarray, boxes: np.ndarray, towards: np.ndarray | None = None,
                   tolerance: np.ndarray | None = None) -> np.ndarray:
    """:func:`assign_image` for every image: the candidate ``[N]`` of each of N entries, their image
    ids ``iids``, scores ``[N,K]``, candidate boxes ``[N,K,4]`` and optional directions ``[N,2]`` and
    tolerances ``[N]``; the entries of an image need not be next to each other."""
    by_image: dict[int, list[int]] = defaultdict(list)
    for index, iid in enumerate(iids):
        by_image[iid].append(index)
    chosen = np.zeros(len(iids), dtype=np.int64)
    for entries in by_image.values():
        chosen[entries] = assign_image(scores[entries], boxes[entries],
                                       None if towards is None else towards[entries],
                                       None if tolerance is None else tolerance[entries])
    return chosen


def agreement_labels(boxes: torch.Tensor, scores: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor,
                                                                                                 torch.Tensor]:
    """For a model that answers each expression with a box: which expression's answer is each
    entry's label, ``[N]``, and the label's margin ``[N]``, from the answers ``[N,E,4]`` (x1, y1, x2,
    y2), their confidences ``[N,E]`` (objectness, in [0, 1]) and how many of the E are the entry's
    own, ``counts`` ``[N]``.

    The label is the answer whose IoUs with the entry's other answers sum highest (the one most
    expressions agree with); among equals (one or two expressions) the most confident. The margin
    adds the confidence of each expression whose answer overlaps the label with IoU >
    :data:`MERGE_IOU` and subtracts the others': from -E to E, high where every expression confidently
    gives the same box."""
    n, e = scores.shape
    own = torch.arange(e)[None] < counts[:, None]  # [N, E]
    iou = aligned_iou(boxes[:, :, None], boxes[:, None, :])  # [N, E, E]
    others = own[:, :, None] & own[:, None, :] & ~torch.eye(e, dtype=torch.bool)
    agreement = torch.where(own, (iou * others).sum(dim=2), -torch.inf)
    candidates = agreement == agreement.amax(dim=1, keepdim=True)
    chosen = torch.where(candidates, scores, -torch.inf).argmax(dim=1)
    rows = torch.arange(n)
    support = (iou[rows, chosen] > MERGE_IOU) | (torch.arange(e)[None] == chosen[:, None])
    margins = torch.where(own, torch.where(support, scores, -scores), 0).sum(dim=1)
    return chosen, margins


@dataclass
class PseudoLabels:
    """One split's labels: ``boxes`` ``[N,4]`` x1, y1, x2, y2 (original pixels, clipped to the image),
    ``margins`` ``[N]`` (``inf``: no rival box), whether each overlaps the entry's box in the file
    with IoU > 0.5 (``agree``), and whether the joint assignment or the position words moved it off
    the entry's own first choice (``moved``)."""
    boxes: np.ndarray
    margins: np.ndarray
    agree: np.ndarray
    moved: np.ndarray


def check_export_config(model: nn.Module, cfg: Config) -> None:
    """Stop, before anything is spent, where the model cannot make labels as ``cfg`` asks."""
    if cfg.PSEUDO_LABEL_ASSIGNMENT == "joint" and not getattr(unwrap_model(model), "ranks_anchors", False):
        raise ConfigError("PSEUDO_LABEL_ASSIGNMENT: joint assigns the candidates an image's entries vote for, and "
                          "this model regresses one box per expression: set PSEUDO_LABEL_ASSIGNMENT=independent")


@torch.no_grad()
def pseudo_labels(model: nn.Module, dataset: RefDataset, cfg: Config, device: torch.device) -> PseudoLabels:
    """The labels of every entry of ``dataset``, decided as the module docstring says."""
    model.eval()
    every = cfg.PSEUDO_LABEL_EXPRESSIONS == "all"
    ranks = getattr(unwrap_model(model), "ranks_anchors", False)
    items = EntryExpressions(dataset) if every else FirstExpression(dataset)
    loader = DataLoader(items, batch_size=cfg.BATCH_SIZE, num_workers=cfg.NUM_WORKER)
    parts = defaultdict(list)
    # In file order the entries of an image are next to each other: the detector runs once per image.
    cache = DetectorCache(0)
    for batch in tqdm(loader, desc="pseudo-labels", disable=not dist_utils.is_main(), leave=False):
        batch = prepare_batch(model, batch, device, cfg.CHANNELS_LAST, cache, cfg.AMP, mean_std=(cfg.MEAN, cfg.STD))
        if not every:
            batch["count"] = torch.ones(len(batch["index"]), dtype=torch.int64, device=device)
        info = batch["info"]
        if ranks:
            votes = entry_votes(model, batch, cfg.AMP, device)
            b, k = votes.votes.shape
            candidates = clip_to_image(votes.boxes.reshape(b * k, 4), info.repeat_interleave(k, 0)).view(b, k, 4)
            parts["votes"].append(votes.votes.cpu())
            parts["log_probs"].append(votes.log_probs.cpu())
            parts["candidates"].append(candidates.cpu())
        else:
            boxes, scores = expression_answers(model, batch, cfg.AMP, device)
            b, e = scores.shape
            parts["answers"].append(clip_to_image(boxes.reshape(b * e, 4), info.repeat_interleave(e, 0))
                                    .view(b, e, 4).cpu())
            parts["scores"].append(scores.cpu())
            parts["counts"].append(batch["count"].cpu())
        parts["gt"].append(batch["gt_box"].cpu())
    part = {name: torch.cat(values) for name, values in parts.items()}
    rows = torch.arange(len(dataset))
    if ranks:
        first_choice = part["votes"].argmax(dim=1)
        chosen = first_choice
        scores, candidates = part["log_probs"].double().numpy(), part["candidates"].double().numpy()
        towards = tolerance = None
        if cfg.POSITION_WORDS == "lexicon":
            own = [entry["refs"] if every else entry["refs"][:1] for entry in dataset.entries]
            towards = np.array([direction(w for text in refs for w in tokenize(text)) for refs in own])
            tolerance = cfg.POSITION_TOLERANCE * np.array([len(refs) for refs in own], dtype=np.float64)
        if cfg.PSEUDO_LABEL_ASSIGNMENT == "joint":
            chosen = torch.from_numpy(assign_jointly([entry["iid"] for entry in dataset.entries], scores, candidates,
                                                     towards, tolerance))
        elif towards is not None:
            chosen = first_choice.clone()
            for e in np.flatnonzero(np.any(towards != 0, axis=1)):
                chosen[e] = int(assign_image(scores[e:e + 1], candidates[e:e + 1], towards[e:e + 1],
                                             tolerance[e:e + 1])[0])
        boxes = part["candidates"][rows, chosen]
        margins = vote_margins(part["votes"], part["candidates"], chosen)
        moved = (chosen != first_choice) & (aligned_iou(boxes, part["candidates"][rows, first_choice]) <= MERGE_IOU)
    else:
        chosen, margins = agreement_labels(part["answers"], part["scores"], part["counts"])
        boxes = part["answers"][rows, chosen]
        moved = torch.zeros(len(dataset), dtype=torch.bool)
    return PseudoLabels(boxes.double().numpy(), margins.double().numpy(), hits(boxes, part["gt"]).numpy(),
                        moved.numpy())


def pseudo_label_datasets(cfg: Config) -> list[RefDataset]:
    """One dataset per split of TRAIN_SPLIT; every entry must have its image, SKIP_BAD_IMAGES or not:
    a pseudo-label file holds the entries of the original file, each with its box predicted."""
    datasets = [RefDataset(cfg, split) for split in cfg.TRAIN_SPLIT.split("+")]
    for dataset in datasets:
        if dataset.skipped:
            name, path = dataset.skipped[0]
            raise DataError(f"{len(dataset.skipped)} entries of '{dataset.split}' in {cfg.ann_path} lack their image "
                            f"(first: {name}, {path}); a pseudo-label file needs a prediction for every entry: "
                            f"restore the images, or remove those entries from the annotation file")
    return datasets


@dataclass
class ExportSummary:
    """What an export wrote: ``count`` training entries, the percentage ``agree`` of them within IoU
    0.5 of the file's own boxes (the labels' quality, where the file holds real training boxes), and
    how many the joint assignment or the position words gave another box than the entry's own first
    choice (``moved``)."""
    count: int
    agree: float
    moved: int


def export_pseudo_labels(model: nn.Module, cfg: Config, device: torch.device, path: str,
                         train_sets: list[RefDataset]) -> ExportSummary:
    """Writes the annotation file with TRAIN_SPLIT's boxes replaced by the model's labels and each
    training entry's margin added (:data:`MARGIN_FIELD`); entries keep every other field, and the
    other splits are copied unchanged. ``train_sets``: :func:`pseudo_label_datasets`. The file is
    replaced only once written whole."""
    check_export_config(model, cfg)
    data = load_annotations(cfg.ann_path, cfg.DATASET)
    out = dict(data)
    made = []
    for dataset in train_sets:
        labels = pseudo_labels(model, dataset, cfg, device)
        out[dataset.split] = [
            dict(entry, bbox=[float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                 **{MARGIN_FIELD: float(margin) if np.isfinite(margin) else None})
            for entry, (x1, y1, x2, y2), margin in zip(data[dataset.split], labels.boxes, labels.margins)]
        made.append(labels)
    prepare_output_file(path, "--export-pseudo-labels")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(out, f)
    os.replace(path + ".tmp", path)
    agree = np.concatenate([labels.agree for labels in made])
    moved = sum(int(labels.moved.sum()) for labels in made)
    return ExportSummary(agree.size, 100.0 * float(agree.mean()), moved)


def label_agreement(labels_path: str, original_path: str, splits: str, dataset: str) -> float:
    """The percentage of the boxes of ``splits`` ('+'-joined) in the pseudo-label file ``labels_path``
    within IoU 0.5 of ``original_path``'s boxes of the same entries."""
    labels, original = load_annotations(labels_path, dataset), load_annotations(original_path, dataset)
    names = splits.split("+")
    predicted = gt_xyxy(torch.tensor([e["bbox"] for name in names for e in labels[name]], dtype=torch.float64))
    truth = torch.tensor([e["bbox"] for name in names for e in original[name]], dtype=torch.float64)
    return 100.0 * float(hits(predicted, truth).double().mean())
