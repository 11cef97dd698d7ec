"""The Dual-Glow architecture rebuilt from FrEIA blocks: the peer that ``medflow.bench`` times.

Each modality's multi-scale 3D Glow is a list of ``FrEIA.framework.SequenceINN`` levels: a
3D reshape squeeze (FrEIA has none; ``Squeeze3d`` below), then per flow step ``Fm.ActNorm``
(data-dependent initialisation) and ``Fm.AllInOneBlock`` (one-sided affine coupling with one
subnet, a learned per-channel affine and a fixed random channel permutation applied as a
1x1x1 convolution). The coupling subnets have medflow's shape (3x3x3 -> 1x1x1 -> 3x3x3, same
widths) built from plain ``torch.nn.Conv3d``, as a FrEIA user writes them (medflow's own use
``medflow.flows.conv.Conv3d``), and the conditional priors are medflow's ``GaussianPrior``
conditioned exactly as in ``medflow.model.DualGlow``, as are the static uptake map
(``CovariateScale``) and the affine injector on the PET input (``ConditionalAffine``) where the
preset has them, so only the flow blocks differ.
FrEIA builds each level for one fixed input size, so the peer is built for one volume shape.
"""

from __future__ import annotations

from pathlib import Path

import FrEIA.framework as Ff
import FrEIA.modules as Fm
import torch
from torch import nn

from medflow.condition import mri_conditions
from medflow.flows.coupling import coupling_subnet
from medflow.flows.covariate_scale import CovariateScale
from medflow.flows.glow import Encoding
from medflow.flows.injector import ConditionalAffine
from medflow.flows.prior import GaussianPrior
from medflow.model import DualGlowConfig, bits_per_voxel
from medflow.presets import load_preset


