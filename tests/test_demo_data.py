"""The demo-data recipe: files, manifest, tissue contrast, disease pattern, determinism, reuse."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest

from medflow.demo_data import COLUMNS, lesion_pet_weights, lesion_uptake_loss, make_demo_dataset, make_demo_subject
from medflow.errors import OutputError

SPACING = 8.0
DX = ["CN", "AD", "AD"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A 3-subject dataset at 8 mm (CN, AD, AD; the last one held out) and its manifest rows."""
    out = tmp_path_factory.mktemp("demo")
    csv_path = make_demo_dataset(out, 3, seed=7, spacing=SPACING, heldout=1, dx=DX)
    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    return csv_path, rows


def load(csv_path, value):
    image = nib.load(csv_path.parent / value)
    return image, np.asarray(image.dataobj)


def test_files_and_manifest(dataset):
    csv_path, rows = dataset
    assert csv_path.name == "manifest.csv"
    assert tuple(rows[0]) == COLUMNS
    assert [r["subject"] for r in rows] == ["sub-001", "sub-002", "sub-003"]
    assert [r["split"] for r in rows] == ["train", "train", "test"]
    assert [r["dx"] for r in rows] == DX
    for row in rows:
        assert 55.0 <= float(row["age"]) <= 90.0 and row["sex"] in ("M", "F")
        images = {c: load(csv_path, row[c]) for c in ("mri", "t2", "asl", "pet", "mask")}
        assert row["mri"] == f"{row['subject']}_t1.nii.gz"
        reference = images["mri"][0]
        assert np.allclose(np.diag(reference.affine)[:3], SPACING)
        for column, (image, data) in images.items():
            assert data.ndim == 3 and data.shape == reference.shape
            assert np.allclose(image.affine, reference.affine)
            assert data.dtype == (np.uint8 if column == "mask" else np.float32)
            assert np.isfinite(data).all()
        mask = images["mask"][1].astype(bool)
        assert set(np.unique(mask)) == {False, True}
        for column in ("mri", "t2", "asl", "pet"):
            data = images[column][1]
            assert data.min() >= 0 and data[mask].mean() > 5 * data[~mask].mean()
        assert 0.8 < images["pet"][1][mask].mean() < 1.8


def test_saved_volumes_match_simulation(dataset):
    csv_path, rows = dataset
    subject = make_demo_subject(1, seed=7, spacing=SPACING, dx="AD")
    assert np.array_equal(load(csv_path, rows[1]["pet"])[1], subject.pet)
    assert np.array_equal(load(csv_path, rows[1]["t2"])[1], subject.t2)
    assert np.array_equal(load(csv_path, rows[1]["asl"])[1], subject.asl)
    assert subject.age == float(rows[1]["age"]) and subject.sex == rows[1]["sex"]


def test_pet_tissue_contrast():
    for index in range(3):
        subject = make_demo_subject(index, seed=3, spacing=SPACING)
        gm, wm, csf = (subject.pet[getattr(subject, t) > 0.6].mean() for t in ("gm", "wm", "csf"))
        assert gm > wm > csf


def test_alzheimer_hypometabolism():
    def pattern_ratio(subject):
        cortex = subject.gm > 0.5
        region = subject.hypometabolism > 0.5
        return subject.pet[cortex & region].mean() / subject.pet[cortex & ~region].mean()

    for index in range(3):
        healthy = make_demo_subject(index, seed=11, spacing=SPACING, dx="CN")
        patient = make_demo_subject(index, seed=11, spacing=SPACING, dx="AD")
        assert pattern_ratio(patient) < pattern_ratio(healthy) - 0.05
        assert patient.age == healthy.age and np.array_equal(patient.lesions, healthy.lesions)


def test_asl_perfusion_follows_the_pet_uptake():
    """GM perfuses more than WM, CSF not at all; the AD pattern lowers ASL where it lowers FDG; and the
    ASL tracks the PET's uptake beyond what the tissue maps explain (the metabolic variation)."""
    for index in range(3):
        healthy = make_demo_subject(index, seed=11, spacing=4.0, dx="CN")
        patient = make_demo_subject(index, seed=11, spacing=4.0, dx="AD")
        gm, wm, csf = (healthy.asl[getattr(healthy, t) > 0.6].mean() for t in ("gm", "wm", "csf"))
        assert 30 < gm < 70 and gm > 1.3 * wm and wm > 1.5 * csf
        cortex, region = patient.gm > 0.5, patient.hypometabolism > 0.5
        assert (patient.asl[cortex & region].mean() / patient.asl[cortex & ~region].mean()
                < healthy.asl[cortex & region].mean() / healthy.asl[cortex & ~region].mean() - 0.05)
        grey = healthy.gm > 0.8
        with_pet = np.corrcoef(healthy.asl[grey], healthy.pet[grey])[0, 1]
        assert with_pet > 0.2 and with_pet > abs(np.corrcoef(healthy.asl[grey], healthy.t1[grey])[0, 1])


