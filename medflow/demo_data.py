"""Realistic paired T1 / FLAIR / ASL / FDG-PET demo volumes built offline from the MNI ICBM152 2009 template.

Each subject is the template anatomy (GM, WM, CSF probabilities and brain mask shipped with
nilearn) under a random smooth deformation and global affine, aged and, for MCI/AD, atrophied;
from these tissue maps a scanner-like T1, a FLAIR with white-matter lesions, an FDG-PET with
an Alzheimer-type temporo-parietal hypometabolism, and an ASL perfusion (CBF) map that follows
the PET's tissue uptake (flow-metabolism coupling) at low resolution and SNR are simulated. The
recipe is described step by step in data/README.md. Everything is deterministic for a seed:
subject ``i`` draws from ``numpy.random.default_rng([seed, i])``, so it is the same whatever the
number of subjects.
"""

from __future__ import annotations

import csv
import functools
import gzip
import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from medflow.errors import OutputError
from medflow.imageio import make_folder, write_bytes_atomic

RECIPE_VERSION = 3
PARAMS_FILE = "demo.json"
MANIFEST_FILE = "manifest.csv"
MODALITIES = ("t1", "t2", "asl", "pet", "mask")
COLUMNS = ("subject", "mri", "pet", "mask", "t2", "asl", "age", "sex", "dx", "split")
DIAGNOSES = ("CN", "MCI", "AD")
FWHM_PER_SIGMA = 2.3548

# Rotation / scaling centre of the random affine, roughly the middle of the brain (MNI mm).
BRAIN_CENTRE = np.array([0.0, -18.0, 12.0])
# Alzheimer-type FDG hypometabolism: (x, y, z) MNI mm, Gaussian sigma mm, hemisphere (-1 L, 0 mid, 1 R).
HYPOMETABOLISM_BLOBS = (
    ((-45.0, -60.0, 30.0), 12.0, -1),  # angular gyrus
    ((45.0, -60.0, 30.0), 12.0, 1),
    ((0.0, -55.0, 30.0), 14.0, 0),  # precuneus / posterior cingulate
    ((-55.0, -25.0, -10.0), 12.0, -1),  # lateral temporal
    ((55.0, -25.0, -10.0), 12.0, 1),
)
# Extra atrophy without a matching metabolic drop: hippocampus / entorhinal cortex.
MEDIAL_TEMPORAL_BLOBS = (
    ((-25.0, -20.0, -18.0), 10.0, -1),
    ((25.0, -20.0, -18.0), 10.0, 1),
)
AGE_RANGE = (55.0, 90.0)  # years, uniform
# Fraction of GM uptake lost in the core of the hypometabolism pattern, per diagnosis.
METABOLIC_DROP = {"CN": (0.0, 0.03), "MCI": (0.05, 0.15), "AD": (0.15, 0.35)}
# Disease atrophy (fraction of GM lost) per unit of metabolic drop, drawn per subject: FDG
# hypometabolism precedes and exceeds atrophy in Alzheimer's disease, so the MRI shows it little.
ATROPHY_PER_DROP = (0.05, 0.25)
# Smooth variation of grey-matter uptake that no anatomy explains (regional metabolism): relative std
# per subject, and the spacing in mm of the spline knots it is drawn on.
METABOLIC_VARIATION = (0.04, 0.08)
METABOLIC_VARIATION_MM = 25.0
MAX_METABOLIC_VARIATION = 5.0  # largest multiple a dataset may ask for (up to 40 % std)
# Fraction of uptake lost where a white-matter lesion's local / remote (disconnection) weight is 1.
LESION_LOCAL_DROP = (0.3, 0.5)
LESION_REMOTE_DROP = (0.15, 0.25)
# ASL: grey-matter CBF in ml/100 g/min, GM / WM CBF ratio, CBF ~ metabolism ** exponent (flow-metabolism
# coupling, relative CBF changes smaller than FDG's), resolution (FWHM mm), noise std as a fraction of GM CBF.
ASL_GM_CBF = (45.0, 65.0)
ASL_GM_WM_RATIO = (2.0, 3.0)
ASL_COUPLING = (0.7, 1.0)
ASL_FWHM = (4.0, 6.0)
ASL_NOISE = (0.08, 0.15)


