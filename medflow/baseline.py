"""Intensity-mapping baseline: PET predicted by a polynomial of the smoothed, normalised T1.

The simplest thing that could work: it knows tissue contrast (grey matter is brighter in
PET) but nothing about disease patterns. Fitted on training pairs inside brain masks;
works on any co-registered MRI/PET pair because it is voxel-wise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

PET_FWHM_MM = 6.0


def smoothed_t1(t1: np.ndarray, mask: np.ndarray, zooms) -> np.ndarray:
    """T1 divided by its 99.5th percentile inside the mask, blurred to PET resolution."""
    scale = np.percentile(t1[mask], 99.5) or 1.0
    sigma = [PET_FWHM_MM / 2.355 / z for z in zooms]
    return ndimage.gaussian_filter(t1 / scale, sigma)


@dataclass
class IntensityMapping:
    """PET ~ polynomial(smoothed T1) of degree ``degree``."""

    coefficients: np.ndarray | None = None
    degree: int = 3

    def fit(self, pairs) -> "IntensityMapping":
        """pairs: iterable of (t1, pet, mask, zooms) on each subject's own grid."""
        xs, ys = [], []
        for t1, pet, mask, zooms in pairs:
            xs.append(smoothed_t1(t1, mask, zooms)[mask].astype(np.float64))
            ys.append(pet[mask].astype(np.float64))
        self.coefficients = np.polyfit(np.concatenate(xs), np.concatenate(ys), self.degree)
        return self

    def predict(self, t1: np.ndarray, mask: np.ndarray, zooms) -> np.ndarray:
        """Predicted PET [X, Y, Z] (zero outside the mask)."""
        pred = np.polyval(self.coefficients, smoothed_t1(t1, mask, zooms))
        return np.where(mask, np.clip(pred, 0, None), 0).astype(np.float32)
