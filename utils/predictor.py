"""Boxes for (image, expression) pairs from a trained model loaded once: what predict.py runs, and
what a notebook uses.

    predictor = Predictor.from_checkpoint("logs/refcoco/best.pth", "cuda")
    for p in predictor.predict(["a.jpg", "b.jpg"], ["the man in red", "left dog"], topk=3):
        print(p.box, p.match_score, p.objectness, p.warnings)

A prediction's two scores say different things:

- ``match_score``: the probability of the chosen candidate among the model's K candidate anchors
  for this expression (the softmax over K of the anchor-expression similarities). It says how
  clearly the expression singles out one candidate, not whether the object is in the image: the
  model always picks one.
- ``objectness``: the frozen detector's confidence that the chosen box holds an object, whatever
  the expression.

A model that answers with a box head (the supervised student, or the weak model with APL's
alignment head answering) ranks no anchors: its one box is reported with its own confidence as ``match_score``, ``objectness`` is None, and ``candidates``
holds that box alone.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Sequence, Union

import cv2
import numpy as np
import torch

from datasets import (DataError, chw, clip_to_image, encode, letterbox_image, letterbox_to_original, normalize_images,
                      read_image,
                      tokenize)
from .checkpoint import config_from_checkpoint, load_checkpoint, model_for_evaluation
from .config import Config, load_config
from .distributed import local_device

ImageInput = Union[str, os.PathLike, np.ndarray]


@dataclass
class Candidate:
    """One candidate box: x1, y1, x2, y2 in the image's pixels, clipped to the image."""

    box: list[float]
    match_score: float
    objectness: float | None


@dataclass
class Prediction:
    """The box chosen for one (image, expression) pair; ``candidates``: the best ``topk``
    candidates, best first (empty without ``topk``)."""

    image: str
    expression: str
    box: list[float]
    match_score: float
    objectness: float | None
    unknown_words: list[str]
    warnings: list[str]
    candidates: list[Candidate] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def vocabulary_warnings(expression: str, token_to_ix: dict[str, int], max_token: int) -> tuple[list[str], list[str]]:
    """The words of ``expression`` outside the vocabulary (in order, once each) and the warnings to
    show: unknown words (read as UNK), none known, and words cut by ``max_token`` (> 0)."""
    words = tokenize(expression)
    unknown = list(dict.fromkeys(w for w in words if w not in token_to_ix))
    warnings = []
    if len(unknown) == len(words):
        what = "has no words" if not words else "has no word in the model's vocabulary"
        warnings.append(f"{expression!r} {what}: no word of it guides the box")
    elif unknown:
        warnings.append(f"{expression!r}: not in the model's vocabulary, read as unknown: {', '.join(unknown)}")
    if 0 < max_token < len(words):
        warnings.append(f"{expression!r}: only the first {max_token} words are read (MAX_TOKEN); "
                        f"ignored: {' '.join(words[max_token:])}")
    return unknown, warnings