@dataclass
class DemoSubject:
    """One simulated subject on the output grid; every array has shape (X, Y, Z).

    t1, t2: float32 MRI in arbitrary scanner units; asl: float32 CBF in ml/100 g/min;
    pet: float32 SUV-like FDG uptake;
    mask: uint8 brain mask; gm, wm, csf: float32 tissue fractions after deformation and
    atrophy; lesions: float32 white-matter lesion load in [0, 1]; hypometabolism: float32
    weight in [0, 1] of the Alzheimer-type pattern (scaled by ``metabolic_drop`` in GM uptake).
    """

    name: str
    age: float
    sex: str
    dx: str
    metabolic_drop: float
    t1: np.ndarray
    t2: np.ndarray
    asl: np.ndarray
    pet: np.ndarray
    mask: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    lesions: np.ndarray
    hypometabolism: np.ndarray


@dataclass(frozen=True)
class _Template:
    """Template maps pre-smoothed to the output resolution, and the output grid."""

    gm: np.ndarray
    wm: np.ndarray
    mask: np.ndarray
    detail: np.ndarray  # T1 texture the tissue maps do not explain, in units of WM intensity
    source_origin: np.ndarray  # (3,) mm of voxel (0, 0, 0) of the maps
    source_step: float  # mm between voxels of the maps (1 mm template, block-averaged for coarse grids)
    shape: tuple[int, int, int]
    affine: np.ndarray  # (4, 4) output grid
    axes: tuple[np.ndarray, np.ndarray, np.ndarray]  # output voxel centres along x, y, z in mm


