"""Checkpoint files: written atomically, read without unpickling arbitrary objects, loaded into
models with every key that does not fit reported; the reference's and APL's files through the key
mapping of ``models/reference_keys.py``."""
from __future__ import annotations

import glob
import os
import random
import sys
import tempfile
import warnings
from typing import Callable, Mapping

import numpy as np
import torch
from torch import nn

from models import REC, Student, build_model
from models.reference_keys import NOT_IN_APL_CHECKPOINTS, is_apl_key, to_ours, to_reference

from .config import Config, ConfigError, changed_model_keys, config_from_dict, load_config
from .paths import make_folder
from .run_lock import RunLock

FORMAT = "rec-train-v1"


class CheckpointMismatchError(RuntimeError):
    """A state dict that does not fit the model (another config, another model, a damaged file)."""


def unwrap_state_dict(obj: Mapping) -> dict[str, torch.Tensor]:
    """Accept a raw state dict or a checkpoint dict holding one; drop DDP's ``module.`` prefix."""
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, Mapping) and wrapper in obj and isinstance(obj[wrapper], Mapping):
            obj = obj[wrapper]
            break
    if not isinstance(obj, Mapping):
        raise CheckpointMismatchError(f"expected a state dict, got {type(obj).__name__}")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}


def load_matching(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str,
                  file_key: Callable[[str], str] | None = None) -> None:
    """``load_state_dict`` that reports every missing, unexpected and mis-shaped key at once.
    ``file_key``: the name a key of the model has in the file, shown beside it where it differs."""
    expected = model.state_dict()

    def in_file(key: str) -> str:
        theirs = key if file_key is None else file_key(key)
        return "" if theirs == key else f" ({theirs} in the file)"

    missing = [k + in_file(k) for k in sorted(set(expected) - set(state_dict))]
    unexpected = [k + in_file(k) for k in sorted(set(state_dict) - set(expected))]
    shapes = [f"{k}: {tuple(state_dict[k].shape)} in {source}, {tuple(expected[k].shape)} in the model{in_file(k)}"
              for k in sorted(set(expected) & set(state_dict))
              if tuple(state_dict[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or shapes:
        lines = [f"{source} does not fit the model (was it made with another config?)"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if items:
                shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
                lines.append(f"  {title} ({len(items)}): " + "\n    ".join([""] + shown))
        raise CheckpointMismatchError("\n".join(lines))
    model.load_state_dict(state_dict, strict=True)


def load_reference_state_dict(model: nn.Module, state_dict: Mapping, source: str = "the reference state dict") -> None:
    """Load a state dict in the reference's naming (raw, or a checkpoint holding ``'state_dict'``,
    with or without DDP's ``module.`` prefix) into ``model``. Nothing is skipped: any key that is
    missing, unexpected or of another shape raises :class:`CheckpointMismatchError` naming ``source``."""
    weights = {to_ours(k): v for k, v in unwrap_state_dict(state_dict).items()}
    load_matching(model, weights, source, to_reference)


def is_apl_checkpoint(obj: Mapping) -> bool:
    """Whether ``obj`` (a state dict or a checkpoint holding one) was saved by APL's code: it holds
    a module only APL's Net has (``tag_encoder``, ``sup_head``, ``linear_vs_pos``, ...)."""
    return any(is_apl_key(k) for k in unwrap_state_dict(obj))


def load_apl_state_dict(model: nn.Module, state_dict: Mapping, source: str = "the APL state dict") -> None:
    """Load a state dict saved by APL's code (raw, or a checkpoint holding ``'state_dict'``, with or
    without DDP's ``module.`` prefix) into the model of an APL config (``config/apl/*.yaml``).
    Nothing is skipped: any key that is missing, unexpected or of another shape raises
    :class:`CheckpointMismatchError`, naming it in both namings. The model's state that APL does
    not save (``NOT_IN_APL_CHECKPOINTS``) keeps its value."""
    own = model.state_dict()
    if not any(is_apl_key(to_reference(k)) for k in own):
        raise CheckpointMismatchError("the checkpoint was saved by APL's code, but the model has none of APL's "
                                      "modules: evaluate it with an APL config, e.g. config/apl/refcoco.yaml")
    weights = {to_ours(k): v for k, v in unwrap_state_dict(state_dict).items()}
    for key in NOT_IN_APL_CHECKPOINTS:
        if key in own and key not in weights:
            weights[key] = own[key]
    load_matching(model, weights, source, to_reference)


def load_pretrained_backbone(visual_encoder: nn.Module, path: str) -> None:
    """Load a detector weight file (the reference's ``yolov3_coco.pth`` keys) into the visual encoder.

    ``'none'`` keeps random weights, with a warning. A missing file or keys that do not fit raise.
    """
    if path.lower() == "none":
        warnings.warn("PRETRAIN_WEIGHT is 'none': the frozen detector keeps random weights, so its "
                      "anchors are meaningless; use this only for tests and benchmarks", stacklevel=2)
        return
    if not os.path.isfile(path):
        raise FileNotFoundError(f"detector weights not found: {path} (set PRETRAIN_WEIGHT to the "
                                "yolov3 weight file, or 'none' for random weights)")
    raw = unwrap_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    weights = {to_ours(k, module="visual_encoder"): v for k, v in raw.items()}
    load_matching(visual_encoder, weights, f"PRETRAIN_WEIGHT {path}")


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


def prepare_run_folder(folder: str, key: str, previous: list[str], resume: str, overwrite: bool) -> RunLock:
    """Make ``folder`` (config key ``key``) for a run and take its lock (:class:`RunLock`, on rank 0
    only under torchrun), never at the cost of another run: a run into a folder another live run
    owns stops, naming the owner, and a fresh run (no ``resume``) stops where any of ``previous``
    (that run's checkpoints and outputs) exists, unless ``overwrite``. Partial checkpoints that a
    killed save left in ``folder`` are removed, with a message. Returns the lock, held; give it back
    with ``release()`` or a ``with`` block."""
    make_folder(folder, key)
    lock = RunLock(folder, key)
    if os.environ.get("RANK", "0") != "0":
        return lock
    lock.acquire()
    try:
        found = [path for path in previous if os.path.exists(path)]
        if found and not resume and not overwrite:
            raise ConfigError(f"{', '.join(found)} already exist(s) from an earlier run: continue it with --resume "
                              f"{os.path.join(folder, 'last.pth')}, start a new one with {key}=<new folder>, or "
                              "pass --overwrite to replace it")
        for path in previous:
            for partial in sorted(glob.glob(glob.escape(path) + ".*.tmp")):
                if os.path.dirname(os.path.abspath(partial)) == os.path.abspath(folder):
                    os.remove(partial)
                    print(f"warning: removed {partial}, a partial checkpoint left by a save that was interrupted "
                          f"(a killed run); the checkpoints themselves are untouched", file=sys.stderr)
    except BaseException:
        lock.release()
        raise
    return lock


def completed_epochs(path: str) -> int:
    """Epochs the training checkpoint ``path`` (train.py's ``last.pth``) has finished; 0 when absent."""
    if not os.path.isfile(path):
        return 0
    return load_checkpoint(path, "training checkpoint")["epoch"]


def refuse_detector_weights(ckpt: dict, path: str) -> None:
    """Stop, naming ``path``, where a detector weight file is given as a trained model."""
    weights = unwrap_state_dict(ckpt)
    if weights and all(key.startswith("module_list.") for key in weights):
        raise CheckpointMismatchError(f"{path} holds detector weights only (a PRETRAIN_WEIGHT file, such as "
                                      "pretrain.py's DET_OUTPUT), not a trained REC model: give it to train.py as "
                                      "PRETRAIN_WEIGHT, and use the checkpoint train.py writes (LOG_PATH/best.pth)")


def config_from_checkpoint(ckpt: dict, path: str, overrides: list[str] | None = None) -> Config:
    """The config a checkpoint of this project was trained with (plus ``overrides``)."""
    if ckpt.get("format") != FORMAT:
        refuse_detector_weights(ckpt, path)
        raise CheckpointMismatchError(f"{path} holds no config and vocabulary (a checkpoint of the reference's or "
                                      "APL's code?); evaluate it with --config <the config it was trained with>")
    return config_from_dict(ckpt["config"], overrides, source=f"the config stored in {path}")


def evaluation_config(weights: str, config: str | None, overrides: list[str]) -> Config:
    """The config to evaluate checkpoint ``weights`` with: the YAML file ``config`` when given, else
    the one stored in the checkpoint; ``overrides`` on top either way."""
    if config:
        return load_config(config, overrides)
    return config_from_checkpoint(load_checkpoint(weights, "evaluation weights"), weights, overrides)


def check_model_config(cfg: Config, trained: Config, path: str, allow_config_change: bool, hint: str = "") -> None:
    """Stop where ``cfg`` changes what the model of checkpoint ``path`` (trained with ``trained``)
    computes: another MODEL.ARCH always, any other key of ``MODEL_KEYS`` (INPUT_SHAPE, SELECT_NUM,
    ...) unless ``allow_config_change``; each changed key is named, ``hint`` added to the advice."""
    if cfg.ARCH != trained.ARCH:
        raise ConfigError(f"{path} holds a '{trained.ARCH}' model and the config asks for ARCH '{cfg.ARCH}': "
                          f"set ARCH={trained.ARCH}, or give a checkpoint of a '{cfg.ARCH}' model")
    changed = changed_model_keys(cfg, trained)
    if changed and not allow_config_change:
        differences = ", ".join(f"{key} ({cfg[key]} here, {trained[key]} in training)" for key in changed)
        raise ConfigError(f"the config differs from the one {path} was trained with in {differences}: the "
                          f"model would not compute what it was trained to; drop these changes{hint}, or pass "
                          "--allow-config-change")


def model_for_evaluation(path: str, cfg: Config, vocab: list[str], device: torch.device,
                         allow_config_change: bool = False, ckpt: dict | None = None) -> REC | Student:
    """The model of ``cfg`` with the evaluation weights of checkpoint ``path``, in eval mode.

    This project's checkpoints carry their vocabulary, which must equal ``vocab`` (the token ids
    the data will be encoded with), and their config, which must equal ``cfg`` in every key that
    changes what the model computes (``MODEL_KEYS``: INPUT_SHAPE, SELECT_NUM, ...) unless
    ``allow_config_change``; data paths may differ. Reference checkpoints (``{epoch, state_dict,
    ...}`` in the reference's naming) are mapped by :func:`load_reference_state_dict`, and those
    of APL's code (:func:`is_apl_checkpoint`) by :func:`load_apl_state_dict`. ``ckpt``: the file's
    contents when the caller has read it already."""
    if ckpt is None:
        ckpt = load_checkpoint(path, "evaluation weights")
    model = build_model(cfg, None, len(vocab), vocab)
    if ckpt.get("format") == FORMAT:
        if ckpt["vocab"] != list(vocab):
            raise CheckpointMismatchError(f"{path} was trained with a vocabulary of {len(ckpt['vocab'])} tokens that "
                                          f"differs from this annotation file's ({len(vocab)} tokens): evaluate "
                                          "with the annotation file it was trained on")
        check_model_config(cfg, config_from_checkpoint(ckpt, path), path, allow_config_change,
                           " (without --config the checkpoint's own config is used)")
        load_matching(model, ckpt["state_dict"], path)
    elif is_apl_checkpoint(ckpt):
        load_apl_state_dict(model, ckpt, f"the APL checkpoint {path}")
    else:
        refuse_detector_weights(ckpt, path)
        load_reference_state_dict(model, ckpt, f"the reference checkpoint {path}")
    return model.to(device).eval()
