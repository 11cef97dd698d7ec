"""Activation normalisation (Kingma & Dhariwal 2018) with data-dependent initialisation."""

from __future__ import annotations

import torch
from torch import nn

from medflow.flows.base import InvertibleModule, spatial_size


class ActNorm(InvertibleModule):
    """Per-channel affine map ``y = (x + bias) * exp(log_scale)``.

    On the first forward pass in training mode the bias and scale are set so that the
    batch has zero mean and unit variance per channel. The ``initialized`` buffer is part
    of the state dict, so a loaded model never re-initialises. Channels with (near) zero
    variance, such as an all-background channel, are guarded by ``min_std`` instead of
    producing an infinite scale.
    """

    def __init__(self, channels: int, min_std: float = 1e-2):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1, 1))
        self.log_scale = nn.Parameter(torch.zeros(1, channels, 1, 1, 1))
        self.register_buffer("initialized", torch.tensor(False))
        self.min_std = min_std

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """Set bias/scale from a batch x [B, C, D, H, W]."""
        dims = (0, 2, 3, 4)
        mean = x.mean(dim=dims, keepdim=True)
        std = x.std(dim=dims, keepdim=True, unbiased=False).clamp_min(self.min_std)
        self.bias.copy_(-mean)
        self.log_scale.copy_(-torch.log(std))
        self.initialized.fill_(True)

    def forward(self, x, cond=None):
        if self.training and not bool(self.initialized):
            self.initialize(x)
        y = (x + self.bias) * torch.exp(self.log_scale)
        logdet = self.log_scale.sum() * spatial_size(x)
        return y, logdet.expand(x.shape[0])

    def inverse(self, y, cond=None):
        return y * torch.exp(-self.log_scale) - self.bias