@functools.lru_cache(maxsize=2)
def _template(spacing: float) -> _Template:
    """ICBM152 2009 maps (1 mm, bundled with nilearn), anti-alias filtered to FWHM ~ ``spacing`` mm."""
    from nilearn import datasets

    t1_img = datasets.load_mni152_template(resolution=1)
    affine = np.asarray(t1_img.affine, dtype=float)
    if not np.allclose(affine[:3, :3], np.eye(3)):
        raise RuntimeError("expected the 1 mm MNI152 template on an axis-aligned RAS grid")
    t1 = np.asarray(t1_img.get_fdata(), dtype=np.float32)
    gm = np.asarray(datasets.load_mni152_gm_template(resolution=1).get_fdata(), dtype=np.float32)
    wm = np.asarray(datasets.load_mni152_wm_template(resolution=1).get_fdata(), dtype=np.float32)
    mask = np.asarray(datasets.load_mni152_brain_mask(resolution=1).get_fdata(), dtype=np.float32)
    gm *= mask
    wm *= mask
    csf = np.clip(mask - gm - wm, 0.0, 1.0)
    inside = mask > 0.5
    design = np.stack([gm[inside], wm[inside], csf[inside]], axis=1)
    coef = np.linalg.lstsq(design, t1[inside], rcond=None)[0]
    detail = (t1 - (coef[0] * gm + coef[1] * wm + coef[2] * csf)) * mask / coef[1]

    step = max(1, int(spacing // 2))
    sigma_mm = np.sqrt(max(max(spacing**2 - 1.0, 0.0) / FWHM_PER_SIGMA**2 - (step**2 - 1) / 12.0, 0.0))
    maps = [_block_mean(m, step) for m in (gm, wm, mask, detail)]
    if sigma_mm > 0:
        maps = [ndimage.gaussian_filter(m, sigma_mm / step) for m in maps]
    source_origin = affine[:3, 3] + (step - 1) / 2.0

    origin = affine[:3, 3]
    shape = tuple(int(np.floor((n - 1) / spacing)) + 1 for n in t1.shape)
    out_affine = affine.copy()
    out_affine[:3, :3] *= spacing
    axes = tuple((origin[d] + spacing * np.arange(shape[d])).astype(np.float32) for d in range(3))
    return _Template(*maps, source_origin=source_origin, source_step=float(step), shape=shape,
                     affine=out_affine, axes=axes)


def _block_mean(volume: np.ndarray, step: int) -> np.ndarray:
    """Average over non-overlapping step^3 blocks (a cheap first stage of the anti-alias filter)."""
    if step == 1:
        return volume
    cropped = volume[tuple(slice(0, n - n % step) for n in volume.shape)]
    blocks = cropped.reshape([x for n in cropped.shape for x in (n // step, step)])
    return blocks.mean(axis=(1, 3, 5))



def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], spacing: float, scale_mm: float) -> np.ndarray:
    """Low-frequency random field, zero mean and unit std: cubic spline through noise every ``scale_mm``."""
    coarse_shape = [max(2, int(np.ceil(n * spacing / scale_mm)) + 1) for n in shape]
    field = rng.standard_normal(coarse_shape).astype(np.float32)
    for axis, (n, c) in enumerate(zip(shape, coarse_shape)):
        field = np.moveaxis(np.tensordot(_spline_weights(n, c), field, axes=(1, axis)), 0, axis)
    return (field - field.mean()) / max(float(field.std()), 1e-6)


@functools.lru_cache(maxsize=32)
def _spline_weights(fine: int, coarse: int) -> np.ndarray:
    """(fine, coarse) float32 matrix: cubic-spline upsampling along one axis (separable zoom)."""
    return ndimage.zoom(np.eye(coarse, dtype=np.float64), (fine / coarse, 1), order=3).astype(np.float32)


def _demographics(rng: np.random.Generator, dx: str | None) -> tuple[float, str, str]:
    """Age ~ U(AGE_RANGE) to 0.1 year, sex, and a diagnosis that grows likelier to be MCI/AD with age."""
    age = round(float(rng.uniform(*AGE_RANGE)), 1)
    sex = "M" if rng.random() < 0.5 else "F"
    older = (age - AGE_RANGE[0]) / (AGE_RANGE[1] - AGE_RANGE[0])
    p_ad, p_mci = 0.08 + 0.37 * older, 0.22 + 0.13 * older
    drawn = str(rng.choice(DIAGNOSES, p=[1.0 - p_ad - p_mci, p_mci, p_ad]))
    return age, sex, dx or drawn


def _template_coordinates(tpl: _Template, rng: np.random.Generator, sex: str) -> np.ndarray:
    """(3, X, Y, Z) float32: template mm sampled by each output voxel (random affine + smooth warp)."""
    angles = np.deg2rad(rng.uniform(-5.0, 5.0, 3))
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rotation = (np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
                @ np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
                @ np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]]))
    head_size = rng.uniform(0.975, 1.025) * (1.01 if sex == "M" else 0.99)
    scaling = head_size * rng.uniform(0.99, 1.01, 3)
    matrix = rotation @ np.diag(1.0 / scaling)
    shift = BRAIN_CENTRE + rng.uniform(-3.0, 3.0, 3)
    relative = [tpl.axes[d] - BRAIN_CENTRE[d] for d in range(3)]
    amplitude = rng.uniform(1.5, 3.5)
    spacing = float(tpl.affine[0, 0])
    coords = np.empty((3, *tpl.shape), dtype=np.float32)
    for k in range(3):
        coords[k] = (matrix[k, 0] * relative[0][:, None, None] + matrix[k, 1] * relative[1][None, :, None]
                     + matrix[k, 2] * relative[2][None, None, :] + shift[k])
        coords[k] += amplitude * _smooth_field(rng, tpl.shape, spacing, 40.0)
    return coords


