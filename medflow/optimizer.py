"""AdamW on PyTorch's fused kernel, which torch (>= 2.4, setup.cfg asks >= 2.5) has for CPU and
CUDA tensors, the two devices medflow runs on.

The fused kernel updates every parameter in one pass without the foreach path's temporaries; the
update is the same AdamW to float rounding. Trainer, benchmarks and baselines build their
optimiser here, so they step alike.
"""

from __future__ import annotations

import torch


def adamw(params, **options) -> torch.optim.AdamW:
    """``torch.optim.AdamW(params, fused=True, **options)``; ``params``: tensors or parameter groups."""
    return torch.optim.AdamW(params, fused=True, **options)


def with_kernel_of(saved: dict, optimizer: torch.optim.Optimizer) -> dict:
    """Optimiser state ``saved`` (``state_dict()``) with each parameter group's kernel choice
    (``fused``, ``foreach``) replaced by ``optimizer``'s. ``load_state_dict`` keeps the saved
    groups' choice, so a state saved on the default AdamW (runs from before this module) would
    otherwise resume on it."""
    kernel = {key: optimizer.param_groups[0][key] for key in ("fused", "foreach")}
    return {**saved, "param_groups": [{**group, **kernel} for group in saved["param_groups"]]}
