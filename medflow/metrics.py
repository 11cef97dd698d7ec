"""Image-similarity metrics of a predicted PET against a reference PET, inside a mask.

Conventions (stated in the README and in ``medflow evaluate --help``):

* Every metric is computed inside a mask: the one given, else ``reference_mask(ref)``, the
  reference foreground (voxels above 1 % of the reference's 99.5th percentile, closed with a
  3x3x3 cross twice and holes filled).
* Data range = max - min of the reference inside the mask, unless given explicitly.
* PSNR = 10 log10(data_range^2 / MSE), MSE over the mask voxels, in dB. Identical images (MSE 0)
  give ``PSNR_CAP`` = 999 dB, a finite value, since JSON has no infinity.
* SSIM = 3D SSIM map of scikit-image (Wang et al. 2004: Gaussian window sigma 1.5 truncated at
  3.5 sigma, i.e. 11 voxels wide; K1 0.01, K2 0.03; population covariances) of both volumes with
  every voxel outside the mask set to 0 (as skull-stripped volumes are), averaged over the mask
  voxels at least 5 voxels (the window radius) from the volume's edge, where the window does not
  see the mirrored padding. So SSIM, like the other metrics, depends only on the voxels inside the
  mask: a prediction equal to the reference there scores 1, whatever it holds outside. With a mask
  of ones this is exactly scikit-image's mean SSIM. Every side of the volume must have at least 11
  voxels.
* NMSE = sum (pred - ref)^2 / sum ref^2 over the mask (dimensionless).
* MAE = mean |pred - ref| over the mask, in the reference's units.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.metrics import structural_similarity

METRIC_NAMES = ("psnr", "ssim", "nmse", "mae")
PSNR_CAP = 999.0
FOREGROUND_FRACTION = 0.01
ROBUST_MAX_PERCENTILE = 99.5
SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5
SSIM_RADIUS = int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5)
SSIM_MIN_SIDE = 2 * SSIM_RADIUS + 1
CONVENTIONS = {
    "mask": "given mask, else reference foreground: > 1 % of the reference's 99.5th percentile, closed "
            "(3x3x3 cross, 2 iterations), holes filled",
    "data_range": "max - min of the reference inside the mask unless given",
    "psnr": f"10 log10(data_range^2 / MSE over the mask) in dB, {PSNR_CAP:g} for identical images",
    "ssim": f"scikit-image 3D SSIM (Gaussian sigma {SSIM_SIGMA}, K1 0.01, K2 0.03) of both volumes set to 0 "
            f"outside the mask, averaged over the mask voxels at least {SSIM_RADIUS} voxels from the edge",
    "nmse": "sum (pred - ref)^2 / sum ref^2 over the mask",
    "mae": "mean |pred - ref| over the mask, reference units",
}


def reference_mask(ref: np.ndarray) -> np.ndarray:
    """Foreground of a reference volume (X, Y, Z) as a bool array of the same shape.

    Voxels above ``FOREGROUND_FRACTION`` (1 %) of the 99.5th percentile of ``ref`` (a maximum
    robust to a few hot voxels), then a binary closing (3x3x3 cross, 2 iterations) to bridge
    thin gaps, then 3D hole filling so low-uptake structures inside the head are kept.
    """
    ref = np.asarray(ref)
    threshold = FOREGROUND_FRACTION * float(np.percentile(ref, ROBUST_MAX_PERCENTILE))
    mask = ref > threshold
    mask |= ndimage.binary_closing(mask, iterations=2)
    return ndimage.binary_fill_holes(mask)


def data_range_of(ref: np.ndarray, mask: np.ndarray) -> float:
    """max - min of ``ref`` inside ``mask``, in the reference's units."""
    values = np.asarray(ref)[np.asarray(mask, dtype=bool)]
    if values.size == 0:
        raise ValueError("the mask is empty")
    return float(values.max()) - float(values.min())


def psnr_from_mse(mse: float, data_range: float) -> float:
    """PSNR in dB for a mean squared error and a data range (capped at ``PSNR_CAP``)."""
    if mse == 0.0:
        return PSNR_CAP
    return min(PSNR_CAP, float(10.0 * np.log10(data_range**2 / mse)))


def _ssim(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray, data_range: float) -> float:
    if min(ref.shape) < SSIM_MIN_SIDE:
        raise ValueError(f"volume of shape {ref.shape} is too small for 3D SSIM: every side needs at least "
                         f"{SSIM_MIN_SIDE} voxels (Gaussian window sigma {SSIM_SIGMA})")
    _, ssim_map = structural_similarity(np.where(mask, ref, 0.0), np.where(mask, pred, 0.0), data_range=data_range,
                                        full=True, gaussian_weights=True, sigma=SSIM_SIGMA,
                                        use_sample_covariance=False)
    inner = np.zeros_like(mask)
    inner[tuple(slice(SSIM_RADIUS, side - SSIM_RADIUS) for side in mask.shape)] = True
    inside = mask & inner
    if not inside.any():
        raise ValueError(f"the mask has no voxel at least {SSIM_RADIUS} voxels from the volume's edge; "
                         "SSIM is undefined there")
    return float(ssim_map[inside].mean(dtype=np.float64))


def compute_metrics(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray | None = None,
                    data_range: float | None = None) -> dict[str, float]:
    """PSNR (dB), SSIM, NMSE and MAE (reference units) of ``pred`` against ``ref``, both (X, Y, Z).

    ``mask`` (bool, same shape) defaults to ``reference_mask(ref)``; ``data_range`` to
    ``data_range_of(ref, mask)``. Raises ValueError for mismatched shapes, a non-3D volume,
    non-finite values, an empty mask, a zero data range or a reference that is zero in the mask.
    """
    pred = np.asarray(pred, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    if ref.ndim != 3:
        raise ValueError(f"expected 3D volumes, got shape {ref.shape}")
    if not (np.isfinite(pred).all() and np.isfinite(ref).all()):
        raise ValueError("prediction or reference contains NaN or Inf")
    mask = reference_mask(ref) if mask is None else np.asarray(mask, dtype=bool)
    if mask.shape != ref.shape:
        raise ValueError(f"mask shape {mask.shape} differs from reference shape {ref.shape}")
    if not mask.any():
        raise ValueError("the mask is empty")
    data_range = data_range_of(ref, mask) if data_range is None else float(data_range)
    if not (np.isfinite(data_range) and data_range > 0):
        raise ValueError(f"data range {data_range} must be positive (constant reference inside the mask?)")
    diff = pred[mask] - ref[mask]
    ref_energy = float(np.sum(ref[mask] ** 2))
    if ref_energy == 0.0:
        raise ValueError("reference is zero everywhere inside the mask; NMSE is undefined")
    return {
        "psnr": psnr_from_mse(float(np.mean(diff**2)), data_range),
        "ssim": _ssim(pred, ref, mask, data_range),
        "nmse": float(np.sum(diff**2)) / ref_energy,
        "mae": float(np.mean(np.abs(diff))),
    }