def test_lesions_lower_pet_and_show_in_flair_only():
    subject = make_demo_subject(0, seed=5, spacing=4.0, dx="CN")
    lesion = subject.lesions > 0.5
    clean = (subject.wm > 0.9) & (subject.lesions < 0.01)
    assert lesion.sum() > 5
    assert subject.t2[lesion].mean() > 1.2 * subject.t2[clean].mean()
    assert subject.pet[lesion].mean() < subject.pet[clean].mean()
    assert abs(subject.t1[lesion].mean() / subject.t1[clean].mean() - 1) < 0.1


def test_lesions_lower_uptake_in_the_cortex_around_them():
    subject = make_demo_subject(0, seed=5, spacing=4.0, dx="CN")
    local, remote = lesion_pet_weights(subject.lesions, 4.0)
    loss = lesion_uptake_loss(subject.lesions, 4.0)
    cortex_only_remote = (subject.gm > 0.5) & (remote > 0.5) & (local < 0.05)
    assert cortex_only_remote.sum() > 5
    assert np.all(loss >= 0.3 * local - 1e-6) and np.all(loss >= 0.15 * remote - 1e-6)
    assert np.all(loss[(subject.lesions == 0) & (remote == 0)] == 0)


def test_flair_without_lesions_changes_the_flair_only():
    subject = make_demo_subject(0, seed=5, spacing=4.0, dx="CN")
    clean = make_demo_subject(0, seed=5, spacing=4.0, dx="CN", flair_lesions=False)
    for name in ("t1", "pet", "lesions", "mask"):
        assert np.array_equal(getattr(subject, name), getattr(clean, name)), name
    lesion, unaffected = subject.lesions > 0.5, subject.lesions == 0
    assert clean.t2[lesion].mean() < 0.8 * subject.t2[lesion].mean()
    assert np.array_equal(clean.t2[unaffected], subject.t2[unaffected])


def test_asl_without_metabolism_changes_the_asl_only():
    subject = make_demo_subject(0, seed=5, spacing=4.0, dx="AD")
    flat = make_demo_subject(0, seed=5, spacing=4.0, dx="AD", asl_metabolism=False)
    for name in ("t1", "t2", "pet", "lesions", "mask"):
        assert np.array_equal(getattr(subject, name), getattr(flat, name)), name
    cortex, region = subject.gm > 0.5, subject.hypometabolism > 0.5
    assert (flat.asl[cortex & region].mean() / flat.asl[cortex & ~region].mean()
            > subject.asl[cortex & region].mean() / subject.asl[cortex & ~region].mean() + 0.05)


def test_pet_without_metabolic_variation_or_noise_changes_nothing_else():
    subject = make_demo_subject(0, seed=5, spacing=4.0)
    quiet = make_demo_subject(0, seed=5, spacing=4.0, pet_noise=False)
    flat = make_demo_subject(0, seed=5, spacing=4.0, pet_noise=False, metabolic_variation=0.0)
    for name in ("t1", "t2", "lesions", "mask"):
        assert np.array_equal(getattr(subject, name), getattr(flat, name)), name
    assert np.array_equal(subject.asl, quiet.asl) and not np.array_equal(subject.asl, flat.asl)
    brain = subject.mask > 0
    noise = (subject.pet - quiet.pet)[brain] / subject.pet[brain].mean()
    assert 0.02 < noise.std() < 0.07 and abs(noise.mean()) < 0.005  # 3-6 % of the uptake, plus 0.01
    variation = (quiet.pet - flat.pet)[brain & (subject.gm > 0.5)] / quiet.pet[brain & (subject.gm > 0.5)]
    assert 0.01 < variation.std() < 0.08  # 4-8 % of grey-matter uptake, blurred


def test_metabolic_variation_multiple_scales_only_the_variation():
    def variation(k):
        subject = make_demo_subject(0, seed=5, spacing=4.0, pet_noise=False, metabolic_variation=k)
        return subject, subject.pet[cortex] / subject.pet[cortex].mean()

    base = make_demo_subject(0, seed=5, spacing=4.0)
    cortex = (base.mask > 0) & (base.gm > 0.5)
    (flat, zero), (_, one), (strong, three) = variation(0.0), variation(1.0), variation(3.0)
    assert (three - zero).std() == pytest.approx(3 * (one - zero).std(), rel=0.1)
    assert np.corrcoef(three - zero, one - zero)[0, 1] > 0.98
    for name in ("t1", "t2", "lesions", "mask"):
        assert np.array_equal(getattr(strong, name), getattr(base, name)), name
    assert not np.array_equal(strong.asl, base.asl) and not np.array_equal(flat.asl, base.asl)


