"""Gradient reversal (Ganin & Lempitsky 2015) and the side-information discriminators of Dual-Glow.

Each discriminator predicts the side vector from one lower-level PET latent. Its input
passes through a gradient-reversal layer, so while the discriminator learns to predict,
the flow is pushed to remove side information from that level: the covariates then
act only through the top level's prior.

The game is kept bounded, or the flow wins it by inflating its latents until training
diverges: the discriminator sees the latent divided by its root mean square (per sample,
so scaling the latent changes nothing), and its predictions are squashed into +-BOUND.
"""

from __future__ import annotations

import torch
from torch import nn

from medflow.condition import rms_normalize
from medflow.flows.conv import Conv3d
from medflow.gradient import scale_gradient

BOUND = 3.0  # largest absolute prediction: standardised numbers and one-hot categories lie well inside


def grad_reverse(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Identity forward; multiplies the gradient by -scale backward."""
    return scale_gradient(x, -scale)


class SideDiscriminator(nn.Module):
    """z [B, C, D, H, W] -> predicted side vector [B, side_channels], each value in (-BOUND, BOUND)."""

    def __init__(self, channels: int, side_channels: int, hidden: int = 16):
        super().__init__()
        self.net = nn.Sequential(Conv3d(channels, hidden, 3, padding=1), nn.LeakyReLU(0.1),
                                 nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(hidden, side_channels))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = grad_reverse(z)
        return BOUND * torch.tanh(self.net(rms_normalize(z)) / BOUND)
