"""Conditional affine transform (SRFlow's affine injector) applied voxel-wise to the flow input."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from medflow.errors import ModelError
from medflow.flows.base import InvertibleModule
from medflow.flows.coupling import coupling_subnet, soft_clamp


INJECTOR_NETS = ("conv", "unet")
UNET_MIN_AXIS = 32  # BasicUNet pools 4 times and normalises each channel of the coarsest grid


def per_channel_group_norm(net: nn.Module) -> nn.Module:
    """``net`` with every ``InstanceNorm3d`` replaced, in place, by a ``GroupNorm`` with one group per
    channel: the same normalisation (per volume and channel), parameters and state-dict keys. PyTorch's
    instance norm copies a channels-last input to contiguous and back (``device.place_model``
    stores CPU models channels-last); its group norm keeps the layout."""
    for name, child in net.named_children():
        if isinstance(child, nn.InstanceNorm3d):
            if child.track_running_stats:
                raise ModelError(f"{name}: an instance norm with running statistics has no group-norm equivalent")
            like = {"device": child.weight.device, "dtype": child.weight.dtype} if child.affine else {}
            norm = nn.GroupNorm(child.num_features, child.num_features, eps=child.eps, affine=child.affine, **like)
            norm.load_state_dict(child.state_dict())
            setattr(net, name, norm)
        else:
            per_channel_group_norm(child)
    return net


def injector_subnet(kind: str, in_channels: int, hidden: int, out_channels: int) -> nn.Module:
    """The injector's net, last layer zero. ``conv``: the coupling subnet (3x3x3 -> 1x1x1 -> 3x3x3,
    5 voxels across its receptive field). ``unet``: MONAI's ``BasicUNet`` with features
    (h, h, 2h, 4h, 8h, h) for h = ``hidden``, four 2x poolings, so ``mu`` can follow regional
    patterns across the volume; every axis needs at least ``UNET_MIN_AXIS`` voxels. Its instance
    norms run as ``per_channel_group_norm``."""
    if kind == "conv":
        return coupling_subnet(in_channels, hidden, out_channels)
    from monai.networks.nets import BasicUNet

    features = (hidden, hidden, 2 * hidden, 4 * hidden, 8 * hidden, hidden)
    net = per_channel_group_norm(BasicUNet(3, in_channels, out_channels, features=features))
    nn.init.zeros_(net.final_conv.weight)
    nn.init.zeros_(net.final_conv.bias)
    return net


class ConditionalAffine(InvertibleModule):
    """``y = (x - mu(c)) * exp(-log_s(c))`` for x [B, C, D, H, W] and c [B, Cc, D, H, W].

    ``mu`` and ``log_s`` (soft-clamped) come from a 3D conv net (``injector_subnet``) on the
    condition alone, so the map is invertible for any x; log|det dy/dx| = -sum(log_s).
    The net's last layer starts at zero: the transform starts as the identity. In a
    conditional flow, ``mu`` becomes an estimate of x from c and the rest of the flow
    models the residual. With ``recompute`` the net's activations are not kept for the
    backward pass but recomputed from ``c`` (``torch.utils.checkpoint``).
    """

    def __init__(self, channels: int, cond_channels: int, hidden: int, clamp: float = 2.0, net: str = "conv"):
        super().__init__()
        self.channels = channels
        self.clamp = clamp
        self.kind = net
        self.net = injector_subnet(net, cond_channels, hidden, 2 * channels)
        self.recompute = False

    def params(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Shift ``mu`` and log-scale ``log_s``, each [B, C, D, H, W]."""
        if self.kind == "unet" and min(cond.shape[2:]) < UNET_MIN_AXIS:
            raise ModelError(f"the U-Net injector needs at least {UNET_MIN_AXIS} voxels per axis, "
                             f"got a {'x'.join(map(str, cond.shape[2:]))} grid")
        if self.recompute and torch.is_grad_enabled():
            out = checkpoint(self.net, cond, use_reentrant=False)
        else:
            out = self.net(cond)
        return out[:, : self.channels], soft_clamp(out[:, self.channels :], self.clamp)

    def forward(self, x, cond=None):
        mu, log_s = self.params(cond)
        return (x - mu) * torch.exp(-log_s), -log_s.flatten(1).sum(1)

    def inverse(self, y, cond=None):
        return self.inverse_from(y, *self.params(cond))

    @staticmethod
    def inverse_from(y: torch.Tensor, mu: torch.Tensor, log_s: torch.Tensor) -> torch.Tensor:
        """The inverse with ``params`` already computed: several draws for one condition run the net once."""
        return y * torch.exp(log_s) + mu
