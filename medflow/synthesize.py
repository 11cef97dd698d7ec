"""``medflow synthesize``: MRI in, synthetic PET (mean of N samples, optional std map) out.

Each output is a float32 NIfTI on the input's own grid (same shape, affine and
orientation) in the training PET's units, written atomically.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd, ResizeWithPadOrCropd
from monai.transforms.utils import generate_spatial_bounding_box

from medflow.calibration import with_level_spread
from medflow.device import check_fits
from medflow.errors import InputError, OutputError, QCError, ResourceError
from medflow.imageio import atomic_paths, check_nifti_name, check_output_paths, nifti_image, read_volume
from medflow.model import bits_per_voxel
from medflow.preprocess import (
    check_foreground, is_foreground, pet_to_units, plain_tensor, stage1, stage2, volume_to_metatensor,
)
from medflow.trained import TrainedModel

QC_Z_LIMIT = 4.0


@dataclass
class SynthesisOptions:
    """temperature: prior temperature T (0 = prior mean; None = the model's calibrated one,
    ``TrainedModel.temperature``); samples: N draws averaged; seed: RNG seed; level_spread:
    the std map includes the spread of the training PETs' global levels
    (``calibration.with_level_spread``), else it is the samples' std alone."""

    temperature: float | None = None
    samples: int = 4
    seed: int = 0
    overwrite: bool = False
    strict_qc: bool = False
    level_spread: bool = True

    def temperature_for(self, tm: TrainedModel) -> float:
        """The temperature to sample ``tm`` at: the one asked for, else the model's."""
        return tm.temperature if self.temperature is None else self.temperature


@dataclass
class SynthesisResult:
    temperature: float
    mri_bpv: float
    qc_z: float | None
    qc_warnings: list[str]  # quality-control findings, each without the file name
    seconds: float


def preprocessing_for(tm: TrainedModel) -> Compose:
    """The deterministic MRI preprocessing the model was trained with (invertible parts recorded)."""
    prep = tm.prep
    return Compose(list(stage1(prep.spacing, prep.margin, keys=["mri"], load=False).transforms)
                   + list(stage2(prep, train=False, keys=["mri"]).transforms))


def to_native_grid(volume: torch.Tensor, data: dict, transform: Compose) -> np.ndarray:
    """Undo padding, cropping, resampling and reorientation: [D, H, W] model grid -> input grid."""
    mri = data["mri"]
    pet = MetaTensor(volume[None].cpu(), meta=dict(mri.meta), applied_operations=list(mri.applied_operations))
    inverter = Invertd(keys="pet", transform=transform, orig_keys="mri", nearest_interp=False)
    return np.asarray(inverter({"mri": mri, "pet": pet})["pet"][0], dtype=np.float32)


def head_cut_by_grid(mri_box: torch.Tensor, tm: TrainedModel) -> str | None:
    """A warning when the head (``is_foreground`` of the first contrast of ``mri_box``, the MRI
    cropped to its foreground box at the model's spacing, [C, X, Y, Z]) is larger than the model
    grid on some axis, so that the grid cuts it and the synthesis is zero there."""
    start, end = generate_spatial_bounding_box(mri_box, select_fn=is_foreground, channel_indices=0)
    head = [int(e) - int(s) for s, e in zip(start, end)]
    if all(h <= g for h, g in zip(head, tm.prep.grid)):
        return None
    return (f"the head ({'x'.join(map(str, head))} voxels at {tm.prep.spacing[0]:g} mm) is larger than "
            f"the model grid {'x'.join(map(str, tm.prep.grid))}; the synthetic PET is zero where the grid cuts it")


def qc_score(bpv: float, qc: dict | None) -> float | None:
    """How many training standard deviations the MRI's bits per voxel lie above the training mean."""
    if not qc:
        return None
    return (bpv - qc["mri_bpv_mean"]) / max(qc["mri_bpv_std"], 1e-3)


