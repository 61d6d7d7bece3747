"""torchrun-ready helpers: one process per device, NCCL on CUDA, gloo on CPU."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from .config import ConfigError


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
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name} is not a device: use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name} was asked for, but this machine has no usable CUDA device: "
                              "use --device cpu (or check the driver with nvidia-smi)")
        if device.index is None:
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                              f"numbered from 0")
    return device


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
