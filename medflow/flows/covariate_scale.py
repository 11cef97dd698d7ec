"""Covariate scale: learned maps of relative change (one per side channel, and a static one),
applied voxel-wise to the flow input."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medflow.flows.base import InvertibleModule
from medflow.flows.coupling import soft_clamp


class CovariateScale(InvertibleModule):
    """``y = o + (x - o) * exp(-e)`` for x [B, C, D, H, W], with ``e = sum_k w_k * map_k``
    [B, C, D, H, W] and ``o`` the ``origin`` the scale acts about.

    ``cond`` is the side vector [B, S] (standardised numbers and one-hot categories, see
    ``medflow.side``; None where S is 0), not a spatial tensor. The weights ``w_k`` are its channels
    ``mapped`` (default: all) and, with ``static``, a constant 1 for a last map every sample shares.
    Each ``map_k`` [C, cells, cells, cells] is a learned log relative change of ``x - origin`` per
    unit of its weight, spread over x's box by trilinear interpolation, so a covariate can act
    regionally (a diagnosis lowering uptake in some regions only) without any other input, and the
    static map is a coarse atlas of uptake scale; ``e`` is soft-clamped to (-clamp, clamp).
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
                 mapped: list[int] | None = None, origin: float = 0.0, static: bool = False):
        super().__init__()
        self.clamp = clamp
        self.origin = origin
        self.static = static
        self.mapped = list(range(side_channels)) if mapped is None else list(mapped)
        self.maps = nn.Parameter(torch.zeros(len(self.mapped) + static, channels, cells, cells, cells))

    def log_scale(self, side: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        """``e`` [B, C, D, H, W] for side [B, S] (or None without mapped channels) and x like ``like``."""
        maps = F.interpolate(self.GAIN * self.maps, size=tuple(like.shape[2:]), mode="trilinear",
                             align_corners=True)
        weights = [side[:, self.mapped].to(maps)] if self.mapped else []
        if self.static:
            weights.append(maps.new_ones(like.shape[0], 1))
        return soft_clamp(torch.einsum("bs,scdhw->bcdhw", torch.cat(weights, dim=1), maps), self.clamp)

    def forward(self, x, cond=None):
        e = self.log_scale(cond, x)
        return self.origin + (x - self.origin) * torch.exp(-e), -e.flatten(1).sum(1)

    def inverse(self, y, cond=None):
        return self.origin + (y - self.origin) * torch.exp(self.log_scale(cond, y))