def synthesize_file(tm: TrainedModel, mri_paths: list[Path], out: Path, opts: SynthesisOptions,
                    device: torch.device, std_out: Path | None = None, qc_png: Path | None = None,
                    warn=None, side: dict[str, str] | None = None) -> SynthesisResult:
    """Synthesize one PET from co-registered MRI file(s) given in ``tm.mri_columns`` order.

    ``side``: covariates such as {"age": "74", "dx": "AD"} for a model trained with side
    information (missing ones take their training defaults); ignored by other models.
    """
    start = time.monotonic()
    targets = [out] + [p for p in (std_out, qc_png) if p is not None]
    for path in (out, std_out):
        if path is not None:
            check_nifti_name(path)
    if qc_png is not None and qc_png.suffix.lower() != ".png":
        raise OutputError(f"{qc_png}: the QC picture is a PNG; give a name ending in .png")
    check_output_paths(targets, mri_paths, opts.overwrite)
    if len(mri_paths) != len(tm.mri_columns):
        raise InputError(f"{mri_paths[0]}: model expects {len(tm.mri_columns)} MRI modalities "
                         f"({', '.join(tm.mri_columns)}), got {len(mri_paths)}")
    volumes = [read_volume(p, what="MRI") for p in mri_paths]
    check_foreground(volumes[0])
    transform = preprocessing_for(tm)
    to_grid = next(i for i, step in enumerate(transform.transforms) if isinstance(step, ResizeWithPadOrCropd))
    boxed = transform({"mri": volume_to_metatensor(volumes)}, end=to_grid)
    head_cut = head_cut_by_grid(boxed["mri"], tm)
    data = transform(boxed, start=to_grid)
    check_fits(int(np.prod(tm.prep.grid)) // 8, tm.model.config.hidden, device, str(mri_paths[0]))
    mri = plain_tensor(data["mri"])[None].to(device)
    side_vector = tm.side.encode(side or {}, str(mri_paths[0]))[None].to(device) if tm.side else None
    generator = torch.Generator().manual_seed(opts.seed)
    temperature = opts.temperature_for(tm)
    try:
        with torch.no_grad():
            lp_mri, _ = tm.model.encode_mri(mri)
            draws = tm.model.sample(mri, temperature, opts.samples, generator, side_vector)[:, 0, 0]
    except torch.OutOfMemoryError:
        raise ResourceError(f"{mri_paths[0]}: model grid {tuple(tm.prep.grid)} does not fit in {device} memory; "
                            "use --device cpu or fewer --samples") from None
    bpv = bits_per_voxel(lp_mri, mri, tm.model.config.n_bins).item()
    z = qc_score(bpv, tm.qc)
    qc_warnings = [head_cut] if head_cut else []
    if z is not None and z > QC_Z_LIMIT:
        qc_warnings.append(f"unlike the training MRIs (MRI likelihood {bpv:.3f} bit/voxel, {z:.1f} SD above training)")
    for message in qc_warnings:
        if opts.strict_qc:
            raise QCError(f"{mri_paths[0]}: {message}")
        if warn:
            warn(f"{mri_paths[0]}: {message}")
    draws = pet_to_units(draws.float(), tm.prep)
    mean = to_native_grid(draws.mean(0), data, transform)
    std = to_native_grid(draws.std(0, unbiased=False), data, transform) if std_out else None
    if std is not None and opts.level_spread:
        std = with_level_spread(mean, std, tm.prep.pet_level_moments)
    reference = volumes[0]
    if mean.shape != reference.data.shape:
        raise InputError(f"{mri_paths[0]}: internal grid mismatch {mean.shape} vs {reference.data.shape}")
    with atomic_paths(targets, overwrite=opts.overwrite, inputs=mri_paths) as tmps:
        nib.save(nifti_image(mean, reference.affine), tmps[0])
        if std_out is not None:
            nib.save(nifti_image(std, reference.affine), tmps[1])
        if qc_png is not None:
            from medflow.qcplot import save_qc_png

            save_qc_png(tmps[-1], reference.affine, reference.data, mean, std,
                        title=f"{mri_paths[0].name}  T={temperature:g} N={opts.samples}")
    return SynthesisResult(temperature, bpv, z, qc_warnings, time.monotonic() - start)