def test_dataset_records_a_metabolic_variation_multiple(tmp_path):
    make_demo_dataset(tmp_path / "recipe", 1, seed=3, spacing=SPACING)
    assert "metabolic_variation" not in json.loads((tmp_path / "recipe" / "demo.json").read_text())["parameters"]
    make_demo_dataset(tmp_path / "strong", 1, seed=3, spacing=SPACING, metabolic_variation=4.0)
    assert json.loads((tmp_path / "strong" / "demo.json").read_text())["parameters"]["metabolic_variation"] == 4.0

    def same(name):
        return np.array_equal(*(load(tmp_path / folder / "x", name)[1] for folder in ("recipe", "strong")))

    assert same("sub-001_t1.nii.gz") and same("sub-001_t2.nii.gz") and not same("sub-001_pet.nii.gz")
    with pytest.raises(OutputError):
        make_demo_dataset(tmp_path / "strong", 1, seed=3, spacing=SPACING)
    with pytest.raises(ValueError, match="metabolic_variation"):
        make_demo_dataset(tmp_path / "other", 1, seed=3, spacing=SPACING, metabolic_variation=6.0)


def test_deterministic_per_seed():
    first = make_demo_subject(2, seed=4, spacing=SPACING)
    again = make_demo_subject(2, seed=4, spacing=SPACING)
    other = make_demo_subject(2, seed=5, spacing=SPACING)
    for name in ("t1", "t2", "asl", "pet", "mask"):
        assert np.array_equal(getattr(first, name), getattr(again, name))
    assert not np.array_equal(first.pet, other.pet)


def test_rerun_reuses_and_refuses_a_different_dataset(dataset):
    csv_path, _ = dataset
    files = sorted(csv_path.parent.iterdir())
    stamps = {p: p.stat().st_mtime_ns for p in files}
    assert make_demo_dataset(csv_path.parent, 3, seed=7, spacing=SPACING, heldout=1, dx=DX) == csv_path
    assert {p: p.stat().st_mtime_ns for p in sorted(csv_path.parent.iterdir())} == stamps
    with pytest.raises(OutputError):
        make_demo_dataset(csv_path.parent, 3, seed=8, spacing=SPACING, heldout=1, dx=DX)
    assert {p: p.stat().st_mtime_ns for p in sorted(csv_path.parent.iterdir())} == stamps


def test_overwrite_replaces_and_interrupted_run_completes(tmp_path):
    make_demo_dataset(tmp_path, 3, seed=1, spacing=SPACING)
    make_demo_dataset(tmp_path, 2, seed=2, spacing=SPACING, overwrite=True)
    assert sorted(p.name for p in tmp_path.glob("sub-*")) == [f"sub-00{i}_{m}.nii.gz" for i in (1, 2)
                                                             for m in ("asl", "mask", "pet", "t1", "t2")]
    params = json.loads((tmp_path / "demo.json").read_text())
    assert params["complete"] and params["parameters"]["seed"] == 2

    (tmp_path / "sub-002_pet.nii.gz").unlink()
    (tmp_path / "demo.json").write_text(json.dumps({**params, "complete": False}))
    kept = (tmp_path / "sub-001_pet.nii.gz").stat().st_mtime_ns
    make_demo_dataset(tmp_path, 2, seed=2, spacing=SPACING)
    assert (tmp_path / "sub-002_pet.nii.gz").exists()
    assert (tmp_path / "sub-001_pet.nii.gz").stat().st_mtime_ns == kept
    assert json.loads((tmp_path / "demo.json").read_text())["complete"]


def test_cli_refuses_too_strong_a_metabolic_variation(tmp_path):
    from typer.testing import CliRunner

    from medflow.cli import app

    result = CliRunner().invoke(app, ["demo-data", str(tmp_path / "data"), "--subjects", "2", "--heldout", "1",
                                      "--metabolic-variation", "6"])
    assert result.exit_code == 3 and "--metabolic-variation 6 must be at most 5" in result.output  # InputError
    assert "Traceback" not in result.output and not (tmp_path / "data").exists()


@pytest.mark.parametrize("record", ['[]', '{"note": "my own settings"}', '{"parameters": {"seed": 1}', 'x'])
def test_a_demo_json_that_is_not_a_demo_record_leaves_the_folder_alone(tmp_path, record):
    """Only a demo.json medflow wrote marks a folder as a demo dataset whose files --overwrite
    may remove: any other file of that name is refused, even with --overwrite."""
    (tmp_path / "demo.json").write_text(record)
    (tmp_path / "manifest.csv").write_text("mine\n")
    (tmp_path / "sub-001_t1.nii.gz").write_bytes(b"mine")
    for overwrite in (False, True):
        with pytest.raises(OutputError, match="demo.json: not a medflow demo dataset's record"):
            make_demo_dataset(tmp_path, 2, seed=1, spacing=SPACING, overwrite=overwrite)
    assert (tmp_path / "manifest.csv").read_text() == "mine\n"
    assert (tmp_path / "sub-001_t1.nii.gz").read_bytes() == b"mine"
