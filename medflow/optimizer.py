"""AdamW on PyTorch's fused kernel where this torch has one for the parameters' device.

The fused kernel updates every parameter in one pass without the foreach path's temporaries
(CPU kernels since torch 2.4, CUDA since 2.0); the update is the same AdamW to float rounding.
Trainer, benchmarks and baselines build their optimiser here, so they step alike.
"""

from __future__ import annotations

import torch


def adamw(params, **options) -> torch.optim.AdamW:
    """``torch.optim.AdamW(params, **options)``, fused when the parameters' device has the kernel
    in this torch, PyTorch's default otherwise. ``params``: tensors or parameter groups."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, fused=True, **options)
    except RuntimeError:  # torch < 2.4 on a CPU: "fused=True requires ... supported devices"
        return torch.optim.AdamW(params, **options)


def with_kernel_of(saved: dict, optimizer: torch.optim.Optimizer) -> dict:
    """Optimiser state ``saved`` (``state_dict()``) with each parameter group's kernel choice
    (``fused``, ``foreach``) replaced by ``optimizer``'s, so that loading it resumes on the kernel
    this machine has rather than the one the saving machine had."""
    kernel = {key: optimizer.param_groups[0][key] for key in ("fused", "foreach")}
    return {**saved, "param_groups": [{**group, **kernel} for group in saved["param_groups"]]}
