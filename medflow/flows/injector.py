"""Conditional affine transform (SRFlow's affine injector) applied voxel-wise to the flow input."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from medflow.errors import ModelError
from medflow.flows.base import InvertibleModule
from medflow.flows.conv import Conv3d
from medflow.flows.coupling import coupling_subnet, soft_clamp
from medflow.flows.norm import PerChannelNorm
from medflow.gradient import scale_gradient


INJECTOR_NETS = ("conv", "unet")
UNET_MIN_AXIS = 32  # BasicUNet pools 4 times and normalises each channel of the coarsest grid


def _replace_modules(net: nn.Module, kind: type, convert) -> nn.Module:
    """``net`` with every submodule of exactly type ``kind`` replaced, in place, by
    ``convert(name, module)``."""
    for name, child in net.named_children():
        if type(child) is kind:
            setattr(net, name, convert(name, child))
        else:
            _replace_modules(child, kind, convert)
    return net


def _per_channel_norm_like(name: str, norm: nn.InstanceNorm3d) -> PerChannelNorm:
    """A ``PerChannelNorm`` with ``norm``'s settings, device, dtype and weights."""
    if norm.track_running_stats:
        raise ModelError(f"{name}: an instance norm with running statistics has no group-norm equivalent")
    like = {"device": norm.weight.device, "dtype": norm.weight.dtype} if norm.affine else {}
    per_channel = PerChannelNorm(norm.num_features, eps=norm.eps, affine=norm.affine, **like)
    per_channel.load_state_dict(norm.state_dict())
    return per_channel


def per_channel_norms(net: nn.Module) -> nn.Module:
    """``net`` with every ``InstanceNorm3d`` replaced, in place, by a ``PerChannelNorm``: the same
    normalisation (per volume and channel), parameters and state-dict keys. PyTorch's instance norm
    copies a channels-last input to contiguous and back (``device.place_model`` stores CPU models
    channels-last); ``PerChannelNorm`` keeps the layout."""
    return _replace_modules(net, nn.InstanceNorm3d, _per_channel_norm_like)


def onednn_convolutions(net: nn.Module) -> nn.Module:
    """``net`` with every ``torch.nn.Conv3d`` replaced, in place, by ``medflow.flows.conv.Conv3d``
    (same weights and state-dict keys), whose batch-1 CPU convolutions stay on oneDNN where
    PyTorch would use im2col: in a U-Net, the coarse levels."""
    return _replace_modules(net, nn.Conv3d, lambda name, conv: Conv3d.like(conv))


class RecomputedUnit(nn.Sequential):
    """A convolution -> norm -> activation unit (MONAI's ``Convolution``, the same children) that,
    with ``recompute``, keeps only its input for the backward pass and recomputes the rest then
    (``torch.utils.checkpoint``): a U-Net's full-resolution units hold most of its activations, and
    recomputing them one unit at a time keeps the backward's peak low, where recomputing the whole
    net at once would hold them all again."""

    def __init__(self, unit: nn.Sequential):
        super().__init__(OrderedDict(unit.named_children()))
        self.recompute = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.recompute and torch.is_grad_enabled():
            return checkpoint(super().forward, x, use_reentrant=False)
        return super().forward(x)


def recomputable_units(net: nn.Module) -> nn.Module:
    """``net`` with every MONAI ``Convolution`` unit replaced, in place, by a ``RecomputedUnit``
    (same modules and state-dict keys; recomputation off)."""
    from monai.networks.blocks import Convolution

    return _replace_modules(net, Convolution, lambda name, unit: RecomputedUnit(unit))


def unet_with_medflow_layers(net: nn.Module) -> nn.Module:
    """A MONAI U-Net with the layers medflow runs it with (``per_channel_norms``,
    ``onednn_convolutions``, ``recomputable_units``): the same function and parameters, in place."""
    return recomputable_units(onednn_convolutions(per_channel_norms(net)))


