"""Conditional diagonal Gaussian priors for flow latents."""

from __future__ import annotations

import math

import torch
from torch import nn

from medflow.flows.conv import Conv3d
from medflow.flows.coupling import soft_clamp

LOG_2PI = math.log(2.0 * math.pi)


class GaussianPrior(nn.Module):
    """p(z | c) = N(mu(c), diag(sigma(c)^2)) for z [B, C, D, H, W] and c [B, Cc, D, H, W].

    ``mu`` and ``log sigma`` come from a small 3x3x3 conv net on ``c`` whose last layer
    starts at zero, so the prior starts as N(0, I). With ``learn_scale=False`` only the
    mean is predicted and sigma = 1 (as in the Dual-Glow authors' code). With
    ``cond_channels=0`` the prior is the fixed standard normal.
    """

    def __init__(self, channels: int, cond_channels: int, hidden: int, learn_scale: bool = True,
                 max_log_scale: float = 3.0):
        super().__init__()
        self.channels = channels
        self.learn_scale = learn_scale
        self.max_log_scale = max_log_scale
        self.net = None
        if cond_channels > 0:
            out = Conv3d(hidden, channels * (2 if learn_scale else 1), 3, padding=1)
            nn.init.zeros_(out.weight)
            nn.init.zeros_(out.bias)
            self.net = nn.Sequential(Conv3d(cond_channels, hidden, 3, padding=1), nn.ReLU(inplace=True), out)

    def params(self, cond: torch.Tensor | None, shape: torch.Size, device: torch.device):
        """Mean and log-sigma, each of ``shape`` [B, C, D, H, W], on ``device``."""
        if self.net is None:
            zeros = torch.zeros(shape, device=device)
            return zeros, zeros
        out = self.net(cond)
        if not self.learn_scale:
            return out, torch.zeros_like(out)
        mean, raw = out[:, 0::2], out[:, 1::2]
        return mean, soft_clamp(raw, self.max_log_scale)

    def log_prob(self, z: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        """log p(z | cond) in nats, summed per sample: shape [B]."""
        mean, log_sigma = self.params(cond, z.shape, z.device)
        mean, log_sigma = mean.to(z.dtype), log_sigma.to(z.dtype)
        lp = -0.5 * (LOG_2PI + 2.0 * log_sigma + ((z - mean) * torch.exp(-log_sigma)) ** 2)
        return lp.flatten(1).sum(1)

    def sample(self, cond: torch.Tensor | None, shape: torch.Size, temperature: float,
               device: torch.device, generator: torch.Generator | None = None, mirror: bool = False) -> torch.Tensor:
        """z = mu + T * sigma * eps, eps ~ N(0, I) drawn from ``generator``; T = 0 gives the mean.
        ``mirror``: use -eps instead (the antithetic partner of the draw from the same generator state)."""
        mean, log_sigma = self.params(cond, shape, device)
        if temperature == 0:
            return mean
        eps_device = generator.device if generator is not None else device
        eps = torch.randn(shape, generator=generator, device=eps_device, dtype=mean.dtype).to(device)
        return mean + (-temperature if mirror else temperature) * torch.exp(log_sigma) * eps
