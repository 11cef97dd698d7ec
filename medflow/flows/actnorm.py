"""Activation normalisation (Kingma & Dhariwal 2018) with data-dependent initialisation."""

from __future__ import annotations

import torch
from torch import nn

from medflow.flows.base import InvertibleModule, spatial_size


class ActNorm(InvertibleModule):
    """Per-channel affine map ``y = (x + bias) * exp(log_scale)``.

    On the first forward pass in training mode the bias and scale are set so that the
    batch has zero mean and unit variance per channel. The ``initialized`` buffer is part
    of the state dict, so a loaded model never re-initialises; the forward pass reads its
    Python mirror ``needs_initialization`` instead, because reading a GPU buffer would make
    the host wait for the device at every step. Channels with (near) zero variance, such as
    an all-background channel, are guarded by ``min_std`` instead of producing an infinite scale.
    """

    def __init__(self, channels: int, min_std: float = 1e-2):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1, 1))
        self.log_scale = nn.Parameter(torch.zeros(1, channels, 1, 1, 1))
        self.register_buffer("initialized", torch.tensor(False))
        self.needs_initialization = True
        self.min_std = min_std
        self.register_load_state_dict_post_hook(_mirror_loaded_flag)

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """Set bias/scale from a batch x [B, C, D, H, W]."""
        dims = (0, 2, 3, 4)
        mean = x.mean(dim=dims, keepdim=True)
        std = x.std(dim=dims, keepdim=True, unbiased=False).clamp_min(self.min_std)
        self.bias.copy_(-mean)
        self.log_scale.copy_(-torch.log(std))
        self.initialized.fill_(True)
        self.needs_initialization = False

    def forward(self, x, cond=None):
        if self.training and self.needs_initialization:
            self.initialize(x)
        y = (x + self.bias) * torch.exp(self.log_scale)
        logdet = self.log_scale.sum() * spatial_size(x)
        return y, logdet.expand(x.shape[0])

    def inverse(self, y, cond=None):
        return y * torch.exp(-self.log_scale) - self.bias


def _mirror_loaded_flag(module: ActNorm, incompatible_keys) -> None:
    """After ``load_state_dict``: the Python flag follows the loaded ``initialized`` buffer."""
    module.needs_initialization = not bool(module.initialized)
