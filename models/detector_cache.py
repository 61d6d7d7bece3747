"""Reuse of the frozen detector's outputs across epochs and evaluation passes (CACHE_DETECTOR).

With the detector frozen and its BatchNorm statistics fixed, an image's detector outputs never
change, and the REC datasets do not augment: running the detector again on an image seen before
recomputes what is already known. On a CPU that is most of a training step of the reduced model.
"""
from __future__ import annotations

import torch

Detections = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class DetectorCache:
    """Per image id, what ``REC.detect`` gives for that image: the stride 32, 16 and 8 feature maps
    and the stride-32 head's boxes, kept where they were computed (about 130 KB per image at the
    synthetic config's size, 5 MB at the reference's)."""

    def __init__(self) -> None:
        self._outputs: dict[int, Detections] = {}

    def __len__(self) -> int:
        return len(self._outputs)

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module, images: torch.Tensor, image_ids: torch.Tensor) -> Detections:
        """``model.detect(images)`` for a batch whose image ``i`` has id ``image_ids[i]``; the
        detector runs only on the images not seen before, once each."""
        keys = image_ids.tolist()
        first_seen = {key: i for i, key in reversed(list(enumerate(keys))) if key not in self._outputs}
        if first_seen:
            rows = list(first_seen.values())
            outputs = model.detect(images[rows])
            for n, key in enumerate(first_seen):
                self._outputs[key] = tuple(o[n].clone() for o in outputs)
        return tuple(torch.stack([self._outputs[key][part] for key in keys]) for part in range(4))
