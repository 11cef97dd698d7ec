"""Dual-Glow (Sun et al., ICCV 2019): p(PET | MRI) with two 3D Glows and per-level conditional priors."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from medflow.adversary import SideDiscriminator
from medflow.condition import ConditionEncoder, mri_conditions
from medflow.errors import ModelError
from medflow.flows.coupling import AffineCoupling
from medflow.flows.covariate_scale import CovariateScale
from medflow.flows.glow import SQUEEZES, Glow3d
from medflow.flows.injector import INJECTOR_NETS, UNET_MIN_AXIS, ConditionalAffine
from medflow.presets import load_preset


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


OPTION_TYPES = {  # a DualGlowConfig field's annotation -> (check, what it must be)
    "int": (_is_int, "an integer"),
    "float": (lambda v: _is_int(v) or isinstance(v, float), "a number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "list[int]": (lambda v: isinstance(v, list) and all(map(_is_int, v)), "a list of integers"),
    "list[int] | None": (lambda v: v is None or (isinstance(v, list) and all(map(_is_int, v))),
                         "a list of integers or null"),
}


@dataclass
class DualGlowConfig:
    """Architecture and objective of a Dual-Glow model.

    steps: flow steps per level (its length is the number of levels); hidden: width of the
    coupling subnets; prior_hidden: width of the prior networks; prior: ``mean_scale``
    (the MRI latent sets mean and scale of the PET prior) or ``mean`` (scale fixed at 1,
    as in the authors' code); coupling_condition: also feed the MRI flow's features of
    each level into the PET couplings (cINN-style); normalize_condition: divide each MRI latent
    and feature tensor that conditions the PET flow by its per-sample root mean square, so the PET
    loss cannot gain by inflating the MRI flow's latents (with a small ``lam`` nothing else stops
    it, and training spikes); condition_width: if > 0, a condition
    encoder (a small 3D U-Net on the MRI, ``medflow.condition``) of this width adds
    multi-scale MRI features to the PET couplings and priors of every level; side_channels:
    length of the side-information vector (age, sex, diagnosis... see ``medflow.side``) that
    conditions the top level's PET prior, 0 for none; side_map_cells: if > 0, side information
    also scales the PET voxel-wise before the rest of the flow through a learned map per side
    channel of this many cells per axis over the volume's box (``medflow.flows.covariate_scale``),
    so a covariate can change uptake regionally; uptake_map: a static map of the same cells, shared by
    every subject, with or without side information (a coarse atlas of uptake scale: with it the
    covariates' maps hold only their differences from it); side_map_origin: the model-space PET value
    those maps scale about, -0.5 (zero uptake: the maps are relative changes of uptake) in every preset,
    0.0 in configs written before this option existed; side_map_channels: the side channels that have
    such a map (training sets the one-hot categories but each covariate's default, the reference: a
    map times a standardised number would extrapolate without bound beyond the training range),
    None for all, [] for none; side_adversary: weight of the gradient-reversal discriminators that
    push side information out of the lower PET latents; injector_width: if > 0, the PET flow
    starts with a voxel-wise conditional affine transform ``(pet - mu) * exp(-log_s)`` whose
    ``mu`` and ``log_s`` a
    conv net of this width computes at full resolution from the MRI (with the condition
    encoder's finest features, where present): SRFlow's affine
    injector, so the flows model PET relative to an MRI-based estimate; injector_net: that
    net, ``conv`` (three convolutions, a 5-voxel receptive field) or ``unet`` (a MONAI
    BasicUNet, whole-volume receptive field, grids of at least 32 voxels per axis); injector_beta:
    the gradient that reaches the injector's ``mu`` is scaled by its predicted spread to the power
    2 beta (beta-NLL, ``ConditionalAffine``; 0: the likelihood's own gradient); lam: weight of
    log p(MRI); n_bins: quantisation levels per unit intensity used for bits per voxel.
    """

    mri_channels: int = 1
    steps: list[int] = field(default_factory=lambda: [16, 16, 16, 16])
    hidden: int = 512
    prior_hidden: int = 128
    squeeze: str = "reshape"
    clamp: float = 2.0
    prior: str = "mean_scale"
    coupling_condition: bool = False
    normalize_condition: bool = False
    condition_width: int = 0
    side_channels: int = 0
    side_map_cells: int = 0
    uptake_map: bool = False
    side_map_origin: float = 0.0
    side_map_channels: list[int] | None = None
    side_adversary: float = 0.1
    injector_width: int = 0
    injector_net: str = "conv"
    injector_beta: float = 0.0
    lam: float = 0.001
    n_bins: int = 256

    @classmethod
    def from_dict(cls, values: dict) -> "DualGlowConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ModelError(f"unknown model option(s): {', '.join(unknown)}")
        for f in fields(cls):
            if f.name in values:
                check, kind = OPTION_TYPES[f.type]
                if not check(values[f.name]):
                    raise ModelError(f"model option {f.name} must be {kind}, got {values[f.name]!r}")
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        if not self.steps or any(int(k) < 1 for k in self.steps):
            raise ModelError(f"steps must be a non-empty list of positive integers, got {self.steps}")
        if self.squeeze not in SQUEEZES:
            raise ModelError(f"squeeze must be one of {sorted(SQUEEZES)}, got {self.squeeze!r}")
        if self.prior not in ("mean", "mean_scale"):
            raise ModelError(f"prior must be 'mean' or 'mean_scale', got {self.prior!r}")
        if self.mri_channels < 1 or self.hidden < 1 or self.prior_hidden < 1:
            raise ModelError("mri_channels, hidden and prior_hidden must be positive")
        if self.side_channels < 0 or self.side_adversary < 0 or self.side_map_cells < 0:
            raise ModelError("side_channels, side_map_cells and side_adversary must be >= 0")
        if self.side_map_channels is not None and (
                len(set(self.side_map_channels)) != len(self.side_map_channels)
                or any(not 0 <= int(k) < self.side_channels for k in self.side_map_channels)):
            raise ModelError(f"side_map_channels must be distinct indices below side_channels "
                             f"({self.side_channels}), got {self.side_map_channels}")
        if self.uptake_map and not self.side_map_cells:
            raise ModelError("uptake_map needs side_map_cells > 0 (the cells per axis of its map)")
        if self.condition_width < 0 or self.injector_width < 0:
            raise ModelError("condition_width and injector_width must be >= 0 (0 turns them off)")
        if not 0.0 <= self.injector_beta <= 1.0:
            raise ModelError(f"injector_beta must be between 0 and 1, got {self.injector_beta}")
        if self.injector_net not in INJECTOR_NETS:
            raise ModelError(f"injector_net must be one of {list(INJECTOR_NETS)}, got {self.injector_net!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def min_axis(self) -> int:
        """The fewest voxels per axis of the model grid the injector accepts (0: no minimum)."""
        return UNET_MIN_AXIS if self.injector_width and self.injector_net == "unet" else 0

    @property
    def levels(self) -> int:
        return len(self.steps)


def valid_sample_count(n: int) -> bool:
    """Whether ``DualGlow.sample`` can draw n samples: one, or antithetic pairs."""
    return n == 1 or (n >= 2 and n % 2 == 0)


def bits_per_voxel(log_prob: torch.Tensor, x: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Glow's convention: -log2 p(x) per voxel of x, for x quantised at 1/n_bins. [B]."""
    voxels = x[0].numel()
    return (-log_prob / voxels + math.log(n_bins)) / math.log(2.0)


class DualGlow(nn.Module):
    """Two multi-scale 3D Glows (MRI and PET) joined by conditional priors.

    mri: [B, mri_channels, D, H, W]; pet: [B, 1, D, H, W]; D, H, W divisible by 2^levels.
    PET latent i ~ N(mu_i, sigma_i) where mu_i, sigma_i come from the MRI latent i (and the
    PET half kept at that level). Training loss: -(log p(pet|mri) + lam log p(mri)).
    """

    def __init__(self, config: DualGlowConfig | None = None):
        super().__init__()
        self.config = config or DualGlowConfig()
        self.config.validate()
        c = self.config
        steps = [int(k) for k in c.steps]
        self.mri_flow = Glow3d(c.mri_channels, steps, c.hidden, c.squeeze, c.clamp, prior_hidden=c.prior_hidden)
        self.encoder = ConditionEncoder(c.mri_channels, c.condition_width, len(steps)) if c.condition_width else None
        extra = [c.condition_width] * len(steps)
        coupling = [f if c.coupling_condition else 0 for f in self.mri_flow.feature_channels]
        prior = [a + b for a, b in zip(self.mri_flow.z_channels, extra)]
        prior[-1] += c.side_channels
        self.pet_flow = Glow3d(
            1, steps, c.hidden, c.squeeze, c.clamp,
            coupling_cond_channels=[a + b for a, b in zip(coupling, extra)],
            prior_cond_channels=prior,
            prior_hidden=c.prior_hidden,
            learn_prior_scale=c.prior == "mean_scale",
        )
        injector_cond = c.mri_channels + c.condition_width
        self.injector = (ConditionalAffine(1, injector_cond, c.injector_width, c.clamp, c.injector_net,
                                           c.injector_beta)
                         if c.injector_width else None)
        mapped = c.side_map_channels if c.side_channels and c.side_map_cells else []
        self.side_scale = (CovariateScale(1, c.side_channels, c.side_map_cells, c.clamp, mapped, c.side_map_origin,
                                          c.uptake_map)
                           if mapped != [] or c.uptake_map else None)
        self.discriminators = nn.ModuleList(
            SideDiscriminator(z, c.side_channels) for z in self.pet_flow.z_channels[:-1]
        ) if c.side_channels else None

    @classmethod
    def from_preset(cls, name_or_path: str | Path, **overrides) -> "DualGlow":
        """Build an untrained model from a preset in ``models/`` (or a YAML path), with overrides."""
        values = dict(load_preset(name_or_path)["model"])
        values.update(overrides)
        return cls(DualGlowConfig.from_dict(values))

    @property
    def divisor(self) -> int:
        """Spatial sizes must be multiples of this."""
        return 2 ** self.config.levels

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def set_recompute(self, enabled: bool) -> None:
        """Memory-saving backward for both flows (activations recomputed from outputs) and the
        injector (its net's activations recomputed from the MRI, a U-Net's unit by unit)."""
        self.mri_flow.set_recompute(enabled)
        self.pet_flow.set_recompute(enabled)
        if self.injector is not None:
            self.injector.set_recompute(enabled)

    def set_subnet_bf16(self, enabled: bool) -> None:
        """bfloat16 autocast inside coupling subnets only; invertible arithmetic stays fp32."""
        self.mri_flow.set_subnet_bf16(enabled)
        self.pet_flow.set_subnet_bf16(enabled)

    def compile_subnets(self) -> None:
        """``torch.compile`` the forward of every 3D conv subnet (couplings and injector: nearly all
        the arithmetic); the invertible maths and log-determinants stay eager, parameter names
        unchanged. (``nn.Module.compile`` is not used: with torch 2.13 its modules ran uncompiled.)
        All subnets share one ``forward`` code object, and torch.compile keeps one graph per shape
        signature on it, up to ``torch._dynamo.config.cache_size_limit`` (8 by default), past which
        it silently runs eager; the limit is raised to the number of subnets, a bound on their
        signatures (the presets have at most 7; ``small`` with steps [1, 2, 2, 2] and the conv injector has 9)."""
        subnets = [m.net for m in self.modules() if isinstance(m, (AffineCoupling, ConditionalAffine))]
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, len(subnets))
        for net in subnets:
            net.forward = torch.compile(net.forward)

    def encode_mri(self, mri: torch.Tensor):
        """log p(mri) [B] in nats and the MRI encoding (latents and features)."""
        return self.mri_flow.log_prob(mri)

    def _pet_conditions(self, mri, enc_mri, side=None):
        """Per-level conditioning of the PET couplings (or None) and priors, and the injector's
        full-resolution condition (or None); side [B, side_channels]."""
        if self.config.side_channels and (side is None or side.shape[-1] != self.config.side_channels):
            raise ValueError(f"this model needs a side vector of length {self.config.side_channels}")
        extra = self.encoder(mri) if self.encoder is not None else None
        coupling, prior = mri_conditions(enc_mri.features, enc_mri.zs, self.config.coupling_condition,
                                         self.config.normalize_condition)
        if extra is not None:
            coupling = extra if coupling is None else [torch.cat(p, dim=1) for p in zip(coupling, extra)]
            prior = [torch.cat(p, dim=1) for p in zip(prior, extra)]
        if self.config.side_channels:
            top = prior[-1]
            prior[-1] = torch.cat([top, side.to(top)[:, :, None, None, None].expand(-1, -1, *top.shape[2:])], dim=1)
        injector = None
        if self.injector is not None:
            parts = [mri]
            if extra is not None:
                parts.append(F.interpolate(extra[0], size=mri.shape[2:], mode="trilinear", align_corners=False))
            injector = torch.cat(parts, dim=1)
        return coupling, prior, injector

    def side_adversary_loss(self, zs_pet: list[torch.Tensor], side: torch.Tensor) -> torch.Tensor:
        """Mean squared error of the discriminators predicting ``side`` from the lower PET latents."""
        losses = [((d(z) - side.to(z)) ** 2).mean() for d, z in zip(self.discriminators, zs_pet[:-1])]
        return torch.stack(losses).mean() if losses else zs_pet[0].new_zeros(())

    def log_prob(self, pet: torch.Tensor, mri: torch.Tensor, side: torch.Tensor | None = None) -> dict:
        """Per-sample log-likelihoods [B]: ``pet`` = log p(pet|mri[, side]), ``mri`` = log p(mri)
        (nats), the same as bits per voxel: ``pet_bpv``, ``mri_bpv``; with side information also
        ``side_adversary``, the discriminators' loss (a scalar)."""
        lp_mri, enc_mri = self.encode_mri(mri)
        coupling, prior, injector = self._pet_conditions(mri, enc_mri, side)
        flow_in, logdet = (pet, 0.0) if self.side_scale is None else self.side_scale(pet, side)
        if self.injector is not None:
            flow_in, injector_logdet = self.injector(flow_in, injector)
            logdet = logdet + injector_logdet
        lp_pet, enc_pet = self.pet_flow.log_prob(flow_in, coupling, prior)
        lp_pet = lp_pet + logdet
        n = self.config.n_bins
        terms = {
            "pet": lp_pet,
            "mri": lp_mri,
            "pet_bpv": bits_per_voxel(lp_pet, pet, n),
            "mri_bpv": bits_per_voxel(lp_mri, mri, n),
        }
        if self.discriminators is not None:
            terms["side_adversary"] = self.side_adversary_loss(enc_pet.zs, side)
        return terms

    def forward(self, pet: torch.Tensor, mri: torch.Tensor, side: torch.Tensor | None = None):
        """The training loss (see ``loss``); the entry point used through DistributedDataParallel."""
        return self.loss(pet, mri, side)

    def loss(self, pet: torch.Tensor, mri: torch.Tensor, side: torch.Tensor | None = None):
        """Training loss in nats per PET voxel (plus the weighted discriminator loss), and the terms."""
        terms = self.log_prob(pet, mri, side)
        voxels = pet[0].numel()
        loss = -(terms["pet"] + self.config.lam * terms["mri"]).mean() / voxels
        if "side_adversary" in terms:
            loss = loss + self.config.side_adversary * terms["side_adversary"]
        return loss, terms

    @torch.no_grad()
    def sample(self, mri: torch.Tensor, temperature: float = 0.7, n: int = 1,
               generator: torch.Generator | None = None, side: torch.Tensor | None = None) -> torch.Tensor:
        """Draw n PET volumes per MRI: returns [n, B, 1, D, H, W].

        Each PET latent is mu_i + T sigma_i eps; T = 0 gives the prior means. Draws come in
        antithetic pairs: draw 2k + 1 takes the noise of draw 2k with its sign flipped at every
        level. Each draw is still an exact sample, but a pair's mean cancels the noise's
        first-order term, so its Monte Carlo error shrinks faster than T (as T^1.5 with the
        subnets' ReLU kinks, T^2 for a smooth flow) where a single draw's is O(T); n must
        therefore be 1 or even. ``side`` [B, side_channels] is required when the model was
        trained with side information.
        """
        if not valid_sample_count(n):
            raise ValueError(f"n must be 1 or even (draws come in antithetic pairs), got {n}")
        if generator is None and n > 1:
            generator = torch.Generator(mri.device).manual_seed(int(torch.randint(2**62, ()).item()))
        _, enc_mri = self.encode_mri(mri)
        coupling, prior, injector = self._pet_conditions(mri, enc_mri, side)
        spatial = tuple(mri.shape[2:])
        mu_log_s = self.injector.params(injector) if self.injector is not None else None
        draws, state = [], None
        for k in range(n):
            mirror = k % 2 == 1
            if mirror:
                generator.set_state(state)
            elif generator is not None:
                state = generator.get_state()
            pet = self.pet_flow.sample(mri.shape[0], spatial, temperature, coupling, prior, generator, mirror)
            if mu_log_s is not None:
                pet = self.injector.inverse_from(pet, *mu_log_s)
            draws.append(pet if self.side_scale is None else self.side_scale.inverse(pet, side))
        return torch.stack(draws)