def _sample(tpl: _Template, volume: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """Trilinear sample of a template map at template mm ``coords`` (3, X, Y, Z)."""
    index = (coords - tpl.source_origin.astype(np.float32)[:, None, None, None]) / np.float32(tpl.source_step)
    return ndimage.map_coordinates(volume, index, order=1, mode="constant", cval=0.0, output=np.float32,
                                   prefilter=False)


def _pattern(coords: np.ndarray, blobs, weights: dict[int, float]) -> np.ndarray:
    """Sum of Gaussian blobs at template mm, clipped to [0, 1]; ``weights`` per hemisphere."""
    total = np.zeros(coords.shape[1:], dtype=np.float32)
    for centre, sigma, side in blobs:
        distance2 = sum((coords[d] - np.float32(centre[d])) ** 2 for d in range(3))
        total += np.float32(weights[side]) * np.exp(distance2 / np.float32(-2.0 * sigma**2))
    return np.clip(total, 0.0, 1.0)


def _lesions(rng: np.random.Generator, tpl: _Template, wm: np.ndarray, age: float) -> np.ndarray:
    """White-matter hyperintensity load in [0, 1]: a few smooth blobs inside WM, more with age."""
    spacing = float(tpl.affine[0, 0])
    load = np.zeros(tpl.shape, dtype=np.float32)
    candidates = np.flatnonzero(wm > 0.7)
    count = int(rng.poisson(2.0 + 14.0 * (age - 55.0) / 35.0))
    if candidates.size == 0:
        return load
    for flat in rng.choice(candidates, size=count):
        centre = np.unravel_index(flat, tpl.shape)
        sigma = rng.uniform(2.0, 6.0)
        blurred = np.sqrt(sigma**2 + (spacing / FWHM_PER_SIGMA) ** 2)
        peak = (sigma / blurred) ** 3
        offsets = [rng.uniform(-0.5, 0.5) * spacing for _ in range(3)]
        profiles = [np.exp(-((tpl.axes[d] - tpl.axes[d][centre[d]] - offsets[d]) ** 2) / (2 * blurred**2))
                    for d in range(3)]
        load += np.float32(peak) * (profiles[0][:, None, None] * profiles[1][None, :, None]
                                    * profiles[2][None, None, :]).astype(np.float32)
    return np.clip(load * 1.5, 0.0, 1.0) * np.clip(wm / 0.6, 0.0, 1.0)


def _bias_field(rng: np.random.Generator, shape, spacing: float, inside: np.ndarray) -> np.ndarray:
    """Smooth multiplicative field reaching +-15-20 % inside the brain."""
    field = _smooth_field(rng, shape, spacing, 80.0)
    field /= max(float(np.abs(field[inside]).max()), 1e-6)
    return 1.0 + np.float32(rng.uniform(0.15, 0.20)) * field


def _rician(rng: np.random.Generator, signal: np.ndarray, sigma: float) -> np.ndarray:
    """Magnitude of a complex signal with Gaussian noise of std ``sigma`` in each channel."""
    real = signal + np.float32(sigma) * rng.standard_normal(signal.shape, dtype=np.float32)
    imag = np.float32(sigma) * rng.standard_normal(signal.shape, dtype=np.float32)
    return np.sqrt(real * real + imag * imag)


def _t1(rng, tpl, gm, wm, csf, detail, inside) -> np.ndarray:
    """T1-weighted: WM > GM > CSF with random contrast, template texture, bias field, Rician noise."""
    contrast = wm + np.float32(rng.uniform(0.55, 0.70)) * gm + np.float32(rng.uniform(0.12, 0.30)) * csf
    contrast += np.float32(rng.uniform(0.5, 1.0)) * detail
    signal = contrast * _bias_field(rng, tpl.shape, float(tpl.affine[0, 0]), inside)
    noisy = _rician(rng, signal, rng.uniform(0.015, 0.035))
    return np.round(noisy * np.float32(rng.uniform(200.0, 1500.0)))


def _flair(rng, tpl, gm, wm, csf, lesions, inside) -> np.ndarray:
    """FLAIR: CSF suppressed, GM > WM, white-matter lesions bright; bias field and Rician noise."""
    contrast = gm + np.float32(rng.uniform(0.65, 0.80)) * wm + np.float32(rng.uniform(0.05, 0.15)) * csf
    contrast *= 1.0 + np.float32(rng.uniform(0.6, 1.0)) * lesions
    signal = contrast * _bias_field(rng, tpl.shape, float(tpl.affine[0, 0]), inside)
    noisy = _rician(rng, signal, rng.uniform(0.02, 0.04))
    return np.round(noisy * np.float32(rng.uniform(150.0, 1000.0)))


def lesion_pet_weights(lesions: np.ndarray, spacing: float) -> tuple[np.ndarray, np.ndarray]:
    """Where white-matter lesions lower FDG uptake: (local, remote) weights in [0, 1], each (X, Y, Z).

    local: the lesion load blurred over 3 mm and saturating; remote: blurred over 8 mm, reaching
    the cortex around the lesions (disconnection). Where a weight is 1 the uptake loses
    ``LESION_LOCAL_DROP`` / ``LESION_REMOTE_DROP`` of itself (fractions drawn per subject).
    """
    local = np.clip(3.0 * ndimage.gaussian_filter(lesions, 3.0 / spacing), 0.0, 1.0)
    remote = np.clip(6.0 * ndimage.gaussian_filter(lesions, 8.0 / spacing), 0.0, 1.0)
    return local, remote


def lower_uptake_at_lesions(uptake: np.ndarray, lesions: np.ndarray, spacing: float, local_drop: float,
                            remote_drop: float) -> np.ndarray:
    """``uptake`` (X, Y, Z, float32) times what survives the lesions, in place: it loses
    ``local_drop`` of itself where the local weight is 1, then ``remote_drop`` where the remote
    one is (``lesion_pet_weights``)."""
    local, remote = lesion_pet_weights(lesions, spacing)
    uptake *= 1.0 - np.float32(local_drop) * local
    uptake *= 1.0 - np.float32(remote_drop) * remote
    return uptake


def lesion_uptake_loss(lesions: np.ndarray, spacing: float) -> np.ndarray:
    """(X, Y, Z) fraction of FDG uptake the lesions take away at least (the smallest drops drawn)."""
    kept = lower_uptake_at_lesions(np.ones_like(lesions), lesions, spacing, LESION_LOCAL_DROP[0], LESION_REMOTE_DROP[0])
    return 1.0 - kept


def _resolution_sigma(fwhm: float, spacing: float) -> float:
    """Gaussian sigma in voxels that takes a volume at ``spacing`` mm to a resolution of ``fwhm`` mm."""
    return np.sqrt(max(fwhm**2 - spacing**2, 0.0)) / FWHM_PER_SIGMA / spacing


def _correlated_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """White Gaussian noise smoothed with a Gaussian of ``sigma`` voxels, scaled to unit std (float32)."""
    noise = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma)
    noise /= max(float(noise.std()), 1e-6)
    return noise


