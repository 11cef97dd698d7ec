"""Invertible 1x1x1 convolution with an LU parametrisation (Glow, section 3.2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medflow.flows.base import InvertibleModule, spatial_size


class InvConv1x1x1(InvertibleModule):
    """Channel mixing ``y = W x`` at every voxel with ``W = P L (U + diag(s))``.

    P is a fixed permutation, L unit lower-triangular, U strictly upper-triangular and
    ``s = sign * exp(log_s)``, so ``log|det W| = sum(log_s)`` costs O(C). Initialised
    from a random orthogonal matrix. In eval mode the inverse matrix is cached until a
    parameter changes.
    """

    def __init__(self, channels: int):
        super().__init__()
        q = torch.linalg.qr(torch.randn(channels, channels, dtype=torch.float64))[0]
        p, lower, upper = torch.linalg.lu(q)
        s = torch.diagonal(upper)
        self.register_buffer("perm", p.float())
        self.register_buffer("sign_s", torch.sign(s).float())
        self.register_buffer("lower_mask", torch.tril(torch.ones(channels, channels), -1))
        self.lower = nn.Parameter(lower.float())
        self.upper = nn.Parameter(torch.triu(upper, 1).float())
        self.log_s = nn.Parameter(torch.log(torch.abs(s)).float())
        self._inverse_cache: tuple[tuple, torch.Tensor] | None = None

    def weight(self) -> torch.Tensor:
        """The C x C mixing matrix W."""
        eye = torch.eye(self.lower.shape[0], device=self.lower.device, dtype=self.lower.dtype)
        lower = self.lower * self.lower_mask + eye
        upper = self.upper * self.lower_mask.T + torch.diag(self.sign_s * torch.exp(self.log_s))
        return self.perm @ lower @ upper

    def inverse_weight(self) -> torch.Tensor:
        """W^-1, computed in float64; cached in eval mode."""
        key = tuple((p._version, p.data_ptr()) for p in (self.lower, self.upper, self.log_s))
        if not self.training and self._inverse_cache is not None and self._inverse_cache[0] == key:
            return self._inverse_cache[1]
        w_inv = torch.linalg.inv(self.weight().double()).to(self.lower.dtype)
        if not self.training:
            w_inv = w_inv.detach()
            self._inverse_cache = (key, w_inv)
        return w_inv

    def forward(self, x, cond=None):
        w = self.weight()
        y = F.conv3d(x, w.view(*w.shape, 1, 1, 1))
        logdet = self.log_s.sum() * spatial_size(x)
        return y, logdet.expand(x.shape[0])

    def inverse(self, y, cond=None):
        w_inv = self.inverse_weight()
        return F.conv3d(y, w_inv.view(*w_inv.shape, 1, 1, 1))
