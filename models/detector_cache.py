"""Reuse of the frozen detector's outputs across epochs and evaluation passes (CACHE_DETECTOR).

With the detector frozen and its BatchNorm statistics fixed, an image's detector outputs never
change, and the REC datasets do not augment: running the detector again on an image seen before
recomputes what is already known. On a CPU that is most of a training step of the reduced model.
"""
from __future__ import annotations

from typing import Sequence

import torch

Detections = tuple[torch.Tensor, ...]


class DetectorCache:
    """Per image id, what the model's ``detect`` gives for that image (``REC``: the stride 32, 16 and
    8 feature maps and the stride-32 head's boxes; ``Student``: the three maps), kept where they were
    computed (about 130 KB per image at the synthetic config's size, 5 MB at the reference's)."""

    def __init__(self) -> None:
        self._outputs: dict[int, Detections] = {}

    def __len__(self) -> int:
        return len(self._outputs)

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module, images: torch.Tensor, image_ids: Sequence[int]) -> Detections:
        """``model.detect(images)`` for a batch whose image ``i`` has id ``image_ids[i]``; the
        detector runs only on the images not seen before, once each."""
        unseen: dict[int, int] = {}  # id -> first row holding it
        for row, key in enumerate(image_ids):
            if key not in self._outputs:
                unseen.setdefault(key, row)
        if unseen:
            outputs = model.detect(images[list(unseen.values())])
            for n, key in enumerate(unseen):
                self._outputs[key] = tuple(o[n].clone() for o in outputs)
        return tuple(torch.stack([self._outputs[key][part] for key in image_ids])
                     for part in range(len(self._outputs[image_ids[0]])))
