"""MONAI preprocessing shared by training and synthesis, and its stored parameters.

Stage 1 (deterministic, cached during training): load -> channel first -> MRI to RAS,
resampled to ``spacing`` mm -> PET resampled onto that grid by world coordinates -> crop to
the foreground box (+ margin) of the first MRI contrast -> the MRI's 0th and 99.5th
percentiles per contrast over that box recorded (``MriRanged``) -> [with ``pet_normalization:
global_mean``: PET divided by its SPM-style global mean].
Stage 2: pad/crop to the model ``grid`` (a multiple of 2^levels) -> [training only:
small random affine] -> MRI scaled per volume so that the recorded percentiles map to
[-0.5, 0.5] (clipped; models trained before ``Preprocessing.mri_scaling`` existed take the
percentiles of the padded grid, zero padding included) -> PET divided by the
training set's ``pet_scale`` and shifted by
-0.5 -> [training only: MRI intensity jitter and noise]. Synthesis runs both stages on
the MRI and inverts stage 1 and the padding on the synthetic PET with MONAI's ``Invertd``
(trilinear, not nearest neighbour), which puts the PET back on the input's own grid.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms.utils_pytorch_numpy_unification import percentile
from monai.utils import convert_to_dst_type, convert_to_tensor
from monai.transforms import (
    Compose,
    CropForegroundd,
    MapTransform,
    Orientationd,
    RandAffined,
    RandGaussianNoised,
    RandScaleIntensityd,
    RandShiftIntensityd,
    ResampleToMatch,
    ResizeWithPadOrCropd,
    ScaleIntensityRange,
    ScaleIntensityRanged,
    ScaleIntensityRangePercentilesd,
    Spacingd,
)

from medflow.errors import InputError
from medflow.imageio import Volume, read_volume

FOREGROUND_FRACTION = 0.1
MRI_PERCENTILES = (0.0, 99.5)
MRI_SCALINGS = ("foreground_box", "padded_grid")
PET_NORMALIZATIONS = ("global_mean", "none")
PET_ZERO = -0.5  # zero uptake in model space: the model's PET is uptake / pet_scale + PET_ZERO


@dataclass
class Preprocessing:
    """Everything synthesis needs to repeat training's preprocessing exactly.

    spacing: voxel size in mm; grid: model input size in voxels (multiples of 2^levels);
    pet_scale: PET units mapped to 1.0 (robust maximum over the training set); margin:
    voxels kept around the MRI foreground box; pet_normalization: ``global_mean`` (each
    training PET divided by its global mean, see ``global_mean``) or ``none``; pet_level:
    the global mean synthetic PETs are written at, in the training PETs' units (the median
    over the training set; 1.0 without normalisation); pet_level_moments: over the training
    subjects' level ratios r (global mean / ``pet_level``), the mean of r² and of (r - 1)²,
    which carry the spread of a level the MRI does not show into the uncertainty map
    (``calibration.with_level_spread``); (1, 0) without normalisation; mri_scaling: where the
    MRI's percentiles for its scaling to [-0.5, 0.5] come from: ``foreground_box``, the MRI
    cropped to its foreground box (+ margin), so a head is scaled alike in any grid, or
    ``padded_grid``, the padded grid with its zero padding, where a smaller head in the same grid
    comes out brighter (what models trained before this field existed use).
    """

    spacing: tuple[float, float, float]
    grid: tuple[int, int, int]
    pet_scale: float = 1.0
    margin: int = 2
    pet_normalization: str = "none"
    pet_level: float = 1.0
    pet_level_moments: tuple[float, float] = (1.0, 0.0)
    mri_scaling: str = "foreground_box"

    def __post_init__(self):
        if self.mri_scaling not in MRI_SCALINGS:
            raise ValueError(f"unknown mri_scaling {self.mri_scaling!r}; expected one of {', '.join(MRI_SCALINGS)}")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict) -> "Preprocessing":
        return cls(tuple(float(s) for s in values["spacing"]), tuple(int(g) for g in values["grid"]),
                   float(values["pet_scale"]), int(values.get("margin", 2)),
                   str(values.get("pet_normalization", "none")), float(values.get("pet_level", 1.0)),
                   tuple(float(m) for m in values.get("pet_level_moments", (1.0, 0.0))),
                   str(values.get("mri_scaling", "padded_grid")))


def _high_percentile(image: torch.Tensor) -> torch.Tensor:
    """The 99th percentile of ``image`` (from at most about 200 000 evenly spaced voxels)."""
    flat = torch.as_tensor(image).flatten().float()
    return torch.quantile(flat[:: max(1, flat.numel() // 200_000)], 0.99)


def is_foreground(image: torch.Tensor) -> torch.Tensor:
    """Voxels above 10 % of the image's 99th percentile (the MRI head/brain box)."""
    return image > FOREGROUND_FRACTION * _high_percentile(image)


