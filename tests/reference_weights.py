"""The reference's recorded outputs (tests/fixtures) and the weights they were recorded with.

No weights are stored: every floating-point tensor is rebuilt from its key in the reference's
naming (``tensor_for``), so the recorded outputs can be reproduced from the key lists alone.
"""
from __future__ import annotations

import math
import os
import zlib

import torch

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


def read_keys(tsv: str) -> list[tuple[str, str, list[int]]]:
    rows = []
    with open(os.path.join(FIXTURES, tsv)) as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            key, dtype, shape = line.rstrip("\n").split("\t")
            rows.append((key, dtype, [int(s) for s in shape.strip("[]").split(",") if s.strip()]))
    return rows


def tensor_for(key: str, shape: list[int], salt: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(f"{salt}:{key}".encode()))
    if key.endswith("running_var"):
        return 0.5 + torch.rand(shape, generator=g)
    if key.endswith("running_mean"):
        return 0.1 * torch.randn(shape, generator=g)
    if len(shape) <= 1:
        return (1.0 if key.endswith("weight") else 0.0) + 0.1 * torch.randn(shape, generator=g)
    return torch.randn(shape, generator=g) * math.sqrt(1 / math.prod(shape[1:]))


def reference_state_dict(tsv: str = "reference_checkpoint_keys.tsv", drop_prefix: str | None = None,
                         salt: int = 0) -> dict[str, torch.Tensor]:
    """Every key of ``tsv`` (minus those starting with ``drop_prefix``) with its rebuilt tensor."""
    out = {}
    for key, dtype, shape in read_keys(tsv):
        if drop_prefix and key.startswith(drop_prefix):
            continue
        out[key] = torch.zeros(shape, dtype=torch.int64) if dtype == "int64" else tensor_for(key, shape, salt)
    return out


def reference_cases() -> dict[str, torch.Tensor]:
    """The reference's outputs recorded in float64 (token ids stay int64)."""
    return torch.load(os.path.join(FIXTURES, "reference_outputs_f64.pt"), weights_only=True)


def reference_images(salt: int = 0) -> torch.Tensor:
    return torch.randn((2, 3, 416, 416), generator=torch.Generator().manual_seed(1000 + salt))