def _pet(rng, tpl, gm, wm, csf, hypometabolism, drop, lesions, inside, metabolic_variation: float = 1.0,
         noise: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """FDG-PET in SUV-like units: tissue uptake, hypometabolism, lesion effect, scanner blur and noise.
    Also returns the grey-matter uptake it was built from (relative, healthy mean 1; before the lesions).
    ``metabolic_variation`` scales the smooth 4-8 % variation of grey-matter uptake (0 leaves it out)
    and ``noise=False`` leaves out the scanner noise; every draw is made, so nothing else changes."""
    spacing = float(tpl.affine[0, 0])
    gm_uptake = (1.0 - np.float32(drop) * hypometabolism)
    amplitude = np.float32(rng.uniform(*METABOLIC_VARIATION) * metabolic_variation)
    variation = _smooth_field(rng, tpl.shape, spacing, METABOLIC_VARIATION_MM)
    if metabolic_variation:
        gm_uptake *= np.maximum(1.0 + amplitude * variation, 0.0)
    wm_uptake = 1.0 / rng.uniform(2.5, 3.0)
    csf_uptake = wm_uptake / rng.uniform(3.0, 4.0)
    uptake = gm * gm_uptake + np.float32(wm_uptake) * wm + np.float32(csf_uptake) * csf
    lower_uptake_at_lesions(uptake, lesions, spacing, rng.uniform(*LESION_LOCAL_DROP), rng.uniform(*LESION_REMOTE_DROP))
    uptake = ndimage.gaussian_filter(uptake, _resolution_sigma(rng.uniform(6.0, 8.0), spacing))
    uptake *= np.float32(rng.uniform(1.0, 1.5) / uptake[inside].mean())
    correlated = _correlated_noise(rng, tpl.shape, 2.5 / spacing)
    relative = np.float32(rng.uniform(0.03, 0.06))
    white = np.float32(0.01) * rng.standard_normal(tpl.shape, dtype=np.float32)
    if noise:
        uptake *= 1.0 + relative * correlated
        uptake += white
    return np.round(np.clip(uptake, 0.0, None) * 4096.0) / np.float32(4096.0), gm_uptake


def _asl(rng, tpl, gm, wm, gm_uptake, lesions, inside) -> np.ndarray:
    """ASL CBF map in ml/100 g/min: perfusion follows the PET's grey-matter uptake (hypometabolism,
    metabolic variation) to a power ``ASL_COUPLING`` and drops at lesions like it; CSF has none. A
    smooth labelling-efficiency / transit-delay field, low resolution, correlated noise, clipped at 0."""
    spacing = float(tpl.affine[0, 0])
    gm_cbf = rng.uniform(*ASL_GM_CBF)
    wm_cbf = gm_cbf / rng.uniform(*ASL_GM_WM_RATIO)
    cbf = gm * np.float32(gm_cbf) * gm_uptake ** np.float32(rng.uniform(*ASL_COUPLING)) + np.float32(wm_cbf) * wm
    lower_uptake_at_lesions(cbf, lesions, spacing, rng.uniform(*LESION_LOCAL_DROP), rng.uniform(*LESION_REMOTE_DROP))
    cbf *= _bias_field(rng, tpl.shape, spacing, inside)
    sigma = _resolution_sigma(rng.uniform(*ASL_FWHM), spacing)
    cbf = ndimage.gaussian_filter(cbf, sigma)
    noise = _correlated_noise(rng, tpl.shape, sigma)
    cbf += np.float32(rng.uniform(*ASL_NOISE) * gm_cbf) * noise
    return np.round(np.clip(cbf, 0.0, None) * 10.0) / np.float32(10.0)


def make_demo_subject(index: int, *, seed: int = 0, spacing: float = 2.0, dx: str | None = None,
                      flair_lesions: bool = True, asl_metabolism: bool = True, metabolic_variation: float = 1.0,
                      pet_noise: bool = True) -> DemoSubject:
    """Simulate subject ``index`` (named ``sub-{index+1:03d}``) of the demo cohort for ``seed``.

    ``dx`` forces the diagnosis (CN, MCI or AD) instead of drawing it; all other draws are unchanged.
    ``flair_lesions=False`` leaves the lesions out of the FLAIR only (the PET and ``lesions`` keep
    them, every draw is unchanged): the same subject's FLAIR without the information it adds.
    ``asl_metabolism=False`` makes the ASL from a uniform grey-matter uptake (no hypometabolism, no
    metabolic variation; every draw unchanged): the same subject's ASL without what it shows of the
    PET beyond the tissue maps and the lesions. ``metabolic_variation`` multiplies the smooth
    variation of grey-matter uptake that the PET and the ASL show (``METABOLIC_VARIATION``; 0 leaves
    it out, 4 makes it 16-32 %), ``pet_noise=False`` leaves the scanner noise out of the PET (every
    draw unchanged): together they give the part of a PET that only the ASL shows.
    """
    if dx is not None and dx not in DIAGNOSES:
        raise ValueError(f"dx must be one of {', '.join(DIAGNOSES)}, not {dx!r}")
    tpl = _template(float(spacing))
    rng = np.random.default_rng([seed, index])
    age, sex, diagnosis = _demographics(rng, dx)
    coords = _template_coordinates(tpl, rng, sex)
    gm, wm, mask, detail = (_sample(tpl, m, coords) for m in (tpl.gm, tpl.wm, tpl.mask, tpl.detail))
    csf = np.clip(mask - gm - wm, 0.0, 1.0)
    inside = mask > 0.5

    drop = float(rng.uniform(*METABOLIC_DROP[diagnosis]))
    hemisphere = {-1: rng.uniform(0.75, 1.0), 0: 1.0, 1: rng.uniform(0.75, 1.0)}
    hypometabolism = _pattern(coords, HYPOMETABOLISM_BLOBS, hemisphere)
    medial_temporal = _pattern(coords, MEDIAL_TEMPORAL_BLOBS, hemisphere)
    structural = drop * rng.uniform(*ATROPHY_PER_DROP)
    atrophy = np.clip(0.003 * (age - 55.0) + structural * (0.3 + 0.7 * np.maximum(hypometabolism, medial_temporal)),
                      0.0, 0.6).astype(np.float32)
    csf += gm * atrophy
    gm *= 1.0 - atrophy
    lesions = _lesions(rng, tpl, wm, age)

    t1 = _t1(rng, tpl, gm, wm, csf, detail, inside)
    t2 = _flair(rng, tpl, gm, wm, csf, lesions if flair_lesions else np.zeros_like(lesions), inside)
    pet, gm_uptake = _pet(rng, tpl, gm, wm, csf, hypometabolism, drop, lesions, inside, metabolic_variation, pet_noise)
    asl = _asl(rng, tpl, gm, wm, gm_uptake if asl_metabolism else np.ones_like(gm_uptake), lesions, inside)
    return DemoSubject(f"sub-{index + 1:03d}", age, sex, diagnosis, drop, t1, t2, asl, pet,
                       inside.astype(np.uint8), gm, wm, csf, lesions, hypometabolism)


def write_params(out: Path, params: dict, complete: bool) -> None:
    """demo.json: the recipe's parameters and whether every file has been written."""
    payload = json.dumps({"parameters": params, "complete": complete}, indent=2).encode()
    write_bytes_atomic(out / PARAMS_FILE, payload, overwrite=True)


def _nifti_bytes(data: np.ndarray, affine: np.ndarray) -> bytes:
    """Gzipped NIfTI-1 with a fixed gzip timestamp, so equal volumes give equal files."""
    import nibabel as nib

    image = nib.Nifti1Image(data, affine)
    image.header.set_xyzt_units("mm")
    image.set_sform(affine, code=4)
    image.set_qform(affine, code=4)
    return gzip.compress(image.to_bytes(), compresslevel=1, mtime=0)


def _subject_files(out: Path, name: str) -> dict[str, Path]:
    return {m: out / f"{name}_{m}.nii.gz" for m in MODALITIES}


def _read_params(out: Path) -> dict | None:
    """The record in ``out/demo.json`` ({"parameters": ..., "complete": ...}), None without one;
    OutputError for a demo.json that is not a demo dataset's record (medflow leaves such a folder alone)."""
    path = out / PARAMS_FILE
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise OutputError(f"{path}: not a medflow demo dataset's record ({exc}); choose another folder") from None
    if not (isinstance(record, dict) and isinstance(record.get("parameters"), dict)
            and "recipe" in record["parameters"]):
        raise OutputError(f"{path}: not a medflow demo dataset's record; choose another folder")
    return record


def dataset_parameters(subjects: int, *, seed: int = 0, spacing: float = 2.0, heldout: int = 0,
                       dx: Sequence[str] | None = None, metabolic_variation: float = 1.0) -> dict:
    """What ``demo.json`` records of the dataset ``make_demo_dataset`` makes with these arguments
    (``metabolic_variation`` only where it is not the recipe's 1, so older datasets still match)."""
    params = {"recipe": RECIPE_VERSION, "subjects": int(subjects), "seed": int(seed), "spacing": float(spacing),
              "heldout": int(heldout), "dx": list(dx) if dx is not None else None}
    if metabolic_variation != 1.0:
        params["metabolic_variation"] = float(metabolic_variation)
    return params


def recorded_parameters(out_dir: Path) -> dict | None:
    """The parameters ``out_dir/demo.json`` records (``dataset_parameters``), None without one."""
    recorded = _read_params(Path(out_dir))
    return None if recorded is None else recorded["parameters"]


def _dataset_files(out: Path) -> list[Path]:
    """Files of a demo dataset already in ``out`` (ours or an older recipe's)."""
    if not out.is_dir():
        return []
    names = {PARAMS_FILE, MANIFEST_FILE}
    return sorted(p for p in out.iterdir() if p.name in names
                  or (p.name.startswith("sub-") and p.name.endswith(tuple(f"_{m}.nii.gz" for m in MODALITIES))))


def _remove_previous(out: Path, files: list[Path]) -> None:
    """Delete the files of a previous demo dataset (which its demo.json marks as one)."""
    for path in files:
        try:
            path.unlink()
        except OSError as exc:
            raise OutputError(f"{path}: cannot remove ({exc.strerror or exc})") from None


def make_demo_dataset(out_dir: Path, subjects: int, *, seed: int = 0, spacing: float = 2.0, heldout: int = 0,
                      dx: Sequence[str] | None = None, metabolic_variation: float = 1.0, overwrite: bool = False,
                      progress: Callable[[int, int], None] | None = None) -> Path:
    """Write a paired demo cohort to ``out_dir``; return the path of its ``manifest.csv``.

    Per subject ``sub-XXX``: ``sub-XXX_t1.nii.gz`` (T1, arbitrary units), ``sub-XXX_t2.nii.gz``
    (FLAIR with white-matter lesions), ``sub-XXX_asl.nii.gz`` (ASL CBF, ml/100 g/min),
    ``sub-XXX_pet.nii.gz`` (FDG, SUV-like) as float32 and ``sub-XXX_mask.nii.gz`` (uint8 brain
    mask), all (X, Y, Z) on the MNI grid at ``spacing`` mm (99 x 117 x 95 at 2 mm).
    ``manifest.csv`` has the columns subject, mri, pet, mask, t2, asl, age, sex, dx, split (paths relative to the CSV; the last ``heldout`` subjects have split=test).

    ``dx``: optional diagnosis per subject (CN, MCI, AD) instead of the drawn ones.
    ``metabolic_variation``: multiple of the recipe's smooth grey-matter uptake variation, which the
    PET and the ASL show and the T1 and FLAIR do not (``make_demo_subject``).
    A folder holding a complete dataset made with the same parameters (``demo.json``) is reused
    as is, an interrupted one is completed; a different dataset raises OutputError unless
    ``overwrite``: then the previous demo dataset's files are removed (files of that naming without
    a ``demo.json`` are only replaced where names coincide). ``progress(done, total)`` is
    called after each subject.
    """
    if subjects < 1:
        raise ValueError("subjects must be at least 1")
    if not 0 <= heldout <= subjects:
        raise ValueError(f"heldout must be between 0 and the number of subjects ({subjects})")
    if not 0.5 <= spacing <= 16.0:
        raise ValueError("spacing must be between 0.5 and 16 mm")
    if dx is not None and (len(dx) != subjects or any(d not in DIAGNOSES for d in dx)):
        raise ValueError(f"dx must list one of {', '.join(DIAGNOSES)} per subject")
    if not 0.0 <= metabolic_variation <= MAX_METABOLIC_VARIATION:
        raise ValueError(f"metabolic_variation must be between 0 and {MAX_METABOLIC_VARIATION:g}")
    out = Path(out_dir)
    params = dataset_parameters(subjects, seed=seed, spacing=spacing, heldout=heldout, dx=dx,
                                metabolic_variation=metabolic_variation)
    names = [f"sub-{i + 1:03d}" for i in range(subjects)]
    csv_path = out / MANIFEST_FILE
    wanted = [csv_path] + [p for name in names for p in _subject_files(out, name).values()]

    existing = _read_params(out)
    same = existing is not None and existing.get("parameters") == params
    if same and existing.get("complete") and all(p.exists() for p in wanted):
        return csv_path
    if not same:
        old = _dataset_files(out)
        if old and not overwrite:
            what = "a demo dataset made with other parameters" if existing else f"other files ({old[0].name}, ...)"
            raise OutputError(f"{out}: holds {what}; pass --overwrite to replace it")
        _remove_previous(out, old if existing is not None else [])
    make_folder(out)

    write_params(out, params, complete=False)
    rows = []
    for index, name in enumerate(names):
        forced = dx[index] if dx is not None else None
        files = _subject_files(out, name)
        if not (same and all(p.exists() for p in files.values())):
            subject = make_demo_subject(index, seed=seed, spacing=spacing, dx=forced,
                                        metabolic_variation=metabolic_variation)
            affine = _template(float(spacing)).affine
            for modality, path in files.items():
                write_bytes_atomic(path, _nifti_bytes(getattr(subject, modality), affine), overwrite=True)
        age, sex, diagnosis = _demographics(np.random.default_rng([seed, index]), forced)
        rows.append({"subject": name, "mri": files["t1"].name, "pet": files["pet"].name,
                     "mask": files["mask"].name, "t2": files["t2"].name, "asl": files["asl"].name, "age": f"{age:.1f}", "sex": sex,
                     "dx": diagnosis, "split": "test" if index >= subjects - heldout else "train"})
        if progress is not None:
            progress(index + 1, subjects)

    write_bytes_atomic(csv_path, _csv_text(rows).encode(), overwrite=True)
    write_params(out, params, complete=True)
    return csv_path


def _csv_text(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()
