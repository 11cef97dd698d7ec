"""Conditional affine transform (SRFlow's affine injector) applied voxel-wise to the flow input."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from medflow.errors import ModelError
from medflow.flows.base import InvertibleModule
from medflow.flows.coupling import coupling_subnet, soft_clamp


INJECTOR_NETS = ("conv", "unet")
UNET_MIN_AXIS = 32  # BasicUNet pools 4 times and instance-normalises the coarsest grid


def injector_subnet(kind: str, in_channels: int, hidden: int, out_channels: int) -> nn.Module:
    """The injector's net, last layer zero. ``conv``: the coupling subnet (3x3x3 -> 1x1x1 -> 3x3x3,
    5 voxels across its receptive field). ``unet``: MONAI's ``BasicUNet`` with features
    (h, h, 2h, 4h, 8h, h) for h = ``hidden``, four 2x poolings, so ``mu`` can follow regional
    patterns across the volume; every axis needs at least ``UNET_MIN_AXIS`` voxels."""
    if kind == "conv":
        return coupling_subnet(in_channels, hidden, out_channels)
    from monai.networks.nets import BasicUNet

    features = (hidden, hidden, 2 * hidden, 4 * hidden, 8 * hidden, hidden)
    net = BasicUNet(3, in_channels, out_channels, features=features)
    nn.init.zeros_(net.final_conv.weight)
    nn.init.zeros_(net.final_conv.bias)
    return net


class ConditionalAffine(InvertibleModule):
    """``y = (x - mu) * exp(-log_s)`` for x [B, C, D, H, W], a condition c [B, Cc, D, H, W] and
    optional covariates v [B, K] (side information: the one-hot categories of ``medflow.side``).

    ``[mu, log_s] = f_0(c) + sum_k v_k f_k(c)``, where the 3D conv net ``injector_subnet`` on the
    condition alone outputs ``f_0`` and one effect ``f_k`` per covariate (``log_s`` soft-clamped
    after the sum), so the map is invertible for any x and log|det dy/dx| = -sum(log_s). The
    covariates enter after the net, linearly: a diagnosis changes the PET where the net, which sees
    the anatomy, puts its effect (the U-Net's instance normalisation would remove covariates fed
    in as constant input channels, all but their effect at the borders). The net's last layer
    starts at zero: the transform starts as the identity. In a conditional flow, ``mu`` becomes
    an estimate of x from c (and v) and the rest of the flow models the residual. With
    ``recompute`` the net's activations are not kept for the backward pass but recomputed from
    ``c`` (``torch.utils.checkpoint``).
    """

    def __init__(self, channels: int, cond_channels: int, hidden: int, clamp: float = 2.0, net: str = "conv",
                 covariates: int = 0):
        super().__init__()
        self.channels = channels
        self.covariates = covariates
        self.clamp = clamp
        self.kind = net
        self.net = injector_subnet(net, cond_channels, hidden, 2 * channels * (1 + covariates))
        self.recompute = False

    def params(self, cond: torch.Tensor, covariates: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Shift ``mu`` and log-scale ``log_s``, each [B, C, D, H, W]; ``covariates`` [B, K]."""
        if self.kind == "unet" and min(cond.shape[2:]) < UNET_MIN_AXIS:
            raise ModelError(f"the U-Net injector needs at least {UNET_MIN_AXIS} voxels per axis, "
                             f"got a {'x'.join(map(str, cond.shape[2:]))} grid")
        if self.covariates and (covariates is None or tuple(covariates.shape) != (cond.shape[0], self.covariates)):
            raise ModelError(f"this injector needs covariates of shape [{cond.shape[0]}, {self.covariates}], got "
                             f"{None if covariates is None else list(covariates.shape)}")
        if self.recompute and torch.is_grad_enabled():
            out = checkpoint(self.net, cond, use_reentrant=False)
        else:
            out = self.net(cond)
        if self.covariates:
            width = 2 * self.channels
            effects = out[:, width:].unflatten(1, (self.covariates, width))
            out = out[:, :width] + torch.einsum("bk,bkcdhw->bcdhw", covariates.to(out), effects)
        return out[:, : self.channels], soft_clamp(out[:, self.channels :], self.clamp)

    def forward(self, x, cond=None, covariates=None):
        mu, log_s = self.params(cond, covariates)
        return (x - mu) * torch.exp(-log_s), -log_s.flatten(1).sum(1)

    def inverse(self, y, cond=None, covariates=None):
        return self.inverse_from(y, *self.params(cond, covariates))

    @staticmethod
    def inverse_from(y: torch.Tensor, mu: torch.Tensor, log_s: torch.Tensor) -> torch.Tensor:
        """The inverse with ``params`` already computed: several draws for one condition run the net once."""
        return y * torch.exp(log_s) + mu