class Predictor:
    """A model in eval mode on ``device`` with the config and vocabulary it was trained with."""

    def __init__(self, model: torch.nn.Module, cfg: Config, vocab: Sequence[str], device: torch.device):
        self.model = model.to(device).eval()
        self.cfg = cfg
        self.device = device
        self.vocab = list(vocab)
        self.token_to_ix = {token: i for i, token in enumerate(vocab)}
        self.size = cfg.INPUT_SHAPE[0]

    @classmethod
    def from_checkpoint(cls, path: str, device: str | torch.device | None = None, config: str | None = None,
                        overrides: Sequence[str] = (), allow_config_change: bool = False) -> "Predictor":
        """The model of a checkpoint written by train.py (its vocabulary comes with it, and its config
        unless ``config``, a YAML file, is given; ``overrides`` apply either way, and a change to what
        the model computes is an error unless ``allow_config_change``); ``device``: 'cpu', 'cuda',
        'cuda:N' (default: CUDA when present)."""
        ckpt = load_checkpoint(path, "weights")
        trained = config_from_checkpoint(ckpt, path, None if config else list(overrides))
        cfg = load_config(config, list(overrides)) if config else trained
        device = local_device(str(device) if device is not None else None)
        model = model_for_evaluation(path, cfg, ckpt["vocab"], device, allow_config_change, ckpt)
        return cls(model, cfg, ckpt["vocab"], device)

    def predict(self, images: ImageInput | Sequence[ImageInput], expressions: str | Sequence[str],
                topk: int = 0, batch_size: int = 16) -> list[Prediction]:
        """One prediction per expression. ``images``: paths or BGR uint8 arrays ``[H,W,3]``, one per
        expression, or a single image for every expression. ``topk``: also list the best N candidates
        (all K at most). Runs ``batch_size`` pairs per forward pass; an image repeated within a batch
        goes through the detector once."""
        if topk < 0:
            raise ValueError(f"topk must be 0 (the chosen box only) or positive, got {topk}")
        images = [images] if isinstance(images, (str, os.PathLike, np.ndarray)) else list(images)
        expressions = [expressions] if isinstance(expressions, str) else list(expressions)
        if len(images) == 1:
            images = images * len(expressions)
        if len(images) != len(expressions):
            raise ValueError(f"{len(images)} images for {len(expressions)} expressions: give one image "
                             "per expression, or one image for all")
        names = [os.fspath(im) if not isinstance(im, np.ndarray) else f"<array {i}>" for i, im in enumerate(images)]
        predictions = []
        for start in range(0, len(images), batch_size):
            end = start + batch_size
            predictions += self._predict_batch(images[start:end], names[start:end], expressions[start:end], topk)
        return predictions

    @torch.inference_mode()
    def _predict_batch(self, images: list[ImageInput], names: list[str], expressions: list[str],
                       topk: int) -> list[Prediction]:
        """One forward pass: each distinct image letterboxed and detected once, every candidate
        ranked, the boxes mapped back to each image's pixels and clipped."""
        keys = [id(im) if isinstance(im, np.ndarray) else os.fspath(im) for im in images]
        unique = {key: im for key, im in zip(keys, images)}
        squares, infos = [], []
        for image in unique.values():
            bgr = image if isinstance(image, np.ndarray) else read_image(image)
            if bgr.ndim != 3 or bgr.shape[2] != 3 or bgr.dtype != np.uint8:
                raise DataError(f"an image array must be BGR uint8 [H, W, 3], got {bgr.dtype} {list(bgr.shape)}")
            square, geometry = letterbox_image(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), self.size)
            squares.append(chw(square))
            infos.append(geometry + (0,))
        order = list(unique)
        inverse = torch.tensor([order.index(key) for key in keys], device=self.device)
        # [U, 3, S, S], one per distinct image
        pixels = normalize_images(torch.stack(squares).to(self.device), self.cfg.MEAN, self.cfg.STD)
        info = torch.tensor(infos, dtype=torch.float64, device=self.device)[inverse]  # [B, 7]
        refs = self._encode(expressions)  # [B, 1, T]

        if getattr(self.model, "ranks_anchors", False):
            detections = tuple(t[inverse] for t in self.model.detect(pixels))
            similarities, boxes = self.model.rank(pixels[inverse], refs, detections)  # [B, K], [B, K, 5]
            scores = similarities.float().softmax(dim=1)
            objectness = boxes[..., 4].float()
            # By similarity, first index first among ties: the candidate the eval forward's argmax picks.
            ranked = similarities.argsort(dim=1, descending=True, stable=True).tolist()
        else:  # a box head answers: its one box and its confidence
            boxes = self.model(pixels[inverse], refs)  # [B, 1, 5]
            scores, objectness = boxes[..., 4].float(), None
            ranked = [[0]] * boxes.shape[0]
        b, k = boxes.shape[:2]
        info = info.repeat_interleave(k, dim=0)
        xyxy = clip_to_image(letterbox_to_original(boxes[..., :4].float().flatten(0, 1), info), info)
        xyxy = xyxy.view(b, k, 4).tolist()
        scores = scores.tolist()
        objectness = objectness.tolist() if objectness is not None else None

        predictions = []
        for i, (name, expression) in enumerate(zip(names, expressions)):
            candidates = [Candidate(xyxy[i][j], scores[i][j], objectness[i][j] if objectness is not None else None)
                          for j in ranked[i][:topk or 1]]
            unknown, warnings = vocabulary_warnings(expression, self.token_to_ix, self.cfg.MAX_TOKEN)
            best = candidates[0]
            predictions.append(Prediction(name, expression, best.box, best.match_score, best.objectness,
                                          unknown, warnings, candidates if topk else []))
        return predictions

    def _encode(self, expressions: list[str]) -> torch.Tensor:
        """``[B, 1, T]`` token ids; T is MAX_TOKEN, or the longest expression when MAX_TOKEN is -1."""
        length = self.cfg.MAX_TOKEN if self.cfg.MAX_TOKEN > 0 else max(1, *(len(tokenize(e)) for e in expressions))
        ids = np.stack([encode(e, self.token_to_ix, length) for e in expressions])
        return torch.from_numpy(ids)[:, None].to(self.device)