def check_foreground(volume: Volume) -> None:
    """InputError unless the MRI ``volume`` has a head to crop to (``is_foreground``): its 99th
    percentile must be above zero, as in a magnitude image, not one shifted below zero or empty
    but for a few voxels."""
    high = float(_high_percentile(volume.data))
    if not high > 0:
        raise InputError(f"{volume.path}: no foreground: its 99th percentile ({high:g}) is not above zero; "
                         "give a magnitude MRI of the head")


class PetOnMriGridd(MapTransform):
    """Resample the PET onto the MRI's grid by world coordinates (trilinear; zero outside the PET's
    field of view), so a PET co-registered in scanner space may come on its own voxel grid and field
    of view, and the header decides where each PET voxel lies. InputError when no PET signal
    falls inside the MRI's field of view."""

    def __init__(self):
        super().__init__(["pet"])
        self.resample = ResampleToMatch(mode="bilinear", padding_mode="zeros")

    def __call__(self, data):
        d = dict(data)
        pet = self.resample(d["pet"], img_dst=d["mri"])
        if not bool((pet > 0).any()):
            raise InputError(f"{d['pet'].meta.get('filename_or_obj', 'PET')}: no PET signal inside the MRI's field "
                             "of view; check that both headers place the volumes in the same scanner space")
        d["pet"] = pet
        return d


def volume_to_metatensor(volumes: list[Volume]) -> MetaTensor:
    """Stack co-registered volumes as channels: [C, X, Y, Z] with the first one's affine."""
    first = volumes[0]
    for other in volumes[1:]:
        if other.data.shape != first.data.shape or not np.allclose(other.affine, first.affine, atol=1e-4):
            raise InputError(f"{other.path}: grid differs from {first.path}; modalities must be co-registered")
    data = np.stack([v.data for v in volumes]).astype(np.float32)
    return MetaTensor(torch.from_numpy(data), affine=torch.as_tensor(first.affine, dtype=torch.float64),
                      meta={"filename_or_obj": str(first.path)})


class LoadVolumesd(MapTransform):
    """Read the file(s) under each key with medflow's validating reader into a MetaTensor."""

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            paths = d[key] if isinstance(d[key], (list, tuple)) else [d[key]]
            volumes = [read_volume(p, what=key.upper()) for p in paths]
            if key == "mri":
                check_foreground(volumes[0])
            d[key] = volume_to_metatensor(volumes)
        return d


class MriRanged(MapTransform):
    """Record ``d["mri_range"]``: the MRI's ``MRI_PERCENTILES`` (0th, 99.5th) per contrast over the
    volume as it is now, a float64 tensor [C, 2] in the MRI's units."""

    def __init__(self):
        super().__init__("mri")

    def __call__(self, data):
        d = dict(data)
        mri = convert_to_tensor(d["mri"], track_meta=False)
        d["mri_range"] = torch.tensor([[float(percentile(channel, q)) for q in MRI_PERCENTILES] for channel in mri],
                                      dtype=torch.float64)
        return d


class ScaleMriRanged(MapTransform):
    """Each MRI contrast's recorded ``d["mri_range"]`` (``MriRanged``) mapped to [-0.5, 0.5], clipped."""

    def __init__(self):
        super().__init__("mri")

    def __call__(self, data):
        d = dict(data)
        mri = convert_to_tensor(d["mri"], track_meta=False)
        scaled = torch.stack([ScaleIntensityRange(low, high, -0.5, 0.5, clip=True)(channel)
                              for channel, (low, high) in zip(mri, d["mri_range"].tolist())])
        d["mri"] = convert_to_dst_type(convert_to_tensor(scaled, track_meta=False), dst=d["mri"],
                                       dtype=torch.float32)[0]
        return d


def global_region(pet: torch.Tensor) -> torch.Tensor:
    """SPM's global-mean region (``spm_global``): the voxels above 1/8 of the volume's mean (bool,
    same shape)."""
    return pet > pet.double().mean() / 8


def level_summary(levels) -> tuple[float, tuple[float, float]]:
    """The training PETs' global means -> ``pet_level`` (their median) and ``pet_level_moments``
    (mean of r² and of (r - 1)² for r = global mean / ``pet_level``)."""
    levels = np.asarray(levels, dtype=np.float64)
    level = float(np.median(levels))
    ratios = levels / level
    return level, (float(np.mean(ratios**2)), float(np.mean((ratios - 1.0) ** 2)))


