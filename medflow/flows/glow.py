"""Multi-scale 3D Glow: levels of (squeeze -> K flow steps -> split), with learned priors."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from medflow.flows.actnorm import ActNorm
from medflow.flows.base import InvertibleModule
from medflow.flows.coupling import AffineCoupling
from medflow.flows.invconv import InvConv1x1x1
from medflow.flows.prior import GaussianPrior
from medflow.flows.recompute import chain_forward, run_chain
from medflow.flows.squeeze import HaarDownsample3d, Squeeze3d

SQUEEZES = {"reshape": Squeeze3d, "haar": HaarDownsample3d}


class FlowStep(InvertibleModule):
    """One Glow step: actnorm -> invertible 1x1x1 conv -> affine coupling."""

    def __init__(self, channels: int, hidden: int, cond_channels: int = 0, clamp: float = 2.0):
        super().__init__()
        self.actnorm = ActNorm(channels)
        self.invconv = InvConv1x1x1(channels)
        self.coupling = AffineCoupling(channels, hidden, cond_channels, clamp)

    @property
    def parts(self) -> tuple[InvertibleModule, InvertibleModule, InvertibleModule]:
        """The three transforms in order (the memory-saving backward rebuilds them one by one)."""
        return self.actnorm, self.invconv, self.coupling

    def forward(self, x, cond=None):
        return run_chain(self.parts, x, cond)

    def inverse(self, y, cond=None):
        for part in reversed(self.parts):
            y = part.inverse(y, cond)
        return y


class GlowLevel(InvertibleModule):
    """Squeeze [B, C, D, H, W] -> [B, 8C, D/2, H/2, W/2], then ``steps`` flow steps."""

    def __init__(self, in_channels: int, steps: int, hidden: int, squeeze: str, clamp: float,
                 cond_channels: int):
        super().__init__()
        self.channels = in_channels * 8
        self.squeeze = SQUEEZES[squeeze]()
        self.steps = nn.ModuleList(FlowStep(self.channels, hidden, cond_channels, clamp) for _ in range(steps))
        self.recompute = False

    def forward(self, x, cond=None):
        x, ld = self.squeeze(x)
        y, ld_steps = chain_forward(self.steps, x, cond, self.recompute)
        return y, ld + ld_steps

    def inverse(self, y, cond=None):
        for step in reversed(self.steps):
            y = step.inverse(y, cond)
        return self.squeeze.inverse(y)


@dataclass
class Encoding:
    """Result of encoding a batch of volumes.

    zs[i]: latent of level i, [B, Cz_i, D/2^(i+1), H/2^(i+1), W/2^(i+1)];
    kept[i]: the half that level i passed on (None at the top level);
    features[i]: level i's output before its split (conditioning features for another flow);
    logdet: log|det dz/dx| per sample, [B].
    """

    zs: list[torch.Tensor]
    kept: list[torch.Tensor | None]
    features: list[torch.Tensor]
    logdet: torch.Tensor


class Glow3d(nn.Module):
    """Multi-scale 3D Glow mapping x [B, C, D, H, W] to per-level latents and back.

    Level i squeezes, runs ``steps[i]`` flow steps and (except the last level) splits off
    half of its channels as latent ``z_i``. Each latent has a learned Gaussian prior
    conditioned on the half kept at that level and on optional external features
    ``prior_cond[i]`` (for Dual-Glow: the MRI latent of the same level). Couplings of
    level i may see external features ``coupling_cond[i]`` (cINN-style).
    D, H and W must be divisible by 2^len(steps).
    """

    def __init__(self, in_channels: int, steps: list[int], hidden: int, squeeze: str = "reshape",
                 clamp: float = 2.0, coupling_cond_channels: list[int] | None = None,
                 prior_cond_channels: list[int] | None = None, prior_hidden: int = 64,
                 learn_prior_scale: bool = True):
        super().__init__()
        n = len(steps)
        coupling_cond_channels = coupling_cond_channels or [0] * n
        prior_cond_channels = prior_cond_channels or [0] * n
        self.in_channels = in_channels
        self.levels = nn.ModuleList()
        self.priors = nn.ModuleList()
        self.z_channels: list[int] = []
        channels = in_channels
        for i, k in enumerate(steps):
            level = GlowLevel(channels, k, hidden, squeeze, clamp, coupling_cond_channels[i])
            self.levels.append(level)
            top = i == n - 1
            keep = 0 if top else level.channels // 2
            z_channels = level.channels - keep
            self.z_channels.append(z_channels)
            self.priors.append(GaussianPrior(z_channels, keep + prior_cond_channels[i], prior_hidden, learn_prior_scale))
            channels = keep

    @property
    def num_levels(self) -> int:
        return len(self.levels)

    @property
    def feature_channels(self) -> list[int]:
        """Channels of ``Encoding.features[i]``."""
        return [level.channels for level in self.levels]

    def set_recompute(self, enabled: bool) -> None:
        """Turn the memory-saving backward on or off for every level."""
        for level in self.levels:
            level.recompute = enabled

    def set_subnet_bf16(self, enabled: bool) -> None:
        """Run coupling subnets under bfloat16 autocast (the invertible arithmetic stays fp32)."""
        for module in self.modules():
            if isinstance(module, AffineCoupling):
                module.subnet_bf16 = enabled

    def latent_shapes(self, batch: int, spatial: tuple[int, int, int]) -> list[tuple[int, ...]]:
        """Shapes of ``zs`` for inputs [batch, C, *spatial]."""
        shapes = []
        for i, c in enumerate(self.z_channels):
            f = 2 ** (i + 1)
            shapes.append((batch, c, spatial[0] // f, spatial[1] // f, spatial[2] // f))
        return shapes

    def encode(self, x: torch.Tensor, coupling_cond: list[torch.Tensor] | None = None) -> Encoding:
        """Forward pass keeping everything priors and other flows need."""
        zs, kept, features = [], [], []
        logdet = x.new_zeros(x.shape[0])
        h = x
        for i, level in enumerate(self.levels):
            h, ld = level(h, coupling_cond[i] if coupling_cond else None)
            logdet = logdet + ld
            features.append(h)
            if i == self.num_levels - 1:
                zs.append(h)
                kept.append(None)
            else:
                keep = level.channels // 2
                kept.append(h[:, :keep])
                zs.append(h[:, keep:])
                h = h[:, :keep]
        return Encoding(zs, kept, features, logdet)

    def forward(self, x: torch.Tensor, coupling_cond: list[torch.Tensor] | None = None):
        """x [B, C, D, H, W] -> (list of per-level latents, log-det [B])."""
        enc = self.encode(x, coupling_cond)
        return enc.zs, enc.logdet

    def inverse(self, zs: list[torch.Tensor], coupling_cond: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Exact inverse of ``forward``."""
        h = zs[-1]
        for i in reversed(range(self.num_levels)):
            if i < self.num_levels - 1:
                h = torch.cat([h, zs[i]], dim=1)
            h = self.levels[i].inverse(h, coupling_cond[i] if coupling_cond else None)
        return h

    def _prior_cond(self, i: int, kept: torch.Tensor | None, prior_cond: list[torch.Tensor] | None):
        parts = [t for t in (kept, prior_cond[i] if prior_cond else None) if t is not None]
        return torch.cat(parts, dim=1) if parts else None

    def log_prior(self, enc: Encoding, prior_cond: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Sum over levels of log p(z_i | kept_i, prior_cond_i), in nats: [B]."""
        total = enc.logdet.new_zeros(enc.logdet.shape[0])
        for i, prior in enumerate(self.priors):
            total = total + prior.log_prob(enc.zs[i], self._prior_cond(i, enc.kept[i], prior_cond))
        return total

    def log_prob(self, x: torch.Tensor, coupling_cond=None, prior_cond=None):
        """log p(x) in nats per sample [B] by change of variables, and the encoding."""
        enc = self.encode(x, coupling_cond)
        return self.log_prior(enc, prior_cond) + enc.logdet, enc

    @torch.no_grad()
    def sample(self, batch: int, spatial: tuple[int, int, int], temperature: float = 1.0,
               coupling_cond=None, prior_cond=None, generator: torch.Generator | None = None,
               mirror: bool = False) -> torch.Tensor:
        """Draw x [batch, C, *spatial], sampling each level's latent top-down from its prior;
        ``mirror``: every level's noise with its sign flipped (``GaussianPrior.sample``)."""
        device = next(self.parameters()).device
        shapes = self.latent_shapes(batch, spatial)
        h = None
        for i in reversed(range(self.num_levels)):
            cond = self._prior_cond(i, h, prior_cond)
            z = self.priors[i].sample(cond, shapes[i], temperature, device, generator, mirror)
            h = z if h is None else torch.cat([h, z], dim=1)
            h = self.levels[i].inverse(h, coupling_cond[i] if coupling_cond else None)
        return h
