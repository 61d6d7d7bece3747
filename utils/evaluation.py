"""The REC model's evaluation: the boxes a model predicts (one per expression or one per entry),
text-blind reference predictors, and Acc@0.5 over a loader (summed across DDP ranks)."""
from __future__ import annotations

from typing import Callable, Iterable, NamedTuple, Sequence

import torch
from torch import nn
from torchvision.ops import box_iou

from datasets import letterbox_to_original
from models.box_prediction import cell_box
from models.detector_cache import DetectorCache

from . import distributed as dist_utils
from .distributed import unwrap_model
from .engine import autocast, prepare_batch


@torch.no_grad()
def model_boxes(model: nn.Module, batch: dict, amp: str, device: torch.device) -> torch.Tensor:
    """Boxes ``[B,4]`` (x1, y1, x2, y2) in original image pixels."""
    with autocast(device, amp):
        boxes = model(batch["image"], batch["refs"], batch.get("detections"))
    return letterbox_to_original(boxes[:, 0, :4].float(), batch["info"])


class EntryVotes(NamedTuple):
    """What :func:`entry_votes` gives for a batch of B entries over K candidates."""
    votes: torch.Tensor  # [B, K] each candidate's similarities to the entry's own expressions, summed
    log_probs: torch.Tensor  # [B, K] the same with each expression's similarities log-softmaxed over K
    boxes: torch.Tensor  # [B, K, 4] the candidates' x1, y1, x2, y2 in original pixels


@torch.no_grad()
def entry_votes(model: nn.Module, batch: dict, amp: str, device: torch.device) -> EntryVotes:
    """Every candidate anchor's vote from all of an entry's expressions: ``batch['refs']`` ``[B,E,T]``
    of which the first ``batch['count']`` are the entry's own. The model must rank anchors
    (``REC.rank``). ``votes`` and ``log_probs`` differ per entry by a constant (each expression's
    log-sum-exp), so they rank an entry's candidates alike, and differences between two candidates
    are the same in both; ``log_probs`` also compare across entries (log-probabilities)."""
    net = unwrap_model(model)
    refs = batch["refs"]
    own = torch.arange(refs.shape[1], device=refs.device)[None] < batch["count"][:, None]  # [B, E]
    with autocast(device, amp):
        detections = batch["detections"] if "detections" in batch else net.detect(batch["image"])
        total = torch.zeros((), device=refs.device)
        log_probs = torch.zeros((), device=refs.device)
        for e in range(refs.shape[1]):
            similarities, candidates = net.rank(batch["image"], refs[:, e:e + 1], detections)  # [B,K], [B,K,5]
            total = total + similarities.float() * own[:, e:e + 1]
            log_probs = log_probs + similarities.float().log_softmax(dim=1) * own[:, e:e + 1]
    b, k = candidates.shape[:2]
    boxes = letterbox_to_original(candidates[..., :4].float().reshape(b * k, 4), batch["info"].repeat_interleave(k, 0))
    return EntryVotes(total, log_probs, boxes.view(b, k, 4))


@torch.no_grad()
def entry_boxes(model: nn.Module, batch: dict, amp: str, device: torch.device) -> torch.Tensor:
    """One box ``[B,4]`` (x1, y1, x2, y2, original pixels) per entry, decided by all of its
    expressions (:func:`entry_votes`): the candidate whose similarities to them sum highest, the
    ranking of the product of the per-expression softmax distributions, so that an expression the
    model reads well outvotes one it reads badly."""
    votes = entry_votes(model, batch, amp, device)
    best = votes.votes.argmax(dim=1)
    return votes.boxes[torch.arange(best.shape[0], device=best.device), best]


@torch.no_grad()
def expression_answers(model: nn.Module, batch: dict, amp: str, device: torch.device) -> tuple[torch.Tensor,
                                                                                              torch.Tensor]:
    """The model's answer to each expression of ``batch['refs']`` ``[B,E,T]`` on its own, as
    evaluation gives it: boxes ``[B,E,4]`` (x1, y1, x2, y2, original pixels) and their confidence
    ``[B,E]`` (the answer's fifth number: a box head's objectness, the detector's for a ranked
    anchor)."""
    boxes, scores = [], []
    for e in range(batch["refs"].shape[1]):
        with autocast(device, amp):
            answer = model(batch["image"], batch["refs"][:, e:e + 1], batch.get("detections"))
        boxes.append(letterbox_to_original(answer[:, 0, :4].float(), batch["info"]))
        scores.append(answer[:, 0, 4].float())
    return torch.stack(boxes, dim=1), torch.stack(scores, dim=1)