class Squeeze3d(Fm.InvertibleModule):
    """[B, C, D, H, W] -> [B, 8C, D/2, H/2, W/2], each 2x2x2 block moved into channels; log-det 0.

    FrEIA's ``IRevNetDownsampling`` and ``HaarDownsampling`` are 2D only.
    """

    def forward(self, x, c=None, rev=False, jac=True):
        (x,) = x
        b = x.shape[0]
        if rev:
            c8, d, h, w = x.shape[1:]
            y = x.view(b, c8 // 8, 2, 2, 2, d, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
            y = y.reshape(b, c8 // 8, 2 * d, 2 * h, 2 * w)
        else:
            c, d, h, w = x.shape[1:]
            y = x.view(b, c, d // 2, 2, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 7, 2, 4, 6)
            y = y.reshape(b, 8 * c, d // 2, h // 2, w // 2)
        return (y,), x.new_zeros(b)

    def output_dims(self, input_dims):
        c, d, h, w = input_dims[0]
        if d % 2 or h % 2 or w % 2:
            raise ValueError(f"spatial size {(d, h, w)} must be even to squeeze")
        return [(8 * c, d // 2, h // 2, w // 2)]


def peer_level(channels: int, spatial: tuple[int, int, int], steps: int, hidden: int, clamp: float,
               cond_channels: int) -> Ff.SequenceINN:
    """One Glow level for inputs [B, channels, *spatial]: squeeze, then ``steps`` x (ActNorm, AllInOneBlock)."""
    level = Ff.SequenceINN(channels, *spatial)
    level.append(Squeeze3d)
    c, *inner = level.shapes[-1]
    cond = {"cond": 0, "cond_shape": (cond_channels, *inner)} if cond_channels else {}
    for _ in range(steps):
        level.append(Fm.ActNorm)
        level.append(Fm.AllInOneBlock, subnet_constructor=lambda c_in, c_out: coupling_subnet(c_in, hidden, c_out, nn.Conv3d),
                     affine_clamping=clamp, permute_soft=False, **cond)
    return level


class PeerGlow3d(nn.Module):
    """Multi-scale 3D Glow from FrEIA levels with medflow's per-level conditional priors.

    Same levels, splits, latents and prior conditioning as ``medflow.flows.Glow3d``; built for
    inputs [B, in_channels, *spatial].
    """

    def __init__(self, in_channels: int, spatial: tuple[int, int, int], steps: list[int], hidden: int,
                 clamp: float = 2.0, coupling_cond_channels: list[int] | None = None,
                 prior_cond_channels: list[int] | None = None, prior_hidden: int = 64,
                 learn_prior_scale: bool = True):
        super().__init__()
        n = len(steps)
        coupling_cond_channels = coupling_cond_channels or [0] * n
        prior_cond_channels = prior_cond_channels or [0] * n
        self.levels = nn.ModuleList()
        self.priors = nn.ModuleList()
        self.z_channels: list[int] = []
        self.feature_channels: list[int] = []
        channels, shape = in_channels, tuple(spatial)
        for i, k in enumerate(steps):
            level = peer_level(channels, shape, k, hidden, clamp, coupling_cond_channels[i])
            self.levels.append(level)
            out_channels, *inner = level.shapes[-1]
            keep = 0 if i == n - 1 else out_channels // 2
            self.feature_channels.append(out_channels)
            self.z_channels.append(out_channels - keep)
            self.priors.append(GaussianPrior(out_channels - keep, keep + prior_cond_channels[i], prior_hidden,
                                             learn_prior_scale))
            channels, shape = keep, tuple(inner)

    def encode(self, x: torch.Tensor, coupling_cond: list[torch.Tensor] | None = None) -> Encoding:
        """Forward pass keeping latents, kept halves, features and log-det, as ``Glow3d.encode``."""
        zs, kept, features = [], [], []
        logdet = x.new_zeros(x.shape[0])
        h = x
        for i, level in enumerate(self.levels):
            h, ld = level(h, c=[coupling_cond[i]] if coupling_cond else None)
            logdet = logdet + ld
            features.append(h)
            keep = 0 if i == len(self.levels) - 1 else h.shape[1] // 2
            kept.append(h[:, :keep] if keep else None)
            zs.append(h[:, keep:])
            h = h[:, :keep]
        return Encoding(zs, kept, features, logdet)

    def log_prob(self, x: torch.Tensor, coupling_cond=None, prior_cond=None):
        """log p(x) in nats per sample [B], and the encoding."""
        enc = self.encode(x, coupling_cond)
        total = enc.logdet
        for i, prior in enumerate(self.priors):
            parts = [t for t in (enc.kept[i], prior_cond[i] if prior_cond else None) if t is not None]
            total = total + prior.log_prob(enc.zs[i], torch.cat(parts, dim=1) if parts else None)
        return total, enc


class PeerDualGlow(nn.Module):
    """Dual-Glow from FrEIA flows: the objective and conditioning of ``medflow.model.DualGlow``."""

    def __init__(self, config: DualGlowConfig, spatial: tuple[int, int, int]):
        super().__init__()
        config.validate()
        if config.condition_width or config.side_channels:
            raise ValueError("the FrEIA peer rebuilds neither the condition encoder nor side information")
        self.config = c = config
        steps = [int(k) for k in c.steps]
        self.mri_flow = PeerGlow3d(c.mri_channels, spatial, steps, c.hidden, c.clamp, prior_hidden=c.prior_hidden)
        self.pet_flow = PeerGlow3d(
            1, spatial, steps, c.hidden, c.clamp,
            coupling_cond_channels=self.mri_flow.feature_channels if c.coupling_condition else None,
            prior_cond_channels=self.mri_flow.z_channels, prior_hidden=c.prior_hidden,
            learn_prior_scale=c.prior == "mean_scale",
        )
        self.uptake_map = (CovariateScale(1, 0, c.side_map_cells, c.clamp, origin=c.side_map_origin, static=True)
                           if c.uptake_map else None)
        self.injector = (ConditionalAffine(1, c.mri_channels, c.injector_width, c.clamp, c.injector_net,
                                           c.injector_beta)
                         if c.injector_width else None)

    @classmethod
    def from_preset(cls, name_or_path: str | Path, spatial: tuple[int, int, int], **overrides) -> "PeerDualGlow":
        """The peer of ``DualGlow.from_preset(name_or_path, **overrides)`` for volumes of ``spatial`` voxels."""
        values = {**load_preset(name_or_path)["model"], **overrides}
        return cls(DualGlowConfig.from_dict(values), spatial)

    def log_prob(self, pet: torch.Tensor, mri: torch.Tensor) -> dict[str, torch.Tensor]:
        """``pet`` = log p(pet|mri), ``mri`` = log p(mri) in nats [B], and both in bits per voxel."""
        lp_mri, enc = self.mri_flow.log_prob(mri)
        coupling, prior = mri_conditions(enc.features, enc.zs, self.config.coupling_condition,
                                         self.config.normalize_condition)
        flow_in, logdet = (pet, 0.0) if self.uptake_map is None else self.uptake_map(pet)
        if self.injector is not None:
            flow_in, injector_logdet = self.injector(flow_in, mri)
            logdet = logdet + injector_logdet
        lp_pet, _ = self.pet_flow.log_prob(flow_in, coupling, prior)
        lp_pet = lp_pet + logdet
        n = self.config.n_bins
        return {"pet": lp_pet, "mri": lp_mri, "pet_bpv": bits_per_voxel(lp_pet, pet, n),
                "mri_bpv": bits_per_voxel(lp_mri, mri, n)}

    def loss(self, pet: torch.Tensor, mri: torch.Tensor):
        """Training loss in nats per PET voxel (as ``DualGlow.loss``), and the ``log_prob`` terms."""
        terms = self.log_prob(pet, mri)
        loss = -(terms["pet"] + self.config.lam * terms["mri"]).mean() / pet[0].numel()
        return loss, terms
