"""Checkpoint files: written atomically, read without unpickling arbitrary objects."""
from __future__ import annotations

import os
import random
import tempfile

import numpy as np
import torch

from models.checkpoint import CheckpointMismatchError, load_matching

FORMAT = "rec-train-v1"


def save_atomic(obj: dict, path: str) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``: a crash or
    a full disk mid-write leaves the previous file intact."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_checkpoint(path: str, what: str = "checkpoint") -> dict:
    """``torch.load`` with ``weights_only=True`` and errors that name the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated file, or one holding arbitrary pickled objects
        raise CheckpointMismatchError(f"cannot read {what} {path}: {err}. It may be damaged, or hold objects "
                           "other than tensors and plain containers (only those are loaded)") from err
    if not isinstance(obj, dict):
        raise CheckpointMismatchError(f"{what} {path} holds a {type(obj).__name__}, not a dict")
    return obj


def rng_state() -> dict:
    """Every random generator a training step can draw from (numpy's as a plain list, so
    ``weights_only`` loading accepts it)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)),
                                                      pos, has_gauss, gauss],
             "python": _python_state_to_tensor(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(_python_state_from_tensor(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _python_state_to_tensor(state: tuple) -> dict:
    version, internal, gauss = state
    return {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss}


def _python_state_from_tensor(state: dict) -> tuple:
    return state["version"], tuple(int(x) for x in state["internal"].tolist()), state["gauss"]


def restore_training_state(ckpt: dict, path: str, model, ema, optimizer, scheduler, scaler) -> None:
    """Load what a training checkpoint (train.py, pretrain.py) holds back into the live objects,
    generator states included, so that training continues as if never stopped."""
    load_matching(model, ckpt["model"], path)
    if ema is not None:
        if ckpt["ema"] is None:
            raise CheckpointMismatchError(f"{path} has no EMA state, but the config asks for an EMA")
        ema.load_state_dict(ckpt["ema"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    if scaler is not None and ckpt["scaler"] is not None:
        scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"])


def completed_epochs(path: str) -> int:
    """Epochs the training checkpoint ``path`` (train.py's ``last.pth``) has finished; 0 when absent."""
    if not os.path.isfile(path):
        return 0
    return load_checkpoint(path, "training checkpoint")["epoch"]
