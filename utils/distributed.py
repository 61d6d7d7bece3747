"""torchrun-ready helpers: one process per device, NCCL on CUDA, gloo on CPU."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn


def init_distributed(device: torch.device, backend: str = "auto") -> bool:
    """Join the process group torchrun describes (RANK / WORLD_SIZE / LOCAL_RANK); a plain
    ``python train.py`` runs as a single process. Returns whether it is distributed."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return False
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend)
    return True


def local_device(requested: str | None) -> torch.device:
    """``--device`` or CUDA when present, else CPU; under torchrun each process takes its local GPU."""
    name = requested or ("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for, but no CUDA device is available")
        if name == "cuda":
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(name)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over processes (a no-op alone)."""
    if is_distributed():
        values = values.clone()
        dist.all_reduce(values)
    return values


def all_gather_objects(obj) -> list:
    """Every process's ``obj``, in rank order (``[obj]`` alone)."""
    if not is_distributed():
        return [obj]
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module under DistributedDataParallel and torch.compile wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()
