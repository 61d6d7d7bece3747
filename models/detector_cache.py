"""The frozen detector run once per image: within a batch, across the batches of an evaluation pass,
and across epochs (CACHE_DETECTOR).

With the detector frozen and its BatchNorm statistics fixed, an image's detector outputs never
change, and the REC datasets do not augment: running the detector again on an image seen before
recomputes what is already known. An evaluation entry holds one expression, so RefCOCO's val runs
over each image about 7 times; training, every epoch.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch

Detections = tuple[torch.Tensor, ...]


class DetectorCache:
    """Per image id, what the model's ``detect`` gives for that image (``REC``: the stride 32, 16 and
    8 feature maps and the stride-32 head's boxes; ``Student``: the three maps), kept where they were
    computed (about 130 KB per image at the synthetic config's size, 5 MB at the reference's).

    Memory is bounded: past ``max_mb`` megabytes the least recently used images are dropped, except
    those of the latest batch, which always stay so that an image whose entries straddle two
    batches is detected once. ``DetectorCache(0)`` therefore keeps one batch's images: what an
    evaluation pass in file order (entries of an image next to each other) needs. ``detected``
    counts the images the detector has run on.
    """

    def __init__(self, max_mb: float | None = None) -> None:
        self.max_bytes = None if max_mb is None else int(max_mb * 2**20)
        self.bytes = 0
        self.detected = 0
        self._outputs: OrderedDict[int, Detections] = OrderedDict()

    def __len__(self) -> int:
        return len(self._outputs)

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module, images: torch.Tensor, image_ids: Sequence[int]) -> Detections:
        """``model.detect(images)`` for a batch whose image ``i`` has id ``image_ids[i]``; the
        detector runs only on the images not held, once each."""
        unseen: dict[int, int] = {}  # id -> first row holding it
        for row, key in enumerate(image_ids):
            if key not in self._outputs:
                unseen.setdefault(key, row)
        if unseen:
            outputs = model.detect(images[list(unseen.values())])
            self.detected += len(unseen)
            for n, key in enumerate(unseen):
                self._outputs[key] = tuple(o[n].clone() for o in outputs)
                self.bytes += _nbytes(self._outputs[key])
        batch = list(dict.fromkeys(image_ids))
        for key in batch:
            self._outputs.move_to_end(key)
        detections = tuple(torch.stack([self._outputs[key][part] for key in image_ids])
                           for part in range(len(self._outputs[image_ids[0]])))
        self._evict(len(self._outputs) - len(batch))
        return detections

    def _evict(self, evictable: int) -> None:
        """Drops least recently used images, at most ``evictable`` (those before the latest batch),
        until the bound holds."""
        while self.max_bytes is not None and self.bytes > self.max_bytes and evictable > 0:
            _, outputs = self._outputs.popitem(last=False)
            self.bytes -= _nbytes(outputs)
            evictable -= 1


def _nbytes(outputs: Detections) -> int:
    return sum(t.numel() * t.element_size() for t in outputs)
