"""The dataset: one sample per annotation entry, as the reference's data pipeline makes it."""
from __future__ import annotations

import logging
import os

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from .annotations import DataError, describe_entry, image_file_name, load_annotations, select_splits
from .image_io import read_image
from .letterbox import box_to_yolo, chw, letterbox_image
from .tokens import build_vocab, encode, encode_many, select_expressions, tokenize

log = logging.getLogger(__name__)


class RefDataset(Dataset):
    """Entries of one split (or '+'-joined splits) of ``cfg.ann_path``.

    An item is a dict:

    - ``refs``: int64 ``[NUM_REFS, MAX_TOKEN]``, the primary expression (drawn
      at random) first, see ``sample_refs``;
    - ``image``: uint8 ``[3, S, S]``, letterboxed RGB; the engine normalises it with ``MEAN`` /
      ``STD`` on the device (``datasets.normalize_images``), so workers ship a quarter of the bytes;
    - ``box``: float32 ``[1, 4]``, the box as letterboxed ``cx, cy, w, h`` / S, clipped to [0, 0.99];
    - ``gt_box``: float32 ``[1, 4]``, the annotation's ``x, y, w, h`` in original pixels;
    - ``info``: int64 ``[7]``, ``(h, w, nh, nw, dx, dy, iid)``.

    The vocabulary covers every split of the file, so all splits of one file
    share token ids. The primary expression is drawn from the key the training
    sampler passes with each index (see ``EpochSampler``), or, for a plain
    index, from torch's random generator. ``ann_path`` reads another annotation
    file than ANN_PATH's (TRAIN_ANN_PATH for training). ``vocab_from`` takes the
    vocabulary (and the longest expression, for MAX_TOKEN -1) from another
    file: the one a model was trained on, to evaluate it on a file of other
    splits (the synthetic data's probe splits); words it lacks encode as UNK.
    """

    def __init__(self, cfg, split: str, ann_path: str | None = None, vocab_from: str | None = None):
        self.split = split
        self.dataset_name = cfg.DATASET
        self.ann_path = ann_path or cfg.ann_path
        self.image_dir = cfg.image_path
        self.input_size = cfg.INPUT_SHAPE[0]
        self.num_refs = cfg.NUM_REFS

        data = load_annotations(self.ann_path, self.dataset_name)
        selected = select_splits(data, split, self.ann_path)
        if not os.path.isdir(self.image_dir):
            raise DataError(f"image folder not found: {self.image_dir} "
                            f"(set IMAGE_PATH['{self.dataset_name}'] in the config)")

        self.vocab, self.max_token_seen = build_vocab(
            load_annotations(vocab_from, self.dataset_name) if vocab_from else data)
        self.token_to_ix = {token: i for i, token in enumerate(self.vocab)}
        # MAX_TOKEN -1 means "the longest expression of the file", as in the reference.
        self.max_token = self.max_token_seen if cfg.MAX_TOKEN == -1 else cfg.MAX_TOKEN
        if self.max_token < 1:
            raise DataError(f"MAX_TOKEN must be positive (or -1 for the longest expression), "
                            f"got {cfg.MAX_TOKEN}")

        self.entries: list[dict] = []
        self.entry_names: list[str] = []
        missing: list[tuple[str, str]] = []
        exists: dict[str, bool] = {}  # many entries share an image: one stat per file
        for split_name, index in selected:
            entry = data[split_name][index]
            name = describe_entry(split_name, index, entry)
            path = self.image_file(entry)
            if path not in exists:
                exists[path] = os.path.isfile(path)
            if exists[path]:
                self.entries.append(entry)
                self.entry_names.append(name)
            else:
                missing.append((name, path))
        if missing and not cfg.SKIP_BAD_IMAGES:
            name, path = missing[0]
            raise DataError(f"image {path} of {name} in {self.ann_path} not found ({len(missing)} of "
                            f"{len(selected)} entries of split '{split}' lack their image); check "
                            f"IMAGE_PATH['{self.dataset_name}'], or set SKIP_BAD_IMAGES: True to skip them")
        # (entry, image path) of each entry left out under SKIP_BAD_IMAGES.
        self.skipped = missing
        self._warn_wordless_expressions()
        if vocab_from:
            self._warn_unknown_words(vocab_from)
        if missing:
            log.warning("split '%s' of %s: skipped %d of %d entries whose image is missing (first: %s, %s)",
                        split, self.ann_path, len(missing), len(selected), *missing[0])
        log.info("split '%s' of %s: %d samples, vocabulary of %d tokens, longest expression %d words "
                 "(MAX_TOKEN %d)", split, self.ann_path, len(self.entries), len(self.vocab),
                 self.max_token_seen, self.max_token)

    def _warn_wordless_expressions(self) -> None:
        """Name the expressions with no words (empty, or punctuation only). They stay in the data, as
        in the reference, and encode to padding only: the model sees nothing to ground."""
        wordless = [(name, i) for name, entry in zip(self.entry_names, self.entries)
                    for i, text in enumerate(entry["refs"]) if not tokenize(text)]
        if wordless:
            name, i = wordless[0]
            log.warning("split '%s' of %s: %d expression(s) have no words (first: expression %d of %s); "
                        "they encode to padding only: fix or remove them in the annotation file",
                        self.split, self.ann_path, len(wordless), i, name)

    def _warn_unknown_words(self, vocab_from: str) -> None:
        unknown = sorted({word for entry in self.entries for text in entry["refs"] for word in tokenize(text)}
                         - set(self.vocab))
        if unknown:
            log.warning("split '%s' of %s: %d word(s) not in the vocabulary of %s encode as UNK (first: %r)",
                        self.split, self.ann_path, len(unknown), vocab_from, unknown[0])

    def __len__(self) -> int:
        return len(self.entries)

    def image_file(self, entry: dict) -> str:
        return os.path.join(self.image_dir, image_file_name(self.dataset_name, entry["iid"]))

    def encode(self, text: str) -> np.ndarray:
        """int64 token ids of length ``max_token`` (PAD-padded, truncated, unknown words UNK)."""
        return encode(text, self.token_to_ix, self.max_token)

    def sample_refs(self, index: int, primary: int) -> np.ndarray:
        """``[NUM_REFS, max_token]`` ids: expression ``primary`` first, then the others in file order."""
        refs = self.entries[index]["refs"]
        chosen = select_expressions(len(refs), primary, self.num_refs)
        return encode_many([refs[i] for i in chosen], self.token_to_ix, self.max_token)

    def letterboxed(self, index: int) -> tuple[np.ndarray, tuple[int, ...]]:
        """The letterboxed RGB uint8 image of entry ``index`` and its info ``(h, w, nh, nw, dx, dy, iid)``."""
        entry = self.entries[index]
        path = self.image_file(entry)
        image = read_image(path, f" of {self.entry_names[index]} in {self.ann_path}")
        square, geometry = letterbox_image(cv2.cvtColor(image, cv2.COLOR_BGR2RGB), self.input_size)
        return square, geometry + (entry["iid"],)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        """``key``: an index (the primary drawn from torch's generator), or ``(index, draw_key)`` as
        ``EpochSampler`` gives them (the primary drawn from ``draw_key``, repeatable)."""
        if isinstance(key, tuple):
            index, draw_key = key
            primary = int(np.random.default_rng(draw_key).integers(len(self.entries[index]["refs"])))
        else:
            index = key
            primary = int(torch.randint(len(self.entries[index]["refs"]), ()))
        entry = self.entries[index]
        square, info = self.letterboxed(index)
        gt_box = np.array([entry["bbox"]], dtype=np.float64)
        return {
            "refs": torch.from_numpy(self.sample_refs(index, primary)),
            "image": chw(square),
            "box": torch.from_numpy(box_to_yolo(gt_box, info, self.input_size)).float(),
            "gt_box": torch.from_numpy(gt_box).float(),
            "info": torch.tensor(info, dtype=torch.int64),
        }


class FirstExpression(Dataset):
    """Items of ``dataset`` carrying only the entry's first expression (file order), so that what
    is predicted does not depend on a random draw; ``index`` names the entry."""

    def __init__(self, dataset: RefDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        item = self.dataset[index]
        item["refs"] = torch.from_numpy(self.dataset.sample_refs(index, 0)[:1])
        item["index"] = index
        return item


class EntryExpressions(Dataset):
    """Items of ``dataset`` carrying every expression of the entry in file order: ``refs``
    ``[width, max_token]`` (``width``: the most expressions any entry of the split has; the rows past
    an entry's own repeat its first), ``count`` the entry's own, ``index`` the entry."""

    def __init__(self, dataset: RefDataset):
        self.dataset = dataset
        self.width = max((len(entry["refs"]) for entry in dataset.entries), default=1)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        item = self.dataset[index]
        texts = self.dataset.entries[index]["refs"]
        chosen = [texts[i] for i in select_expressions(len(texts), 0, self.width)]
        item["refs"] = torch.from_numpy(encode_many(chosen, self.dataset.token_to_ix, self.dataset.max_token))
        item["count"] = len(texts)
        item["index"] = index
        return item
