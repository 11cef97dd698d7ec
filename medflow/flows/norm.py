"""Per-channel (instance) normalisation that keeps channels-last CPU volumes on a fast kernel."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PerChannelNorm(nn.GroupNorm):
    """``GroupNorm`` with one group per channel: each channel of each volume x [B, C, D, H, W] is
    normalised by its own mean and (population) variance over D, H, W, then scaled by ``weight``
    and shifted by ``bias`` [C] (MONAI's instance norm, the same parameters and state-dict keys).

    PyTorch's CPU group norm is slow on channels-last volumes (``device.place_model`` stores CPU
    models channels-last): a batch-1 channels-last float input on a CPU without autocast runs
    as a batch norm in training mode without running statistics, which for one volume is the
    same normalisation, on PyTorch's channels-last batch-norm kernel (forward and backward).
    Every other input runs ``GroupNorm`` unchanged.
    """

    def __init__(self, channels: int, eps: float = 1e-5, affine: bool = True, **factory):
        super().__init__(channels, channels, eps=eps, affine=affine, **factory)

    def _runs_as_batch_norm(self, x: torch.Tensor) -> bool:
        return (x.device.type == "cpu" and x.dim() == 5 and x.shape[0] == 1 and x.shape[2:].numel() > 1
                and x.is_contiguous(memory_format=torch.channels_last_3d) and x.is_floating_point()
                and not torch.is_autocast_enabled("cpu"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._runs_as_batch_norm(x):
            return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        return super().forward(x)
