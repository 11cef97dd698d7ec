"""Invertible 2x downsampling: space-to-depth squeeze and the orthonormal 3D Haar transform."""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

from medflow.flows.base import InvertibleModule


def _check_even(x: torch.Tensor) -> None:
    if any(s % 2 for s in x.shape[2:]):
        raise ValueError(f"spatial size {tuple(x.shape[2:])} must be divisible by 2 at every level")


class Squeeze3d(InvertibleModule):
    """[B, C, D, H, W] -> [B, 8C, D/2, H/2, W/2] by moving each 2x2x2 block into channels. log-det 0."""

    def forward(self, x, cond=None):
        _check_even(x)
        b, c, d, h, w = x.shape
        y = x.view(b, c, d // 2, 2, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 7, 2, 4, 6)
        return y.reshape(b, c * 8, d // 2, h // 2, w // 2), x.new_zeros(b)

    def inverse(self, y, cond=None):
        b, c8, d, h, w = y.shape
        c = c8 // 8
        x = y.view(b, c, 2, 2, 2, d, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
        return x.reshape(b, c, d * 2, h * 2, w * 2)


def haar_filters(dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """The 8 orthonormal 2x2x2 Haar filters, shape [8, 1, 2, 2, 2], built at full precision in ``dtype``."""
    low = torch.tensor([1.0, 1.0], dtype=dtype, device=device) / math.sqrt(2.0)
    high = torch.tensor([1.0, -1.0], dtype=dtype, device=device) / math.sqrt(2.0)
    filters = [
        torch.einsum("i,j,k->ijk", a, b, c) for a, b, c in itertools.product((low, high), repeat=3)
    ]
    return torch.stack(filters).unsqueeze(1)


class HaarDownsample3d(InvertibleModule):
    """[B, C, D, H, W] -> [B, 8C, D/2, H/2, W/2] with the orthonormal 3D Haar wavelet.

    The first of each channel's 8 outputs is the (scaled) local mean, the other 7 are
    detail bands. The transform is orthogonal, so log-det is 0 and the inverse is its
    transpose.
    """

    def _weight(self, channels: int, like: torch.Tensor) -> torch.Tensor:
        return haar_filters(like.dtype, like.device).repeat(channels, 1, 1, 1, 1)

    def forward(self, x, cond=None):
        _check_even(x)
        c = x.shape[1]
        return F.conv3d(x, self._weight(c, x), stride=2, groups=c), x.new_zeros(x.shape[0])

    def inverse(self, y, cond=None):
        c = y.shape[1] // 8
        return F.conv_transpose3d(y, self._weight(c, y), stride=2, groups=c)
