"""Models for evaluation and prediction, from this project's checkpoints or the reference's."""
from __future__ import annotations

import torch

from models import REC, CheckpointMismatchError, build_model, load_reference_state_dict
from models.checkpoint import load_matching
from .checkpoint import FORMAT, load_checkpoint
from .config import Config, config_from_dict


def config_from_checkpoint(ckpt: dict, path: str, overrides: list[str] | None = None) -> Config:
    """The config a checkpoint of this project was trained with (plus ``overrides``)."""
    if ckpt.get("format") != FORMAT:
        raise CheckpointMismatchError(f"{path} holds no config and vocabulary (a reference checkpoint?); evaluate it "
                           "with test.py --config <the config it was trained with>")
    return config_from_dict(ckpt["config"], overrides, source=f"the config stored in {path}")


def model_for_evaluation(path: str, cfg: Config, vocab: list[str], device: torch.device,
                         ckpt: dict | None = None) -> REC:
    """The model of ``cfg`` with the evaluation weights of checkpoint ``path``, in eval mode.

    This project's checkpoints carry their vocabulary, which must equal ``vocab`` (the token ids
    the data will be encoded with). Reference checkpoints (``{epoch, state_dict, ...}`` in the
    reference's naming) are mapped by :func:`models.load_reference_state_dict`. ``ckpt``: the
    file's contents when the caller has read it already."""
    if ckpt is None:
        ckpt = load_checkpoint(path, "evaluation weights")
    model = build_model(cfg, None, len(vocab), vocab)
    if ckpt.get("format") == FORMAT:
        if ckpt["vocab"] != list(vocab):
            raise CheckpointMismatchError(f"{path} was trained with a vocabulary of {len(ckpt['vocab'])} tokens that "
                               f"differs from this annotation file's ({len(vocab)} tokens): evaluate with "
                               "the annotation file it was trained on")
        load_matching(model, ckpt["state_dict"], path)
    else:
        load_reference_state_dict(model, ckpt)
    return model.to(device).eval()
