"""The contract every invertible transform in medflow follows (FrEIA/zuko style)."""

from __future__ import annotations

import torch
from torch import nn


class InvertibleModule(nn.Module):
    """A bijection on 5D tensors [B, C, D, H, W].

    ``forward(x, cond=None)`` returns ``(y, logdet)`` with ``logdet`` of shape [B]
    (natural log of |det dy/dx| per sample); ``inverse(y, cond=None)`` returns ``x``
    exactly (up to float rounding). ``cond`` is optional conditioning features with the
    same spatial size as ``x``; transforms that do not use it ignore it.
    """

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None):  # pragma: no cover - interface
        raise NotImplementedError

    def inverse(self, y: torch.Tensor, cond: torch.Tensor | None = None):  # pragma: no cover - interface
        raise NotImplementedError


def spatial_size(x: torch.Tensor) -> int:
    """Number of voxels per channel of a [B, C, D, H, W] tensor."""
    return x.shape[2] * x.shape[3] * x.shape[4]
