"""Device selection and torch.distributed set-up (``torchrun``)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist

from medflow.errors import ResourceError


def place_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Move ``model`` to ``device``. On CPU its 5-D weights are also stored channels-last
    (NDHWC): oneDNN then runs medflow's 3-D convolutions in that layout, and their outputs
    follow it. On CUDA the layout is left as it is. Values are unchanged either way."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last_3d) if device.type == "cpu" else model


def resolve_device(name: str, local_rank: int = 0, world_size: int = 1) -> torch.device:
    """``auto`` -> CUDA when available else CPU; ``cuda`` -> the GPU of this process's local rank;
    ``cuda:N`` -> GPU N (one process only). An explicit GPU that is not there is an error."""
    if name not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", name):
        raise ResourceError(f"unknown device {name!r} (use auto, cpu, cuda or cuda:N)")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ResourceError(f"--device {name} requested but no CUDA GPU is available (use --device cpu)")
    if ":" in name and world_size > 1:
        raise ResourceError(f"--device {name}: under torchrun every process takes the GPU of its local rank; "
                            "give --device cuda")
    index = int(name.split(":")[1]) if ":" in name else local_rank
    count = torch.cuda.device_count()
    if index >= count:
        raise ResourceError(f"--device {name}: cuda:{index} is not there; this machine has {count} CUDA GPU(s)"
                            + (" (torchrun started more processes per node than that)" if ":" not in name else ""))
    return torch.device("cuda", index)


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
        torch.cuda.set_device(resolve_device(device_name, info.local_rank, world))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return info


def available_memory(device: torch.device) -> int:
    """Bytes the device can still give us (CUDA: free memory; CPU: MemAvailable)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def check_fits(voxels: int, width: int, device: torch.device, what: str) -> None:
    """Refuse work whose activations (about 8 live float32 tensors of voxels x width) exceed the device."""
    need = 8 * 4 * voxels * width
    have = available_memory(device)
    if need > have:
        raise ResourceError(
            f"{what}: needs about {need / 2**30:.1f} GiB on {device} but {have / 2**30:.1f} GiB is free; "
            "train with a coarser --spacing or a smaller --grid, or use --device cpu")