def gt_xyxy(gt_box: torch.Tensor) -> torch.Tensor:
    """``[B,1,4]`` or ``[B,4]`` x, y, w, h -> ``[B,4]`` x1, y1, x2, y2."""
    gt = gt_box.reshape(-1, 4).float()
    return torch.cat([gt[:, :2], gt[:, :2] + gt[:, 2:]], dim=1)


def hits(pred: torch.Tensor, gt_box: torch.Tensor) -> torch.Tensor:
    """``[B]``: whether each predicted box (x1, y1, x2, y2) overlaps its annotated one (``gt_box``,
    x, y, w, h) with IoU > 0.5, the test Acc@0.5 counts."""
    return box_iou(pred, gt_xyxy(gt_box)).diagonal() > 0.5


BASELINES = ("random_anchor", "most_confident_anchor")


def text_blind_predictor(kind: str, seed: int = 0) -> Callable:
    """A predictor that ignores the expression, for reference accuracies: ``random_anchor`` takes a
    random one of the K selected cells, ``most_confident_anchor`` the cell holding the most
    confident box; either way that cell's most confident box, as the model would."""
    if kind not in BASELINES:
        raise ValueError(f"unknown baseline {kind!r}; choose from {BASELINES}")
    generator = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def predictor(model: nn.Module, batch: dict, amp: str, device: torch.device) -> torch.Tensor:
        with autocast(device, amp):
            candidates = unwrap_model(model).candidate_boxes(batch["image"], batch.get("detections"))
        candidates = candidates.float()  # [B, K, 4, 5+C]
        b, k = candidates.shape[:2]
        if kind == "random_anchor":
            cell = torch.randint(k, (b,), generator=generator).to(device)
        else:
            cell = candidates[..., 4].amax(dim=-1).argmax(dim=1)
        return letterbox_to_original(cell_box(candidates, cell)[:, 0, :4], batch["info"])

    return predictor


def evaluate(model: nn.Module, loader: Iterable[dict], device: torch.device,
             mean_std: tuple[Sequence[float], Sequence[float]], amp: str = "none", channels_last: bool = False,
             progress=None, predictor: Callable = model_boxes,
             detector_cache: DetectorCache | None = None) -> dict[str, float]:
    """Acc@0.5 ``{"acc", "n"}`` of one predictor (default: the model's prediction), as
    :func:`evaluate_predictors` computes it."""
    return evaluate_predictors(model, loader, device, {"model": predictor}, mean_std, amp, channels_last,
                               progress, detector_cache)["model"]


@torch.no_grad()
def evaluate_predictors(model: nn.Module, loader: Iterable[dict], device: torch.device,
                        predictors: dict[str, Callable], mean_std: tuple[Sequence[float], Sequence[float]],
                        amp: str = "none", channels_last: bool = False, progress=None,
                        detector_cache: DetectorCache | None = None) -> dict[str, dict[str, float]]:
    """Acc@0.5 over every sample of the loader, ``{name: {"acc", "n"}}`` for each of ``predictors``
    (``predictor(model, batch, amp, device)`` gives the boxes), all from one pass. Under DDP each
    rank scores its own shard and the counts are summed, so each sample is counted exactly once.

    The detector runs once per image (an entry holds one expression, so an image recurs once per
    expression): through ``detector_cache``, or one holding the latest batch's images, enough for
    a loader in file order, where the entries of an image are next to each other."""
    model.eval()
    cache = detector_cache if detector_cache is not None else DetectorCache(0)
    counts = torch.zeros(len(predictors), 2, dtype=torch.float64, device=device)  # correct, seen
    for batch in loader:
        batch = prepare_batch(model, batch, device, channels_last, cache, amp, mean_std=mean_std)
        for row, predictor in enumerate(predictors.values()):
            correct = hits(predictor(model, batch, amp, device), batch["gt_box"])
            counts[row, 0] += correct.sum()
            counts[row, 1] += correct.numel()
        if progress is not None:
            progress.update(1)
    counts = dist_utils.all_reduce_sum(counts).tolist()
    return {name: {"acc": 100.0 * correct / max(n, 1), "n": int(n)}
            for name, (correct, n) in zip(predictors, counts)}
