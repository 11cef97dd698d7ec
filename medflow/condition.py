"""Condition encoder: multi-scale MRI features for the PET flow (cINN's h(x), SRFlow-style).

A small 3D U-Net: a down path at 1/2, 1/4, ... of the input resolution (one scale per flow
level) and an up path that brings coarse context back to every scale. Its outputs feed the
PET couplings and priors of the matching level; it is trained by the PET likelihood.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medflow.flows.conv import Conv3d


def _block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(Conv3d(cin, cout, 3, stride=stride, padding=1), nn.LeakyReLU(0.1, inplace=True),
                         Conv3d(cout, cout, 3, padding=1), nn.LeakyReLU(0.1, inplace=True))


def rms_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x [B, ...] divided by its root mean square over everything but the batch dimension:
    the same for x and k * x (k > 0), so a loss on the result cannot gain by rescaling x."""
    return x / x.pow(2).mean(dim=tuple(range(1, x.dim())), keepdim=True).add(eps).sqrt()


def mri_conditions(features: list[torch.Tensor], zs: list[torch.Tensor], coupling: bool, normalize: bool):
    """What the MRI flow's encoding gives the PET flow: per-level coupling conditions (its
    ``features``, or None without ``coupling``) and prior conditions (its latents ``zs``), each
    ``rms_normalize``d with ``normalize``."""
    scale = rms_normalize if normalize else (lambda t: t)
    return ([scale(f) for f in features] if coupling else None), [scale(z) for z in zs]


class ConditionEncoder(nn.Module):
    """mri [B, C, D, H, W] -> features[i] [B, width, D/2^(i+1), H/2^(i+1), W/2^(i+1)], i < levels."""

    def __init__(self, in_channels: int, width: int, levels: int):
        super().__init__()
        self.down = nn.ModuleList(_block(in_channels if i == 0 else width, width, stride=2) for i in range(levels))
        self.up = nn.ModuleList(_block(2 * width, width) for _ in range(levels - 1))

    def forward(self, mri: torch.Tensor) -> list[torch.Tensor]:
        skips, h = [], mri
        for block in self.down:
            h = block(h)
            skips.append(h)
        features = [skips[-1]]
        for i in reversed(range(len(self.up))):
            coarse = F.interpolate(features[0], size=skips[i].shape[2:], mode="trilinear", align_corners=False)
            features.insert(0, self.up[i](torch.cat([skips[i], coarse], dim=1)))
        return features
