"""Device selection and torch.distributed set-up (``torchrun``)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from medflow.errors import ResourceError


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> CUDA when available else CPU; an explicit ``cuda`` without a GPU is an error."""
    if name not in ("auto", "cpu", "cuda") and not name.startswith("cuda:"):
        raise ResourceError(f"unknown device {name!r} (use auto, cpu or cuda)")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ResourceError(f"--device {name} requested but no CUDA GPU is available (use --device cpu)")
    return torch.device(name if ":" in name else f"cuda:{local_rank}")


@dataclass
class Distributed:
    """This process's place in a torchrun job (world_size 1 when run directly)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> Distributed:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    info = Distributed(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), world)
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(info.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return info
