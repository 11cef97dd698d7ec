"""Preprocessing: the crop box comes from the first MRI contrast alone; the MRI's scaling; PET
global-mean normalisation."""

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from medflow.errors import InputError
from medflow.preprocess import (
    NormalizeGlobalMeand,
    PetOnMriGridd,
    Preprocessing,
    global_mean,
    grid_for,
    level_summary,
    pet_to_units,
    stage1,
    stage2,
)


def test_crop_box_follows_the_first_contrast_only():
    t1 = np.zeros((30, 30, 30), np.float32)
    t1[10:20, 8:22, 12:18] = 100.0
    flair = np.full((30, 30, 30), 5000.0, np.float32)
    mri = MetaTensor(torch.from_numpy(np.stack([t1, flair])), affine=torch.eye(4, dtype=torch.float64))
    alone = stage1((1.0, 1.0, 1.0), 0, keys=["mri"], load=False)({"mri": mri[:1].clone()})["mri"]
    both = stage1((1.0, 1.0, 1.0), 0, keys=["mri"], load=False)({"mri": mri})["mri"]
    assert tuple(alone.shape[1:]) == (10, 14, 6)
    assert tuple(both.shape[1:]) == (10, 14, 6)


def mri_on_grids(grids, mri_scaling: str) -> list[np.ndarray]:
    """A two-contrast head box, stage 1 (4 mm, no resampling) then stage 2 (evaluation) into each
    grid, its centre cut back to the box: [2, 20, 24, 20] per grid."""
    rng = np.random.default_rng(0)
    head = np.zeros((2, 20, 24, 20), np.float32)
    head[0, 2:18, 2:22, 2:18] = 50.0 + 100.0 * rng.random((16, 20, 16))
    head[1, 2:18, 2:22, 2:18] = 900.0 + 3000.0 * rng.random((16, 20, 16))
    affine = torch.diag(torch.tensor([4.0, 4.0, 4.0, 1.0], dtype=torch.float64))
    box = stage1((4.0, 4.0, 4.0), 2, keys=["mri"], load=False)({"mri": MetaTensor(torch.from_numpy(head),
                                                                                   affine=affine)})
    assert tuple(box["mri"].shape[1:]) == (20, 24, 20)
    cuts = []
    for grid in grids:
        out = stage2(Preprocessing((4.0, 4.0, 4.0), grid, mri_scaling=mri_scaling), train=False, keys=["mri"])(box)
        assert out["mri"].applied_operations[-1]["class"] == "ResizeWithPadOrCrop"  # synthesis inverts it
        start = [(g - b) // 2 for g, b in zip(grid, (20, 24, 20))]
        cuts.append(np.asarray(out["mri"][:, start[0]:start[0] + 20, start[1]:start[1] + 24, start[2]:start[2] + 20]))
    return box, cuts


def test_mri_scaling_maps_the_box_percentiles_in_any_grid():
    """Oracle: numpy's 0th and 99.5th percentiles of each contrast over the foreground box, mapped
    linearly to [-0.5, 0.5] and clipped; the same head comes out the same in a tight and a loose
    grid, and the padding at -0.5."""
    box, (tight, loose) = mri_on_grids([(24, 24, 24), (48, 48, 40)], "foreground_box")
    head = np.asarray(box["mri"])
    low, high = np.percentile(head, 0.0, axis=(1, 2, 3)), np.percentile(head, 99.5, axis=(1, 2, 3))
    np.testing.assert_allclose(box["mri_range"].numpy(), np.stack([low, high], axis=1), rtol=1e-6)
    expected = np.clip((head - low[:, None, None, None]) / (high - low)[:, None, None, None] - 0.5, -0.5, 0.5)
    np.testing.assert_allclose(tight, expected, atol=1e-6)
    np.testing.assert_array_equal(tight, loose)


def test_models_from_before_mri_scaling_scale_on_the_padded_grid():
    """Oracle: MONAI's ScaleIntensityRangePercentilesd on the padded grid, which is what their
    training did; there a head in a looser grid comes out brighter."""
    from monai.transforms import ResizeWithPadOrCropd, ScaleIntensityRangePercentilesd

    old = Preprocessing.from_dict({"spacing": [4, 4, 4], "grid": [24, 24, 24], "pet_scale": 3.0})
    assert old.mri_scaling == "padded_grid"
    assert Preprocessing((4.0, 4.0, 4.0), (24, 24, 24)).mri_scaling == "foreground_box"
    assert Preprocessing.from_dict(Preprocessing((4.0,) * 3, (8, 8, 8)).to_dict()).mri_scaling == "foreground_box"
    box, (tight, loose) = mri_on_grids([(24, 24, 24), (48, 48, 40)], "padded_grid")
    padded = ResizeWithPadOrCropd("mri", spatial_size=(24, 24, 24), mode="constant")({"mri": box["mri"]})
    expected = ScaleIntensityRangePercentilesd("mri", 0.0, 99.5, -0.5, 0.5, clip=True, channel_wise=True)(padded)
    np.testing.assert_array_equal(tight, np.asarray(expected["mri"])[:, 2:22, :, 2:22])
    assert loose[0][tight[0] > -0.5].mean() > tight[0][tight[0] > -0.5].mean() + 0.01


def test_an_unknown_mri_scaling_is_refused():
    with pytest.raises(ValueError, match="unknown mri_scaling 'global'"):
        Preprocessing.from_dict({"spacing": [4, 4, 4], "grid": [8, 8, 8], "pet_scale": 1.0, "mri_scaling": "global"})


def test_global_mean_is_spm_global():
    """Voxels at or below 1/8 of the whole mean (background, a faint rim) do not count."""
    pet = torch.zeros(10, 10, 10)
    pet[:5] = 2.0
    pet[5:, :2] = 0.05  # whole mean 1.001: the rim lies below 1.001 / 8
    assert global_mean(pet) == pytest.approx(2.0)
    pet[5:, :2] = 0.5  # now above 1.05 / 8: 500 voxels of 2 and 100 of 0.5
    assert global_mean(pet) == pytest.approx((500 * 2.0 + 100 * 0.5) / 600)
    assert global_mean(torch.zeros(4, 4, 4)) == 0.0


def test_global_mean_normalisation_removes_the_level_and_records_it():
    rng = np.random.default_rng(0)
    pattern = torch.from_numpy(rng.uniform(0.0, 3.0, (1, 12, 12, 12)).astype(np.float32))
    outs = [NormalizeGlobalMeand()({"pet": MetaTensor(level * pattern)}) for level in (1.0, 7.5)]
    assert torch.allclose(outs[0]["pet"], outs[1]["pet"], atol=1e-6)
    assert global_mean(outs[0]["pet"]) == pytest.approx(1.0)
    assert outs[1]["pet_global"] == pytest.approx(7.5 * outs[0]["pet_global"])
    empty = MetaTensor(torch.zeros(1, 4, 4, 4), meta={"filename_or_obj": "sub-01_pet.nii.gz"})
    with pytest.raises(InputError, match="sub-01_pet.nii.gz: PET has no positive signal"):
        NormalizeGlobalMeand()({"pet": empty})


def test_pet_units_follow_the_stored_level_and_old_configs_mean_no_normalisation():
    old = Preprocessing.from_dict({"spacing": [4, 4, 4], "grid": [8, 8, 8], "pet_scale": 3.0})
    assert (old.pet_normalization, old.pet_level, old.pet_level_moments) == ("none", 1.0, (1.0, 0.0))
    new = Preprocessing.from_dict({**old.to_dict(), "pet_normalization": "global_mean", "pet_level": 2.0,
                                   "pet_level_moments": [1.1, 0.05]})
    assert Preprocessing.from_dict(new.to_dict()) == new
    assert new.pet_level_moments == (1.1, 0.05)
    model_space = torch.tensor([-0.5, 0.0, 0.5])
    assert torch.allclose(pet_to_units(model_space, old), torch.tensor([0.0, 1.5, 3.0]))
    assert torch.allclose(pet_to_units(model_space, new), torch.tensor([0.0, 3.0, 6.0]))


def test_grid_holds_every_box_at_the_minimum_in_multiples_of_the_divisor():
    assert grid_for([(30, 41, 20), (33, 40, 17)], 8) == (40, 48, 24)
    assert grid_for([(30, 41, 20), (33, 40, 17)], 8, minimum=32) == (40, 48, 32)
    assert grid_for([(10, 10, 10)], 16, minimum=32) == (32, 32, 32)


def test_level_summary_is_the_median_and_the_moments_of_the_ratios_to_it():
    level, moments = level_summary([1.0, 4.0, 2.0])
    assert level == 2.0
    assert moments == pytest.approx(((0.25 + 1.0 + 4.0) / 3, (0.25 + 0.0 + 1.0) / 3))
    assert level_summary([3.0, 3.0]) == (3.0, (1.0, 0.0))


def _head(shape=(24, 24, 24)) -> np.ndarray:
    """A smooth blob in a zero background: [X, Y, Z] float32."""
    grid = np.stack(np.meshgrid(*(np.arange(n) - (n - 1) / 2 for n in shape), indexing="ij"))
    return np.clip(1.0 - (grid**2).sum(0) / 81.0, 0.0, None).astype(np.float32) * 100.0


def _tensor(data, affine) -> MetaTensor:
    return MetaTensor(torch.from_numpy(np.ascontiguousarray(data)[None]), affine=torch.as_tensor(affine, dtype=torch.float64),
                      meta={"filename_or_obj": "pet.nii.gz"})


def _pet_on_mri_grid(mri, pet):
    return PetOnMriGridd()({"mri": mri, "pet": pet})["pet"][0].numpy()


def test_pet_joins_the_mri_by_world_coordinates():
    """Oracle: the same PET cut to a smaller field of view (its header moved to match) gives the
    same values inside that field of view; a header that places the PET 8 mm away moves it by 4
    voxels of the 2 mm grid; a PET outside the MRI's field of view is an error naming the file."""
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    head = _head()
    mri = _tensor(head, affine)
    whole = _pet_on_mri_grid(mri, _tensor(head, affine))
    assert np.allclose(whole, head, atol=1e-4)
    cut = affine.copy()
    cut[:3, 3] = [8.0, 4.0, 0.0]
    part = _pet_on_mri_grid(mri, _tensor(head[4:20, 2:22, :], cut))
    assert part.shape == whole.shape == head.shape
    assert np.allclose(part[4:20, 2:22, :], whole[4:20, 2:22, :], atol=1e-4)
    assert np.all(part[:4] == 0)
    moved = affine.copy()
    moved[0, 3] = 8.0
    shifted = _pet_on_mri_grid(mri, _tensor(head, moved))
    assert np.allclose(shifted[4:], whole[:-4], atol=1e-4) and not np.allclose(shifted, whole)
    away = affine.copy()
    away[0, 3] = 500.0
    with pytest.raises(InputError, match="pet.nii.gz: no PET signal inside the MRI's field of view"):
        _pet_on_mri_grid(mri, _tensor(head, away))


@pytest.mark.parametrize("data", ["shifted_below_zero", "one_voxel"])
def test_an_mri_without_foreground_is_an_input_error(tmp_path, data):
    import nibabel as nib

    from medflow.imageio import read_volume
    from medflow.preprocess import check_foreground

    volume = _head() - 1000.0 if data == "shifted_below_zero" else np.zeros((24, 24, 24), np.float32)
    volume[12, 12, 12] = 5.0
    path = tmp_path / "mri.nii.gz"
    nib.save(nib.Nifti1Image(volume, np.eye(4)), path)
    with pytest.raises(InputError, match="mri.nii.gz: no foreground"):
        check_foreground(read_volume(path))
    nib.save(nib.Nifti1Image(_head(), np.eye(4)), path)
    check_foreground(read_volume(path))
