"""Calibration of the spread of medflow's samples.

With N samples per subject (N/2 antithetic pairs, ``DualGlow.sample``), ``medflow synthesize``
writes their mean and (ddof 0) standard deviation. The uncertainty map is calibrated when the
truth lies within mean +- z std as often as it would for a model whose samples come from the
truth's own distribution (``ideal_coverage``: Student-t, because the std is an estimate from N/2
independent pairs; 82 % for z = 1.645 and N = 8, not 90 %). ``calibrate_temperature`` finds
the prior temperature at which a trained model reaches that coverage on validation subjects;
``medflow train`` records it and ``medflow synthesize`` samples at it unless ``--temperature``
is given.

A model trained on global-mean-normalised PET writes every synthesis at the training median
level, while a subject's own level follows dose and uptake time, which the MRI does not show;
``with_level_spread`` adds the training subjects' spread of that level to the std map.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from scipy.stats import t as student_t

from medflow.preprocess import PET_ZERO, global_region

COVERAGE_Z = 1.645  # mean +- 1.645 std: 90 % for the true predictive std
CALIBRATION_SAMPLES = 16
TEMPERATURE_RANGE = (0.05, 4.0)


def coverage(mean, std, ref, mask, z: float = COVERAGE_Z) -> float:
    """Fraction of ``mask`` voxels whose ``ref`` lies within mean +- z std (numpy or torch)."""
    inside = abs(ref - mean) <= z * std
    return float(inside[mask].sum()) / max(int(mask.sum()), 1)


def with_level_spread(mean, std, moments: tuple[float, float]):
    """The uncertainty map of a PET whose global level is unknown: the RMS deviation of the truth
    from the written ``mean`` m (numpy or torch, any shape, PET units at ``pet_level``), given the
    samples' ``std`` s of the uptake pattern and ``Preprocessing.pet_level_moments`` (E r²,
    E (r - 1)²) over the training levels r relative to ``pet_level``.

    For a truth r·p with r independent of the pattern p (whose mean and spread the samples give
    as m and s): E (r p - m)² = E r² s² + E (r - 1)² m². Moments (1, 0) give back ``std``."""
    mean_square, deviation = moments
    return (mean_square * std**2 + deviation * mean**2) ** 0.5


def _degrees_of_freedom(n: int) -> int:
    """(truth - mean) / std is Student-t with n/2 degrees of freedom for a perfectly calibrated
    Gaussian model sampled in n/2 antithetic pairs m +- s eps_k: their mean is m itself and their
    std (ddof 0, as ``medflow synthesize`` writes it) is s sqrt(chi2_{n/2} / (n/2)). Exact where
    the flow is affine in its noise, to first order in the temperature otherwise."""
    if n < 2 or n % 2:
        raise ValueError(f"coverage needs an even number of samples (antithetic pairs), got {n}")
    return n // 2


def ideal_coverage(z: float, n: int) -> float:
    """Coverage of mean +- z std (n samples) for a perfectly calibrated Gaussian model
    (0.82 for z = 1.645, n = 8)."""
    return float(2.0 * student_t.cdf(z, _degrees_of_freedom(n)) - 1.0)


def prediction_z(n: int, level: float = 0.90) -> float:
    """The z for which mean +- z std (n samples) holds the truth with probability ``level``
    under a perfectly calibrated Gaussian model: the finite-sample prediction interval."""
    return float(student_t.ppf(0.5 + level / 2.0, _degrees_of_freedom(n)))


@dataclass
class Calibration:
    """temperature: the calibrated T; coverage: what it reached on the validation subjects
    (fraction, mean over subjects), target: ``ideal_coverage(z, samples)``."""

    temperature: float
    coverage: float
    target: float
    z: float
    samples: int
    subjects: int

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def mean_coverage(model, items, temperature: float, samples: int, z: float, seed: int = 0) -> float:
    """Mean over ``items`` (mri, pet, side; PET in model space) of the fraction of the PET's
    global-mean region (SPM's voxels above 1/8 of the mean uptake, found on the uptake, which
    model space offsets by ``PET_ZERO``) within mean +- z std of ``samples`` draws at ``temperature``.
    Every call draws the same noise (``seed``), so the result grows smoothly with the temperature."""
    values = []
    for mri, pet, side in items:
        draws = model.sample(mri, temperature, samples, torch.Generator().manual_seed(seed), side)[:, 0, 0].float()
        truth = pet[0, 0].float()
        region = global_region(truth - PET_ZERO)
        values.append(coverage(draws.mean(0), draws.std(0, unbiased=False), truth, region, z))
    return sum(values) / len(values)


def calibrate_temperature(model, items, samples: int = CALIBRATION_SAMPLES, z: float = COVERAGE_Z,
                          iterations: int = 8) -> Calibration:
    """The temperature at which ``samples`` draws cover the truth of ``items`` (validation subjects
    as (mri, pet, side) tensors on the model grid, PET in the model's units) within mean +- z std
    as often as a perfectly calibrated model would: bisection on log T inside TEMPERATURE_RANGE
    (for a target it cannot reach, a temperature close to the end of the range it lies beyond)."""
    target = ideal_coverage(z, samples)
    low, high = (math.log(t) for t in TEMPERATURE_RANGE)
    for _ in range(iterations):
        middle = 0.5 * (low + high)
        if mean_coverage(model, items, math.exp(middle), samples, z) < target:
            low = middle
        else:
            high = middle
    temperature = math.exp(0.5 * (low + high))
    reached = mean_coverage(model, items, temperature, samples, z)
    return Calibration(round(temperature, 4), reached, target, z, samples, len(items))
