"""The parameter names of the reference's code and of APL's, mapped to this project's in one place.

Checkpoints trained by the reference code, and its pretrained YOLOv3 weight
files, use names such as ``process_model.inpu.weight`` or
``module_list.19.Feature_adaption.dconv.weight``. APL's code (models/APL/net.py)
builds on the same modules and adds its own (``tag_encoder``, ``sup_head``, ...),
so its checkpoints are mapped by the same tables. The modules here use
descriptive names; ``to_ours`` / ``to_reference`` translate whole keys. The
loaders that read these files with this mapping, and report every key that does
not fit, are in ``utils/checkpoint.py``.
"""
from __future__ import annotations

import re

import torch
from torch import nn

# Top-level modules: reference name -> ours.
_REFERENCE_TOP = {
    "visual_encoder": "visual_encoder",
    "lang_encoder": "language_encoder",
    "multi_scale_manner": "fusion",
    "process_model": "cma",
    "linear_vs": "anchor_proj",
    "linear_ts": "expr_proj",
}
# The modules only APL's Net has: APL name -> ours.
_APL_TOP = {
    "tag_encoder": "prompts.tag_encoder",
    "linear_vs_pos": "prompts.visual_proj",
    "linear_tag": "prompts.tag_proj",
    "soft_weights": "prompts.soft_weights",
    "linear_decoder": "reconstruction.decoder",
    "linear_vs_proj": "alignment.anchor_proj",
    "fusion_manner": "alignment.gates",
    "multi_scale_manner_sup": "alignment.multi_scale",
    "attention_manner": "alignment.attention",
    "sup_head": "alignment.head",
}
_TOP = {**_REFERENCE_TOP, **_APL_TOP}
_TOP_ORDER = sorted(_TOP.items(), key=lambda item: -len(item[1]))  # longest of ours first

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
    # APL's SimpleFusion (models/alignment.py AlignmentGate); ``norm`` keeps its name.
    "fusion_manner": [
        ("{n}.v_proj.", "{n}.visual."),
        ("{n}.q_proj.", "{n}.text."),
    ],
    # APL's GaranAttention (models/alignment.py AlignmentAttention).
    "attention_manner": [
        ("w_qs.", "query."),
        ("w_kc.", "collect_key."),
        ("w_kd.", "diffuse_key."),
        ("w_vs.", "value."),
        ("w_m.", "mask_pred."),
        ("w_o.", "out."),
        ("layer_norm.", "norm."),
    ],
    "sup_head": [
        ("stems.0.", "stem."),
        ("reg_convs.0.", "convs."),
        ("reg_preds.0.", "reg."),
        ("obj_preds.0.", "obj."),
    ],
}
_AT_START["tag_encoder"] = _AT_START["lang_encoder"]
_AT_START["multi_scale_manner_sup"] = _AT_START["multi_scale_manner"]
# Segments renamed wherever they occur, in the modules built from darknet convolutions
# (APL's own convolution blocks already say ``bn``).
_ANYWHERE = {module: [(".batch_norm.", ".bn.")]
             for module in ("visual_encoder", "multi_scale_manner", "multi_scale_manner_sup")}
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


def _split_top(key: str, forward: bool) -> tuple[str, str, str] | None:
    """(the module's name in the reference's naming, its name in the naming converted to, the rest
    of the key), or None where no module matches."""
    for ref, ours in _TOP_ORDER:
        own, other = (ref, ours) if forward else (ours, ref)
        if key.startswith(own + "."):
            return ref, other, key[len(own) + 1:]
    return None


def _convert(key: str, forward: bool, module: str | None) -> str:
    if module is None:
        split = _split_top(key, forward)
        if split is None:
            return key
        ref_top, new_top, rest = split
    else:
        rest, ref_top, new_top = key, module, None
    rest = _rewrite(rest, _AT_START.get(ref_top, []), forward)
    for ref, ours in _ANYWHERE.get(ref_top, []):
        rest = rest.replace(*((ref, ours) if forward else (ours, ref)))
    return rest if new_top is None else f"{new_top}.{rest}"


def is_apl_key(key: str) -> bool:
    """Whether ``key`` (in the reference's or APL's naming) belongs to a module only APL's Net has."""
    return key.partition(".")[0] in _APL_TOP


def to_ours(key: str, module: str | None = None) -> str:
    """A reference key -> this project's key. ``module='visual_encoder'`` for the keys of a
    detector weight file, which carry no top-level prefix."""
    return _convert(key, True, module)


def to_reference(key: str, module: str | None = None) -> str:
    """Inverse of :func:`to_ours`."""
    return _convert(key, False, module)


# State of this project's APL model that APL's checkpoints do not hold: APL counts its burn-in in
# a plain attribute (``Net.iter``), which is not saved. Loading keeps the model's own value.
NOT_IN_APL_CHECKPOINTS = ("alignment.steps",)


def detector_weight_file_state_dict(visual_encoder: nn.Module) -> dict[str, torch.Tensor]:
    """The visual encoder's weights with the keys of the reference's detector weight files."""
    return {to_reference(k, module="visual_encoder"): v for k, v in visual_encoder.state_dict().items()}


def reference_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` in the reference's naming: what the reference code would save (for an
    APL model, what APL's code would: APL's naming, without ``NOT_IN_APL_CHECKPOINTS``)."""
    return {to_reference(k): v for k, v in model.state_dict().items() if k not in NOT_IN_APL_CHECKPOINTS}
