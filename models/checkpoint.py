"""The reference's parameter names, mapped to this project's in one place.

Checkpoints trained by the reference code, and its pretrained YOLOv3 weight
files, use names such as ``process_model.inpu.weight`` or
``module_list.19.Feature_adaption.dconv.weight``. The modules here use
descriptive names; ``to_ours`` / ``to_reference`` translate whole keys, and
the loaders below accept the reference's files and report every key that
does not fit instead of skipping it.
"""
from __future__ import annotations

import os
import re
import warnings
from typing import Mapping

import torch
from torch import nn

# Top-level modules: reference name -> ours.
_TOP = {
    "visual_encoder": "visual_encoder",
    "lang_encoder": "language_encoder",
    "multi_scale_manner": "fusion",
    "process_model": "cma",
    "linear_vs": "anchor_proj",
    "linear_ts": "expr_proj",
}

# Per top-level module: (reference, ours) templates for the rest of the key, matched at its
# start, first match wins (specific before generic in both columns). {n}: an index;
# {h}: a detector-head index. The "anywhere" rules then rename a segment wherever it occurs.
_AT_START = {
    "visual_encoder": [
        ("module_list.{n}.module_list.", "layers.{n}.blocks."),
        ("module_list.{h}.guide_wh.", "layers.{h}.shape_pred."),
        ("module_list.{h}.Feature_adaption.conv_offset.", "layers.{h}.adaption.offset."),
        ("module_list.{h}.Feature_adaption.dconv.", "layers.{h}.adaption.deform_conv."),
        ("module_list.{h}.conv.", "layers.{h}.pred."),
        ("module_list.", "layers."),
    ],
    "lang_encoder": [
        ("lstm.", "gru."),
        ("sa_list.{n}.mhatt.linear_v.", "layers.{n}.attn.value."),
        ("sa_list.{n}.mhatt.linear_k.", "layers.{n}.attn.key."),
        ("sa_list.{n}.mhatt.linear_q.", "layers.{n}.attn.query."),
        ("sa_list.{n}.mhatt.linear_merge.", "layers.{n}.attn.out."),
        ("sa_list.{n}.ffn.mlp.fc.linear.", "layers.{n}.ffn.0."),
        ("sa_list.{n}.ffn.mlp.linear.", "layers.{n}.ffn.3."),
        ("sa_list.", "layers."),
        ("att_flat.mlp.fc.linear.", "pool.score.0."),
        ("att_flat.mlp.linear.", "pool.score.3."),
        ("att_flat.linear_merge.", "pool.out."),
    ],
    "multi_scale_manner": [
        ("up_modules.", "up."),
        ("down_modules.", "down."),
    ],
    "process_model": [
        ("attn_gate2", "cross_attn_gate"),
        ("attn_gate", "self_attn_gate"),
        ("ff_gate2", "cross_ff_gate"),
        ("ff_gate", "self_ff_gate"),
        ("coefficient", "film_scale"),
        ("inpu.", "in_proj."),
        ("attn2.", "cross_attn."),
        ("attn.", "self_attn."),
        ("ff2.", "cross_ff."),
        ("ff.", "self_ff."),
        ("mapping_lang.", "text_mlp."),
        ("gamma.0.", "to_gamma."),
        ("beta.0.", "to_beta."),
    ],
}
_ANYWHERE = [(".batch_norm.", ".bn.")]
_PLACEHOLDERS = {"n": r"\d+", "h": r"19|28|37"}


def _compile(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w)\}", template)
    regex = "".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>{_PLACEHOLDERS[p]})"
                    for i, p in enumerate(parts))
    return re.compile("^" + regex)


def _rewrite(rest: str, rules: list[tuple[str, str]], forward: bool) -> str:
    for ref, ours in rules:
        src, dst = (ref, ours) if forward else (ours, ref)
        match = _compile(src).match(rest)
        if match:
            return dst.format(**match.groupdict()) + rest[match.end():]
    return rest


def _convert(key: str, forward: bool, module: str | None) -> str:
    if module is None:
        top, _, rest = key.partition(".")
        names = _TOP if forward else {v: k for k, v in _TOP.items()}
        if top not in names:
            return key
        ref_top = top if forward else names[top]
        new_top = names[top]
    else:
        rest, ref_top, new_top = key, module, None
    rest = _rewrite(rest, _AT_START.get(ref_top, []), forward)
    for ref, ours in _ANYWHERE:
        rest = rest.replace(*((ref, ours) if forward else (ours, ref)))
    return rest if new_top is None else f"{new_top}.{rest}"


def to_ours(key: str, module: str | None = None) -> str:
    """A reference key -> this project's key. ``module='visual_encoder'`` for the keys of a
    detector weight file, which carry no top-level prefix."""
    return _convert(key, True, module)


def to_reference(key: str, module: str | None = None) -> str:
    """Inverse of :func:`to_ours`."""
    return _convert(key, False, module)


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


def load_matching(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """``load_state_dict`` that reports every missing, unexpected and mis-shaped key at once."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    shapes = [f"{k}: {tuple(state_dict[k].shape)} in {source}, {tuple(expected[k].shape)} in the model"
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


def load_reference_state_dict(model: nn.Module, state_dict: Mapping) -> None:
    """Load a state dict in the reference's naming (raw, or a checkpoint holding ``'state_dict'``,
    with or without DDP's ``module.`` prefix) into ``model``. Nothing is skipped: any key that is
    missing, unexpected or of another shape raises :class:`CheckpointMismatchError`."""
    weights = {to_ours(k): v for k, v in unwrap_state_dict(state_dict).items()}
    load_matching(model, weights, "the reference state dict")


def reference_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` in the reference's naming (what the reference code would save)."""
    return {to_reference(k): v for k, v in model.state_dict().items()}


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


def detector_weight_file_state_dict(visual_encoder: nn.Module) -> dict[str, torch.Tensor]:
    """The visual encoder's weights with the keys of the reference's detector weight files."""
    return {to_reference(k, module="visual_encoder"): v for k, v in visual_encoder.state_dict().items()}
