"""Covariate scale: a learned map of relative change per side channel, applied voxel-wise to the flow input."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medflow.flows.base import InvertibleModule
from medflow.flows.coupling import soft_clamp


class CovariateScale(InvertibleModule):
    """``y = o + (x - o) * exp(-e)`` for x [B, C, D, H, W], with ``e = sum_k side_k * map_k``
    [B, C, D, H, W] and ``o`` the ``origin`` the scale acts about.

    ``cond`` is the side vector [B, S] (standardised numbers and one-hot categories, see
    ``medflow.side``), not a spatial tensor; only its channels ``mapped`` (default: all) have maps,
    the sum runs over those. Each ``map_k`` [C, cells, cells, cells] is a learned
    log relative change of ``x - origin`` per unit of covariate k, spread over x's box by trilinear
    interpolation, so a covariate can act regionally (a diagnosis lowering uptake in some
    regions only) without any other input; ``e`` is soft-clamped to (-clamp, clamp).
    log|det dy/dx| = -sum(e). The maps start at zero: the transform starts as the identity.
    They are stored divided by ``GAIN`` (as Glow's zero-initialised layers store log-scales
    divided by 3), so that Adam, whose steps are about the learning rate per parameter, moves
    these few, weakly and noisily supervised parameters GAIN times further per step than the
    conv weights. For PET in model space (``medflow.preprocess``: uptake 0 at -0.5) the origin
    -0.5 makes ``e`` a log relative change of uptake, so ``e = -log(1 - f)`` removes a fraction f
    of it everywhere; about 0 (the default, the transform before ``origin`` existed) a map that
    lowers voxels above half the PET scale (grey matter) raises those below it (white matter, CSF).
    """

    GAIN = 10.0

    def __init__(self, channels: int, side_channels: int, cells: int, clamp: float = 2.0,
                 mapped: list[int] | None = None, origin: float = 0.0):
        super().__init__()
        self.clamp = clamp
        self.origin = origin
        self.mapped = list(range(side_channels)) if mapped is None else list(mapped)
        self.maps = nn.Parameter(torch.zeros(len(self.mapped), channels, cells, cells, cells))

    def log_scale(self, side: torch.Tensor, size: torch.Size) -> torch.Tensor:
        """``e`` [B, C, *size] for side [B, S]."""
        maps = F.interpolate(self.GAIN * self.maps, size=tuple(size), mode="trilinear", align_corners=True)
        return soft_clamp(torch.einsum("bs,scdhw->bcdhw", side[:, self.mapped].to(maps), maps), self.clamp)

    def forward(self, x, cond=None):
        e = self.log_scale(cond, x.shape[2:])
        return self.origin + (x - self.origin) * torch.exp(-e), -e.flatten(1).sum(1)

    def inverse(self, y, cond=None):
        return self.origin + (y - self.origin) * torch.exp(self.log_scale(cond, y.shape[2:]))