def injector_subnet(kind: str, in_channels: int, hidden: int, out_channels: int) -> nn.Module:
    """The injector's net, its ``out_channels`` the mean's then the log-scale's (equal halves).
    ``conv``: the coupling subnet (3x3x3 -> 1x1x1 -> 3x3x3, 5 voxels across its receptive field),
    last layer zero. ``unet``: MONAI's ``BasicUNet`` with features (h, h, 2h, 4h, 8h, h) for h =
    ``hidden``, four 2x poolings, so ``mu`` can follow regional patterns across the volume; every
    axis needs at least ``UNET_MIN_AXIS`` voxels. It runs with ``unet_with_medflow_layers``; its
    last layer keeps PyTorch's initialisation for the mean, as the regression U-Net it is would
    start, so every layer of the mean's net learns from the first step (zero weights there would
    leave the layers below without a gradient until they grow), and is zero for the log-scale."""
    if kind == "conv":
        return coupling_subnet(in_channels, hidden, out_channels)
    from monai.networks.nets import BasicUNet

    features = (hidden, hidden, 2 * hidden, 4 * hidden, 8 * hidden, hidden)
    net = unet_with_medflow_layers(BasicUNet(3, in_channels, out_channels, features=features))
    with torch.no_grad():
        net.final_conv.weight[out_channels // 2 :].zero_()
        net.final_conv.bias[out_channels // 2 :].zero_()
    return net


class ConditionalAffine(InvertibleModule):
    """``y = (x - mu(c)) * exp(-log_s(c))`` for x [B, C, D, H, W] and c [B, Cc, D, H, W].

    ``mu`` and ``log_s`` (soft-clamped) come from a 3D conv net (``injector_subnet``) on the
    condition alone, so the map is invertible for any x; log|det dy/dx| = -sum(log_s).
    ``log_s`` starts at zero, and so does ``mu`` with the ``conv`` net (the transform starts as the
    identity); with the ``unet`` net ``mu`` starts as a random function of c (see
    ``injector_subnet``). In a conditional flow, ``mu`` becomes an estimate of x from c and the
    rest of the flow models the residual. With ``set_recompute(True)`` the net's activations are
    not kept for the backward pass but recomputed (``torch.utils.checkpoint``): the ``conv`` net's
    from ``c``, the U-Net's unit by unit (``RecomputedUnit``).

    ``mean_beta``: the gradient that reaches ``mu`` is multiplied by sigma^(2 beta), sigma =
    exp(log_s), held constant (beta-NLL, Seitzer et al., ICLR 2022). For a Gaussian residual the
    likelihood's gradient for ``mu`` is (x - mu) / sigma^2 per voxel, so wherever the net predicts a
    large spread its mean learns little; beta = 0.5 makes it (x - mu) / sigma, beta = 1 the squared
    error's (x - mu). Values, log-determinant and likelihood are unchanged: only training's steps.
    """

    def __init__(self, channels: int, cond_channels: int, hidden: int, clamp: float = 2.0, net: str = "conv",
                 mean_beta: float = 0.0):
        super().__init__()
        self.channels = channels
        self.clamp = clamp
        self.kind = net
        self.mean_beta = mean_beta
        self.net = injector_subnet(net, cond_channels, hidden, 2 * channels)
        self.recompute = False

    def set_recompute(self, enabled: bool) -> None:
        """Turn the memory-saving backward of the net on or off (see the class)."""
        self.recompute = enabled
        for unit in self.net.modules():
            if isinstance(unit, RecomputedUnit):
                unit.recompute = enabled

    def params(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Shift ``mu`` and log-scale ``log_s``, each [B, C, D, H, W]."""
        if self.kind == "unet" and min(cond.shape[2:]) < UNET_MIN_AXIS:
            raise ModelError(f"the U-Net injector needs at least {UNET_MIN_AXIS} voxels per axis, "
                             f"got a {'x'.join(map(str, cond.shape[2:]))} grid")
        if self.recompute and self.kind == "conv" and torch.is_grad_enabled():
            out = checkpoint(self.net, cond, use_reentrant=False)
        else:
            out = self.net(cond)
        return out[:, : self.channels], soft_clamp(out[:, self.channels :], self.clamp)

    def forward(self, x, cond=None):
        return self.forward_from(x, *self.params(cond), self.mean_beta)

    def inverse(self, y, cond=None):
        return self.inverse_from(y, *self.params(cond))

    @staticmethod
    def forward_from(x: torch.Tensor, mu: torch.Tensor, log_s: torch.Tensor, mean_beta: float = 0.0):
        """The forward with ``params`` given: y and log|det dy/dx| [B]; ``mean_beta`` as in the class."""
        if mean_beta and torch.is_grad_enabled():
            mu = scale_gradient(mu, torch.exp(2.0 * mean_beta * log_s))
        return (x - mu) * torch.exp(-log_s), -log_s.flatten(1).sum(1)

    @staticmethod
    def inverse_from(y: torch.Tensor, mu: torch.Tensor, log_s: torch.Tensor) -> torch.Tensor:
        """The inverse with ``params`` already computed: several draws for one condition run the net once."""
        return y * torch.exp(log_s) + mu
