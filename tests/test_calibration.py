"""Calibration of the samples' spread against oracles with a known answer."""

import numpy as np
import pytest
import torch

from medflow import calibration
from medflow.preprocess import PET_ZERO, global_region
from medflow.trained import DEFAULT_TEMPERATURE, TrainedModel


def test_coverage_counts_mask_voxels_inside_the_interval():
    ref, mean, std = np.array([0.0, 1.0, 5.0, 0.0]), np.zeros(4), np.ones(4)
    assert calibration.coverage(mean, std, ref, np.array([True, True, True, False])) == pytest.approx(2 / 3)
    assert calibration.coverage(torch.zeros(4), torch.ones(4), torch.tensor([0.0, 1.0, 5.0, 0.0]),
                                torch.tensor([True, True, True, False])) == pytest.approx(2 / 3)


def test_ideal_coverage_matches_a_perfectly_calibrated_model():
    """Oracle: truth and 8 samples (4 antithetic pairs, as ``DualGlow.sample`` draws them) from the
    same Gaussian per voxel, mean and ddof-0 std from the samples; the measured coverage matches
    ``ideal_coverage`` (0.82 at z = 1.645, not 0.90) and the finite-sample interval ``prediction_z``
    holds 90 %."""
    rng = np.random.default_rng(0)
    loc, scale = rng.normal(size=200_000), rng.uniform(0.5, 2.0, 200_000)
    eps = rng.standard_normal((4, loc.size))
    draws = loc + scale * np.concatenate([eps, -eps])
    truth = loc + scale * rng.standard_normal(loc.size)
    mean, std, mask = draws.mean(0), draws.std(0), np.ones(loc.size, bool)
    assert calibration.ideal_coverage(1.645, 8) == pytest.approx(0.825, abs=0.002)
    assert calibration.coverage(mean, std, truth, mask) == pytest.approx(calibration.ideal_coverage(1.645, 8),
                                                                          abs=0.004)
    z = calibration.prediction_z(8)
    assert calibration.ideal_coverage(z, 8) == pytest.approx(0.90, abs=1e-9)
    assert calibration.coverage(mean, std, truth, mask, z) == pytest.approx(0.90, abs=0.004)
    assert calibration.ideal_coverage(1.645, 10**6) == pytest.approx(0.90, abs=1e-4)
    with pytest.raises(ValueError, match="even"):
        calibration.ideal_coverage(1.645, 7)


class GaussianModel:
    """Stands in for DualGlow: samples are loc + T * scale * eps in antithetic pairs, so temperature
    ``k`` reproduces a truth drawn as loc + k * scale * eps."""

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor):
        self.loc, self.scale = loc, scale

    def sample(self, mri, temperature, n, generator, side):
        eps = torch.randn((n // 2, 1, 1, *self.loc.shape), generator=generator)
        return self.loc + temperature * self.scale * torch.cat([eps, -eps])


@pytest.mark.parametrize("spread", [0.6, 1.0, 1.7])
def test_calibrated_temperature_recovers_the_spread_of_the_truth(spread):
    """Oracle: the truth is drawn with ``spread`` times the model's scale at T = 1, so the
    calibrated temperature must come out as ``spread``."""
    g = torch.Generator().manual_seed(1)
    shape = (40, 40, 40)
    loc, scale = 1.0 + 0.3 * torch.rand(shape, generator=g), 0.05 + 0.1 * torch.rand(shape, generator=g)
    model = GaussianModel(loc, scale)
    items = [(None, (loc + spread * scale * torch.randn(shape, generator=g))[None, None], None) for _ in range(2)]
    result = calibration.calibrate_temperature(model, items)
    assert result.temperature == pytest.approx(spread, rel=0.03)
    assert result.coverage == pytest.approx(calibration.ideal_coverage(calibration.COVERAGE_Z, 16), abs=0.01)
    assert (result.samples, result.subjects) == (16, 2)


def test_coverage_is_measured_on_the_global_region_of_the_uptake():
    """Oracle: a PET in model space (uptake / pet_scale + PET_ZERO) with zero-uptake background,
    low-uptake and high-uptake voxels. SPM's global region of the uptake holds the low and the high
    voxels, not the background. The model's draws hold the truth exactly at the high voxels and
    miss it far everywhere else, so the coverage is the high voxels' share of that region, 1/3."""
    uptake = torch.zeros(12, 12, 12)
    uptake[2:10, 2:10, 2:11] = 0.4
    uptake[2:10, 2:10, 8:11] = 1.0
    high = uptake == 1.0
    truth = uptake / 2.0 + PET_ZERO
    loc = torch.where(high, truth, truth + 10.0)
    model = GaussianModel(loc, torch.full_like(loc, 0.01))
    assert int(high.sum()) * 3 == int(global_region(uptake).sum())
    assert calibration.mean_coverage(model, [(None, truth[None, None], None)], 1.0, 16,
                                     calibration.COVERAGE_Z) == pytest.approx(1 / 3)


def test_temperature_falls_back_for_models_without_calibration():
    uncalibrated = TrainedModel(None, None, ["mri"], None, None)
    calibrated = TrainedModel(None, None, ["mri"], None, None, calibration={"temperature": 1.3})
    assert uncalibrated.temperature == DEFAULT_TEMPERATURE
    assert calibrated.temperature == 1.3


def test_level_spread_is_the_rms_deviation_of_a_truth_at_an_unknown_level():
    """Oracle: per voxel a pattern p ~ N(loc, scale) and, per subject, a level ratio r drawn from
    a set of training ratios; the truth is L0 r p and the written mean L0 loc. The RMS deviation of
    the truth from that mean, by Monte Carlo, matches ``with_level_spread`` of the pattern's std."""
    rng = np.random.default_rng(0)
    level, ratios = 1.3, np.array([0.8, 0.95, 1.0, 1.1, 1.25])
    moments = (float(np.mean(ratios**2)), float(np.mean((ratios - 1) ** 2)))
    loc, scale = rng.uniform(0.2, 2.0, 50), rng.uniform(0.05, 0.3, 50)
    truth = level * rng.choice(ratios, (200_000, 1)) * (loc + scale * rng.standard_normal((200_000, 50)))
    rms = np.sqrt(np.mean((truth - level * loc) ** 2, axis=0))
    predicted = calibration.with_level_spread(level * loc, level * scale, moments)
    assert predicted == pytest.approx(rms, rel=0.01)
    assert np.all(predicted > level * scale)
    assert calibration.with_level_spread(level * loc, level * scale, (1.0, 0.0)) == pytest.approx(level * scale)
    as_tensor = calibration.with_level_spread(torch.tensor(level * loc), torch.tensor(level * scale), moments)
    assert as_tensor.numpy() == pytest.approx(predicted)