def global_mean(pet: torch.Tensor) -> float:
    """SPM's global mean: the mean of the voxels in ``global_region``."""
    return float(pet[global_region(pet)].double().mean()) if bool((pet > 0).any()) else 0.0


class NormalizeGlobalMeand(MapTransform):
    """Divide the PET by its global mean (SPM-style proportional scaling) and keep that mean
    under ``pet_global``. A PET's global level follows injected dose, body weight, uptake time and
    scanner calibration, none of which the MRI shows; the model learns the pattern instead."""

    def __init__(self, key: str = "pet"):
        super().__init__([key])

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            level = global_mean(d[key])
            if not level > 0:
                raise InputError(f"{d[key].meta.get('filename_or_obj', key)}: PET has no positive signal")
            d[key] = d[key] / level
            d[f"{key}_global"] = level
        return d


def stage1(spacing, margin: int, keys=("mri", "pet"), load: bool = True, pet_normalization: str = "none") -> Compose:
    """Load (optional), reorient the MRI to RAS and resample it, resample the PET onto its grid
    (``PetOnMriGridd``), crop to the first MRI contrast's foreground box
    (so a second contrast, on its own intensity scale, does not move the box), record the MRI's
    percentiles there (``MriRanged``), and normalise the PET as ``pet_normalization`` says."""
    keys = list(keys)
    steps = [LoadVolumesd(keys)] if load else []
    steps += [
        Orientationd("mri", axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        Spacingd("mri", pixdim=spacing, mode="bilinear", padding_mode="zeros"),
    ]
    if "pet" in keys:
        steps.append(PetOnMriGridd())
    steps.append(CropForegroundd(keys, source_key="mri", select_fn=is_foreground, channel_indices=0, margin=margin,
                                 allow_smaller=True))
    steps.append(MriRanged())
    if pet_normalization == "global_mean" and "pet" in keys:
        steps.append(NormalizeGlobalMeand("pet"))
    return Compose(steps)


def scale_mri(mri_scaling: str) -> MapTransform:
    """The MRI's scaling to [-0.5, 0.5] that ``Preprocessing.mri_scaling`` names."""
    if mri_scaling == "foreground_box":
        return ScaleMriRanged()
    lower, upper = MRI_PERCENTILES
    return ScaleIntensityRangePercentilesd("mri", lower=lower, upper=upper, b_min=-0.5, b_max=0.5,
                                           clip=True, channel_wise=True)


def stage2(prep: Preprocessing, train: bool, keys=("mri", "pet")) -> Compose:
    """Pad/crop to the grid and scale intensities; with ``train``, add augmentation."""
    keys = list(keys)
    steps = [ResizeWithPadOrCropd(keys, spatial_size=prep.grid, mode="constant")]
    if train:
        steps.append(RandAffined(keys, prob=0.5, rotate_range=(0.05, 0.05, 0.05), scale_range=(0.05, 0.05, 0.05),
                                 mode="bilinear", padding_mode="zeros"))
    steps.append(scale_mri(prep.mri_scaling))
    if "pet" in keys:
        steps.append(ScaleIntensityRanged("pet", a_min=0.0, a_max=prep.pet_scale, b_min=PET_ZERO,
                                         b_max=PET_ZERO + 1.0))
    if train:
        steps += [
            RandScaleIntensityd("mri", factors=0.05, prob=0.5),
            RandShiftIntensityd("mri", offsets=0.02, prob=0.5),
            RandGaussianNoised("mri", std=0.01, prob=0.5),
        ]
    return Compose(steps)


def plain_tensor(data) -> torch.Tensor:
    """MONAI output as a plain float32 tensor (no MetaTensor bookkeeping in the model)."""
    return torch.as_tensor(data).as_subclass(torch.Tensor).float()


def pet_to_units(pet: torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    """Model-space PET ([-0.5, 0.5] scale) back to the training PET's units (at ``pet_level``)."""
    return (pet - PET_ZERO) * (prep.pet_scale * prep.pet_level)


def grid_for(shapes: list[tuple[int, int, int]], divisor: int, minimum: int = 0) -> tuple[int, int, int]:
    """Smallest grid holding every foreground box, at least ``minimum`` voxels per axis, rounded
    up to multiples of ``divisor``."""
    largest = np.max(np.asarray(shapes), axis=0)
    return tuple(int(math.ceil(max(s, minimum) / divisor) * divisor) for s in largest)


def robust_max(pet: torch.Tensor) -> float:
    """99.5th percentile of a PET box: the per-subject contribution to ``pet_scale``."""
    flat = pet.flatten().float()
    return float(torch.quantile(flat[:: max(1, flat.numel() // 200_000)], 0.995))
