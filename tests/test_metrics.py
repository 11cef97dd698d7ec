"""Metrics against scikit-image, MONAI and numpy oracles."""

import numpy as np
import pytest
import torch
from monai.metrics import PSNRMetric
from scipy import ndimage
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from medflow.metrics import METRIC_NAMES, PSNR_CAP, compute_metrics, data_range_of, reference_mask

SHAPE = (24, 28, 20)


def smooth_volume(seed: int, shape=SHAPE) -> np.ndarray:
    """A random smooth non-negative volume, float32."""
    rng = np.random.default_rng(seed)
    return (ndimage.gaussian_filter(rng.random(shape), 2.0) * 10.0).astype(np.float32)


@pytest.fixture
def pair():
    ref = smooth_volume(0)
    pred = ref + 0.05 * smooth_volume(1) + 0.02 * np.random.default_rng(2).standard_normal(SHAPE).astype(np.float32)
    return pred, ref


def box_mask(shape=SHAPE) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[4:20, 5:22, 3:17] = True
    return mask


def test_full_mask_matches_skimage(pair):
    pred, ref = pair
    ones = np.ones(SHAPE, dtype=bool)
    result = compute_metrics(pred, ref, ones)
    data_range = float(ref.max() - ref.min())
    expected_psnr = peak_signal_noise_ratio(ref.astype(np.float64), pred.astype(np.float64), data_range=data_range)
    expected_ssim = structural_similarity(ref.astype(np.float64), pred.astype(np.float64), data_range=data_range,
                                          gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    assert result["psnr"] == pytest.approx(expected_psnr, abs=1e-9)
    assert result["ssim"] == pytest.approx(expected_ssim, abs=1e-9)
    assert set(result) == set(METRIC_NAMES)
    assert all(type(v) is float for v in result.values())


def test_full_mask_psnr_matches_monai(pair):
    pred, ref = pair
    data_range = float(ref.max() - ref.min())
    result = compute_metrics(pred, ref, np.ones(SHAPE, dtype=bool), data_range=data_range)
    metric = PSNRMetric(max_val=data_range)
    expected = metric(torch.from_numpy(pred[None, None]).double(), torch.from_numpy(ref[None, None]).double())
    assert result["psnr"] == pytest.approx(float(expected.item()), abs=1e-3)


def test_masked_psnr_matches_skimage_on_voxel_vectors(pair):
    pred, ref = pair
    mask = box_mask()
    result = compute_metrics(pred, ref, mask)
    data_range = data_range_of(ref, mask)
    assert data_range == pytest.approx(float(ref[mask].max() - ref[mask].min()))
    expected = peak_signal_noise_ratio(ref[mask].astype(np.float64), pred[mask].astype(np.float64),
                                       data_range=data_range)
    assert result["psnr"] == pytest.approx(expected, abs=1e-3)


def test_nmse_and_mae_match_numpy(pair):
    pred, ref = pair
    mask = box_mask()
    result = compute_metrics(pred, ref, mask)
    p, r = pred[mask].astype(np.float64), ref[mask].astype(np.float64)
    assert result["nmse"] == pytest.approx(np.sum((p - r) ** 2) / np.sum(r**2), rel=1e-6)
    assert result["mae"] == pytest.approx(np.mean(np.abs(p - r)), rel=1e-6)


def test_explicit_data_range_is_used(pair):
    pred, ref = pair
    mask = box_mask()
    low, high = compute_metrics(pred, ref, mask, data_range=5.0), compute_metrics(pred, ref, mask, data_range=50.0)
    assert high["psnr"] - low["psnr"] == pytest.approx(20.0, abs=1e-6)


def test_identical_images():
    ref = smooth_volume(3)
    result = compute_metrics(ref, ref.copy())
    assert result["psnr"] == PSNR_CAP
    assert np.isfinite(result["psnr"])
    assert result["ssim"] == pytest.approx(1.0, abs=1e-9)
    assert result["nmse"] == 0.0
    assert result["mae"] == 0.0


@pytest.mark.parametrize("outside", ["other volume", "zero"])
def test_ssim_sees_only_the_mask(outside):
    """A prediction equal to the reference inside the mask scores 1 whatever it holds outside,
    also right at the mask's edge, where the windows reach outside."""
    ref = smooth_volume(4)
    mask = np.zeros(SHAPE, dtype=bool)
    mask[:, :14, :] = True
    pred = ref.copy()
    pred[~mask] = smooth_volume(5)[~mask] if outside == "other volume" else 0.0
    inside_only = compute_metrics(pred, ref, mask)
    full = compute_metrics(pred, ref, np.ones(SHAPE, dtype=bool))
    assert inside_only["ssim"] == pytest.approx(1.0, abs=1e-12)
    assert full["ssim"] < 0.9
    assert inside_only["mae"] == 0.0


def test_masked_ssim_is_skimage_of_the_masked_volumes_over_the_inner_mask(pair):
    """Oracle: scikit-image's SSIM map of both volumes zeroed outside the mask, averaged over the
    mask voxels whose window does not reach the volume's edge (radius 5)."""
    pred, ref = pair
    mask = box_mask()
    mask[8:12, 9:13, 7:10] = False
    data_range = data_range_of(ref, mask)
    _, ssim_map = structural_similarity(np.where(mask, ref, 0).astype(np.float64),
                                        np.where(mask, pred, 0).astype(np.float64), data_range=data_range,
                                        full=True, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    inner = np.zeros(SHAPE, dtype=bool)
    inner[5:-5, 5:-5, 5:-5] = True
    expected = float(np.mean(ssim_map[mask & inner]))
    assert compute_metrics(pred, ref, mask)["ssim"] == pytest.approx(expected, abs=1e-12)
    other_outside = np.where(mask, pred, 100.0 * smooth_volume(6))
    assert compute_metrics(other_outside, ref, mask)["ssim"] == pytest.approx(expected, abs=1e-12)


def test_reference_mask_is_the_filled_foreground():
    ref = np.zeros(SHAPE, dtype=np.float32)
    ref[5:19, 6:22, 4:16] = 100.0
    ref[10:13, 12:15, 8:11] = 0.0
    ref[0, 0, 0] = 0.5
    mask = reference_mask(ref)
    assert mask.dtype == bool
    assert mask[11, 13, 9]
    assert mask.sum() == 14 * 16 * 12
    assert not mask[0, 0, 0]


def test_default_mask_is_the_reference_foreground(pair):
    pred, ref = pair
    ref = ref.copy()
    ref[:, :, :3] = 0.0
    assert compute_metrics(pred, ref) == compute_metrics(pred, ref, reference_mask(ref))


@pytest.mark.parametrize("pred_shape", [(24, 28, 19), (28, 24, 20)])
def test_shape_mismatch_is_an_error(pred_shape):
    with pytest.raises(ValueError, match="shape"):
        compute_metrics(np.zeros(pred_shape), smooth_volume(0))


def test_too_small_volume_is_an_error():
    small = smooth_volume(0, (24, 28, 8))
    with pytest.raises(ValueError, match="at least 11 voxels"):
        compute_metrics(small, small, np.ones(small.shape, dtype=bool))


@pytest.mark.parametrize("case", ["empty mask", "constant reference", "nan prediction"])
def test_degenerate_inputs_are_errors(case):
    ref, pred, mask = smooth_volume(0), smooth_volume(1), np.ones(SHAPE, dtype=bool)
    if case == "empty mask":
        mask[:] = False
    elif case == "constant reference":
        ref[:] = 1.0
    else:
        pred[3, 3, 3] = np.nan
    with pytest.raises(ValueError):
        compute_metrics(pred, ref, mask)
