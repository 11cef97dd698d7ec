"""Invertible 1x1x1 convolution with an LU parametrisation (Glow, section 3.2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medflow.flows.base import InvertibleModule, spatial_size


class InvConv1x1x1(InvertibleModule):
    """Channel mixing ``y = W x`` at every voxel with ``W = P L (U + diag(s))``.

    P is a fixed permutation (stored as the row order ``perm``), L unit lower-triangular,
    U strictly upper-triangular and ``s = sign * exp(log_s)``, so ``log|det W| = sum(log_s)``
    costs O(C). L and U share one C x C parameter ``lu`` (strict lower and strict upper
    triangle; its diagonal is unused). Initialised from a random orthogonal matrix. When a
    batch has fewer voxels than channels (the top levels of a large model) the forward pass
    applies ``U + diag(s)`` and then ``P L`` to the voxels instead of forming W, which would
    cost C^3. In eval mode the inverse matrix is cached until a parameter changes.
    """

    def __init__(self, channels: int):
        super().__init__()
        q = torch.linalg.qr(torch.randn(channels, channels, dtype=torch.float64))[0]
        p, lower, upper = torch.linalg.lu(q)
        s = torch.diagonal(upper)
        self.register_buffer("perm", p.argmax(dim=1))
        self.register_buffer("sign_s", torch.sign(s).float())
        self.lu = nn.Parameter((torch.tril(lower, -1) + torch.triu(upper, 1)).float())
        self.log_s = nn.Parameter(torch.log(torch.abs(s)).float())
        self._inverse_cache: tuple[tuple, torch.Tensor] | None = None
        self._register_load_state_dict_pre_hook(_from_separate_factors)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(P L, U + diag(s))``, each C x C; their product is W."""
        eye = torch.eye(self.lu.shape[0], device=self.lu.device, dtype=self.lu.dtype)
        lower = (torch.tril(self.lu, -1) + eye)[self.perm]
        upper = torch.triu(self.lu, 1) + torch.diag(self.sign_s * torch.exp(self.log_s))
        return lower, upper

    def weight(self) -> torch.Tensor:
        """The C x C mixing matrix W."""
        lower, upper = self.factors()
        return lower @ upper

    def inverse_weight(self) -> torch.Tensor:
        """W^-1, computed in float64; cached in eval mode."""
        key = tuple((p._version, p.data_ptr()) for p in (self.lu, self.log_s))
        if not self.training and self._inverse_cache is not None and self._inverse_cache[0] == key:
            return self._inverse_cache[1]
        w_inv = torch.linalg.inv(self.weight().double()).to(self.lu.dtype)
        if not self.training:
            w_inv = w_inv.detach()
            self._inverse_cache = (key, w_inv)
        return w_inv

    def forward(self, x, cond=None):
        channels = self.lu.shape[0]
        if x.shape[0] * spatial_size(x) < channels:
            lower, upper = self.factors()
            y = _mix(_mix(x, upper), lower)
        else:
            y = _mix(x, self.weight())
        logdet = self.log_s.sum() * spatial_size(x)
        return y, logdet.expand(x.shape[0])

    def inverse(self, y, cond=None):
        return _mix(y, self.inverse_weight())


def _mix(x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """``matrix`` [C_out, C_in] applied to the channels of x [B, C_in, D, H, W] at every voxel."""
    return F.conv3d(x, matrix.view(*matrix.shape, 1, 1, 1))


def _from_separate_factors(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                           error_msgs) -> None:
    """Load checkpoints written before ``lu`` existed (they kept ``lower`` and ``upper`` as two
    C x C parameters, a mask, and P as a matrix): rewrite their entries in place."""
    if prefix + "lower" not in state_dict:
        return
    lower, upper = state_dict.pop(prefix + "lower"), state_dict.pop(prefix + "upper")
    state_dict.pop(prefix + "lower_mask", None)
    state_dict[prefix + "lu"] = torch.tril(lower, -1) + torch.triu(upper, 1)
    state_dict[prefix + "perm"] = state_dict[prefix + "perm"].argmax(dim=1)
