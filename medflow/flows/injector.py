"""Conditional affine transform (SRFlow's affine injector) applied voxel-wise to the flow input."""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from medflow.flows.base import InvertibleModule
from medflow.flows.coupling import coupling_subnet, soft_clamp


class ConditionalAffine(InvertibleModule):
    """``y = (x - mu(c)) * exp(-log_s(c))`` for x [B, C, D, H, W] and c [B, Cc, D, H, W].

    ``mu`` and ``log_s`` (soft-clamped) come from a 3D conv net (the coupling subnet) on the
    condition alone, so the map is invertible for any x; log|det dy/dx| = -sum(log_s).
    The net's last layer starts at zero: the transform starts as the identity. In a
    conditional flow, ``mu`` becomes an estimate of x from c and the rest of the flow
    models the residual. With ``recompute`` the net's activations are not kept for the
    backward pass but recomputed from ``c`` (``torch.utils.checkpoint``).
    """

    def __init__(self, channels: int, cond_channels: int, hidden: int, clamp: float = 2.0):
        super().__init__()
        self.channels = channels
        self.clamp = clamp
        self.net = coupling_subnet(cond_channels, hidden, 2 * channels)
        self.recompute = False

    def params(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Shift ``mu`` and log-scale ``log_s``, each [B, C, D, H, W]."""
        if self.recompute and torch.is_grad_enabled():
            out = checkpoint(self.net, cond, use_reentrant=False)
        else:
            out = self.net(cond)
        return out[:, : self.channels], soft_clamp(out[:, self.channels :], self.clamp)

    def forward(self, x, cond=None):
        mu, log_s = self.params(cond)
        return (x - mu) * torch.exp(-log_s), -log_s.flatten(1).sum(1)

    def inverse(self, y, cond=None):
        mu, log_s = self.params(cond)
        return y * torch.exp(log_s) + mu
