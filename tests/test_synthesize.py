"""medflow synthesize: native grid, batches, bad inputs, determinism, output safety."""

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from medflow.cli import app
from tests.badfiles import bad_corpus
from tests.paired_data import phantom, write_paired_csv

runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synth")
    pairs = write_paired_csv(folder / "pairs", n=6)
    run = folder / "run"
    result = cli("train", pairs, "--out", run, "--preset", "tiny", "--steps", "6", "--device", "cpu",
                 "--spacing", "6")
    assert result.exit_code == 0, result.stderr
    return run, pairs.parent


def write_mri(path, affine, shape=(27, 29, 15), seed=0):
    mri, _ = phantom(shape, np.random.default_rng(seed))
    nib.save(nib.Nifti1Image(mri, affine), path)
    return path


def lps_anisotropic_affine():
    affine = np.diag([-3.0, -3.0, 5.0, 1.0])
    affine[:3, 3] = [40.0, 45.0, -35.0]
    return affine


def test_output_is_on_the_input_grid(trained, tmp_path):
    run, _ = trained
    affine = lps_anisotropic_affine()
    mri = write_mri(tmp_path / "lps.nii.gz", affine)
    out, std, qc = tmp_path / "pet.nii.gz", tmp_path / "std.nii.gz", tmp_path / "qc.png"
    result = cli("synthesize", mri, out, "--model", run, "--std", std, "--qc", qc, "--samples", "4",
                 "--temperature", "0.8")
    assert result.exit_code == 0, result.stderr
    img = nib.load(out)
    assert img.shape == (27, 29, 15)
    assert np.allclose(img.affine, affine, atol=1e-5)
    assert img.get_data_dtype() == np.float32
    pet = img.get_fdata()
    assert np.isfinite(pet).all() and pet.max() > 0
    assert nib.load(std).shape == (27, 29, 15) and nib.load(std).get_fdata().max() > 0
    assert qc.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_std_map_adds_the_training_spread_of_global_level(trained, tmp_path):
    """--std widens the samples' std (--no-level-spread) by the training PETs' spread of global
    level recorded in config.json, exactly as ``calibration.with_level_spread`` says; the mean
    does not change."""
    from medflow.calibration import with_level_spread

    run, pairs = trained
    mri = pairs / "sub-00_t1.nii.gz"
    maps = {}
    for flag in ("--level-spread", "--no-level-spread"):
        out, std = tmp_path / f"{flag}_pet.nii.gz", tmp_path / f"{flag}_std.nii.gz"
        result = cli("synthesize", mri, out, "--model", run, "--std", std, "--samples", "4", "--temperature", "0.8",
                     flag)
        assert result.exit_code == 0, result.stderr
        maps[flag] = nib.load(out).get_fdata(), nib.load(std).get_fdata()
    (mean, std), (same_mean, pattern) = maps["--level-spread"], maps["--no-level-spread"]
    moments = tuple(json.loads((run / "config.json").read_text())["preprocessing"]["pet_level_moments"])
    assert moments[1] > 0
    assert np.array_equal(mean, same_mean)
    assert std == pytest.approx(with_level_spread(mean, pattern, moments), rel=1e-5, abs=1e-6)
    assert np.abs(std - pattern).max() > 0.01 * pattern.max()


def test_same_seed_same_output_other_seed_differs(trained, tmp_path):
    run, pairs = trained
    mri = pairs / "sub-00_t1.nii.gz"
    outs = []
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        path = tmp_path / f"{name}.nii.gz"
        assert cli("synthesize", mri, path, "--model", run, "--seed", seed, "--temperature", "1").exit_code == 0
        outs.append(nib.load(path).get_fdata())
    assert np.array_equal(outs[0], outs[1])
    assert not np.array_equal(outs[0], outs[2])


def test_default_temperature_is_the_one_calibrated_in_training(trained, tmp_path):
    """train records the temperature calibrated on its validation subjects; synthesize samples at
    it unless --temperature is given (same seed: same draws as asking for it explicitly)."""
    run, pairs = trained
    calibration = json.loads((run / "config.json").read_text())["calibration"]
    assert calibration["subjects"] >= 1 and calibration["samples"] == 16
    assert 0.05 <= calibration["temperature"] <= 4.0
    mri = pairs / "sub-00_t1.nii.gz"
    default, explicit = tmp_path / "default.nii.gz", tmp_path / "explicit.nii.gz"
    result = cli("synthesize", mri, default, "--model", run, "--samples", "2")
    assert result.exit_code == 0, result.stderr
    assert f"T = {calibration['temperature']:g}," in " ".join(result.stdout.split())
    assert cli("synthesize", mri, explicit, "--model", run, "--samples", "2",
               "--temperature", calibration["temperature"]).exit_code == 0
    assert np.array_equal(nib.load(default).get_fdata(), nib.load(explicit).get_fdata())


def test_existing_output_is_never_overwritten_silently(trained, tmp_path):
    run, pairs = trained
    out = tmp_path / "pet.nii.gz"
    out.write_bytes(b"precious")
    result = cli("synthesize", pairs / "sub-00_t1.nii.gz", out, "--model", run)
    assert result.exit_code == 4 and "--overwrite" in result.stderr
    assert out.read_bytes() == b"precious"
    assert cli("synthesize", pairs / "sub-00_t1.nii.gz", out, "--model", run, "--overwrite").exit_code == 0
    assert nib.load(out).shape == (20, 22, 18)


def test_batch_carries_on_past_a_broken_file(trained, tmp_path):
    run, pairs = trained
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(pairs / "sub-00_t1.nii.gz", inputs / "a.nii.gz")
    (inputs / "b.nii.gz").write_bytes((pairs / "sub-01_t1.nii.gz").read_bytes()[:300])
    shutil.copy(pairs / "sub-02_t1.nii.gz", inputs / "c.nii.gz")
    outdir = tmp_path / "out"
    result = cli("synthesize", inputs, outdir, "--model", run, "--std", tmp_path / "std")
    assert result.exit_code == 1
    assert (outdir / "a.nii.gz").exists() and (outdir / "c.nii.gz").exists()
    assert not (outdir / "b.nii.gz").exists()
    assert (tmp_path / "std" / "a.nii.gz").exists()
    assert "failed" in result.stdout and "b.nii.gz" in result.stderr
    assert not [p for p in outdir.iterdir() if p.name.startswith(".")]
    rerun = cli("synthesize", inputs, outdir, "--model", run, "--skip-existing")
    assert rerun.exit_code == 1 and rerun.stdout.count("skipped") == 2


def test_batch_names_each_qc_picture_after_its_whole_output_name(trained, tmp_path):
    """Inputs whose names differ only after a dot (series numbers, DICOM UIDs) get pictures of
    their own: pat.001.png and pat.002.png, not one pat.png."""
    run, pairs = trained
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name, source in (("pat.001.nii.gz", "sub-00_t1.nii.gz"), ("pat.002.nii.gz", "sub-02_t1.nii.gz")):
        shutil.copy(pairs / source, inputs / name)
    result = cli("synthesize", inputs, tmp_path / "out", "--model", run, "--qc", tmp_path / "qc")
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "qc").iterdir()) == ["pat.001.png", "pat.002.png"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.suffix == ".gz") == ["pat.001.nii.gz",
                                                                                       "pat.002.nii.gz"]


BAD_CLASSES = ["missing", "truncated_gz", "garbage_gz", "header_only", "nan", "inf", "all_zero", "two_d",
               "four_d", "tiny_3x3x3", "singular_affine", "sheared_affine", "huge_declared", "complex_dtype",
               "directory", "text_file"]


def test_every_bad_input_class_gets_one_line_and_exit_3(trained, tmp_path):
    run, _ = trained
    corpus = bad_corpus(tmp_path / "bad")
    for name in BAD_CLASSES:
        path = corpus[name]
        out = tmp_path / f"out_{name}.nii.gz"
        result = cli("synthesize", path, out, "--model", run)
        assert result.exit_code == 3, (name, result.stderr, result.exception)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and str(path) in result.stderr.replace("\n", ""), (name, result.stderr)
        assert "Traceback" not in result.stderr
        assert not out.exists()


def test_csv_missing_modality_column_is_an_input_error(trained, tmp_path):
    run, pairs = trained
    listing = tmp_path / "list.csv"
    listing.write_text("subject,t2\nsub-00,x.nii.gz\n")
    result = cli("synthesize", listing, tmp_path / "out", "--model", run)
    assert result.exit_code == 3 and "missing column" in result.stderr


@pytest.mark.parametrize("samples", ["0", "3"])
def test_samples_must_be_one_or_even(trained, tmp_path, samples):
    run, pairs = trained
    out = tmp_path / "o.nii.gz"
    result = cli("synthesize", pairs / "sub-00_t1.nii.gz", out, "--model", run, "--samples", samples)
    assert result.exit_code == 3 and "--samples must be 1 or even" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()


def test_missing_model_and_unavailable_cuda(trained, tmp_path):
    _, pairs = trained
    result = cli("synthesize", pairs / "sub-00_t1.nii.gz", tmp_path / "o.nii.gz", "--model", tmp_path / "none")
    assert result.exit_code == 5
    run, _ = trained
    result = cli("synthesize", pairs / "sub-00_t1.nii.gz", tmp_path / "o.nii.gz", "--model", run, "--device", "cuda")
    import torch

    if not torch.cuda.is_available():
        assert result.exit_code == 6 and "no CUDA" in result.stderr


def test_outputs_of_one_input_appear_together_or_not_at_all(trained, tmp_path):
    """An existing --std or --qc file, or a missing folder for one of them, fails before anything is
    written (the PET included), and an output given twice or equal to the input is refused."""
    run, pairs = trained
    mri, out = pairs / "sub-00_t1.nii.gz", tmp_path / "pet.nii.gz"
    (tmp_path / "std.nii.gz").write_bytes(b"precious")
    (tmp_path / "qc.png").write_bytes(b"precious")
    cases = [(["--std", tmp_path / "std.nii.gz"], 4, "exists"), (["--qc", tmp_path / "qc.png"], 4, "exists"),
             (["--std", tmp_path / "none" / "std.nii.gz"], 4, "does not exist"),
             (["--std", out], 4, "two outputs"), (["--qc", tmp_path / "qc.nii.gz"], 4, ".png")]
    for extra, code, message in cases:
        result = cli("synthesize", mri, out, "--model", run, *extra)
        assert result.exit_code == code and message in result.stderr, (extra, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and not out.exists(), extra
    assert (tmp_path / "std.nii.gz").read_bytes() == b"precious" == (tmp_path / "qc.png").read_bytes()
    copy = shutil.copy(mri, tmp_path / "mri.nii.gz")
    before = copy.read_bytes()
    result = cli("synthesize", copy, copy, "--model", run, "--overwrite")
    assert result.exit_code == 4 and "is an input" in result.stderr and copy.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_batch_std_folder_must_not_be_the_output_folder(trained, tmp_path):
    run, pairs = trained
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(pairs / "sub-00_t1.nii.gz", inputs / "a.nii.gz")
    result = cli("synthesize", inputs, tmp_path / "out", "--model", run, "--std", tmp_path / "out", "--overwrite")
    assert result.exit_code == 3 and "is the output folder" in result.stderr
    assert not (tmp_path / "out").exists()


def test_batch_inputs_must_give_distinct_outputs(trained, tmp_path):
    run, pairs = trained
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(pairs / "sub-00_t1.nii.gz", inputs / "a.nii.gz")
    shutil.copy(pairs / "sub-01_t1.nii.gz", inputs / "a.nii")
    result = cli("synthesize", inputs, tmp_path / "out", "--model", run, "--overwrite")
    assert result.exit_code == 3 and "also that of" in result.stderr and not (tmp_path / "out").exists()
    listing = tmp_path / "in" / "list.csv"
    listing.write_text("subject,mri\ns,a.nii.gz\ns,a.nii\n")
    result = cli("synthesize", listing, tmp_path / "out", "--model", run)
    assert result.exit_code == 3 and "also that of" in result.stderr


@pytest.mark.parametrize("subject", ["../escape", "/tmp/escape", "a/b", ".."])
def test_csv_subject_names_cannot_leave_the_output_folder(trained, tmp_path, subject):
    run, pairs = trained
    shutil.copy(pairs / "sub-00_t1.nii.gz", tmp_path / "a.nii.gz")
    listing = tmp_path / "list.csv"
    listing.write_text(f"subject,mri\n{subject},a.nii.gz\n")
    result = cli("synthesize", listing, tmp_path / "out" / "deeper", "--model", run)
    assert result.exit_code == 3 and "not a plain file name" in result.stderr
    assert not list(tmp_path.rglob("*escape*")) and not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag,value", [("--temperature", "nan"), ("--temperature", "inf"), ("--temperature", "-1"),
                                        ("--seed", "-1"), ("--seed", str(2**63))])
def test_temperature_and_seed_out_of_range_are_input_errors(trained, tmp_path, flag, value):
    run, pairs = trained
    out = tmp_path / "o.nii.gz"
    result = cli("synthesize", pairs / "sub-00_t1.nii.gz", out, "--model", run, flag, value)
    assert result.exit_code == 3 and f"{flag} must be" in result.stderr and not out.exists()


def test_mri_without_foreground_is_an_input_error(trained, tmp_path):
    run, pairs = trained
    image = nib.load(pairs / "sub-00_t1.nii.gz")
    path = tmp_path / "below_zero.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj, dtype=np.float32) - 1000.0, image.affine), path)
    out = tmp_path / "o.nii.gz"
    result = cli("synthesize", path, out, "--model", run)
    assert result.exit_code == 3 and f"{path}: no foreground" in result.stderr.replace("\n", "") and not out.exists()


def test_quality_control_warns_about_or_refuses_an_mri_unlike_the_training_ones(trained, tmp_path):
    """A checkerboard inside a training MRI's head lies far above the training MRIs' bits per
    voxel: a warning, or with --strict-qc a one-line error (exit 7) and no output."""
    run, data = trained
    familiar = data / "sub-01_t1.nii.gz"
    image = nib.load(familiar)
    mri = image.get_fdata().astype(np.float32)
    checkerboard = (np.indices(mri.shape).sum(0) % 2) * mri.max() * (mri > 0)
    unlike = tmp_path / "unlike.nii.gz"
    nib.save(nib.Nifti1Image(checkerboard.astype(np.float32), image.affine), unlike)
    accepted = cli("synthesize", familiar, tmp_path / "familiar.nii.gz", "--model", run, "--strict-qc")
    assert accepted.exit_code == 0 and "warning" not in accepted.stderr, accepted.stderr
    warned = cli("synthesize", unlike, tmp_path / "warned.nii.gz", "--model", run)
    assert warned.exit_code == 0 and (tmp_path / "warned.nii.gz").exists()
    assert f"{unlike}: unlike the training MRIs" in warned.stderr.replace("\n", "")
    refused = cli("synthesize", unlike, tmp_path / "refused.nii.gz", "--model", run, "--strict-qc")
    assert refused.exit_code == 7 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert f"{unlike}: unlike the training MRIs" in refused.stderr.replace("\n", "")
    assert not (tmp_path / "refused.nii.gz").exists()


def test_a_run_stopped_before_its_end_cannot_check_its_inputs(trained, tmp_path):
    """Without the training MRIs' statistics (config.json has no "qc"), synthesis says that the
    inputs go unchecked, and --strict-qc refuses the model (exit 5) before writing anything."""
    from medflow.checkpoint import read_config, write_config

    run, data = trained
    stopped = tmp_path / "stopped"
    shutil.copytree(run, stopped)
    config = read_config(stopped)
    del config["qc"]
    write_config(stopped, config)
    mri = data / "sub-01_t1.nii.gz"
    warned = cli("synthesize", mri, tmp_path / "warned.nii.gz", "--model", stopped)
    assert warned.exit_code == 0 and "the inputs are not checked" in warned.stderr.replace("\n", "")
    assert "--resume --steps N" in warned.stderr.replace("\n", "")
    refused = cli("synthesize", mri, tmp_path / "refused.nii.gz", "--model", stopped, "--strict-qc")
    assert refused.exit_code == 5 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "--strict-qc cannot check the inputs" in refused.stderr.replace("\n", "")
    assert not (tmp_path / "refused.nii.gz").exists()


def test_a_model_from_before_mri_scaling_keeps_its_padded_grid_scaling(trained, tmp_path):
    """A config.json whose preprocessing has no "mri_scaling" (models trained before it existed)
    scales the MRI on the padded grid, as its training did: same seed, another input to the flow,
    another PET. An unknown value is a one-line model error naming config.json (exit 5)."""
    from medflow.checkpoint import read_config, write_config

    run, data = trained
    assert read_config(run)["preprocessing"]["mri_scaling"] == "foreground_box"
    mri = data / "sub-01_t1.nii.gz"
    outputs = {}
    for scaling in ("foreground_box", None, "global"):
        model = tmp_path / f"model-{scaling}"
        shutil.copytree(run, model)
        config = read_config(model)
        if scaling is None:
            del config["preprocessing"]["mri_scaling"]
        else:
            config["preprocessing"]["mri_scaling"] = scaling
        write_config(model, config)
        out = tmp_path / f"pet-{scaling}.nii.gz"
        result = cli("synthesize", mri, out, "--model", model, "--seed", "3")
        if scaling == "global":
            assert result.exit_code == 5 and len(result.stderr.strip().splitlines()) == 1, result.stderr
            assert "config.json: incomplete or invalid (unknown mri_scaling 'global'" in result.stderr
            assert not out.exists()
        else:
            assert result.exit_code == 0, result.stderr
            outputs[scaling] = nib.load(out).get_fdata()
    assert not np.allclose(outputs["foreground_box"], outputs[None], atol=1e-3)


@pytest.mark.parametrize("problem", ["newer", "text", "zero", "list", None])
def test_newer_or_invalid_config_formats_are_refused_and_a_config_without_one_is_read(trained, tmp_path, problem):
    """A model folder from a newer medflow (config_format above this one's) may mean something
    this medflow would misread, so it is refused (exit 5) naming config.json, with no output;
    so are an invalid config_format and a config.json that is not a JSON object. A config
    without config_format (format 1, models from before it was recorded) is read."""
    from medflow.checkpoint import CONFIG_FORMAT, read_config

    run, data = trained
    config = read_config(run)
    assert config["config_format"] == CONFIG_FORMAT
    model = tmp_path / "model"
    shutil.copytree(run, model)
    config["medflow_version"] = "9.1"
    config["config_format"] = {"newer": CONFIG_FORMAT + 1, "text": str(CONFIG_FORMAT), "zero": 0}.get(problem)
    if problem is None:
        del config["config_format"]
    (model / "config.json").write_text(json.dumps([config] if problem == "list" else config))
    out = tmp_path / "pet.nii.gz"
    result = cli("synthesize", data / "sub-01_t1.nii.gz", out, "--model", model)
    if problem is None:
        assert result.exit_code == 0 and out.exists(), result.stderr
        return
    assert result.exit_code == 5 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    message = " ".join(result.stderr.split())
    assert f"{model / 'config.json'}: " in message and not out.exists()
    assert {"newer": f"written by medflow 9.1 in config format {CONFIG_FORMAT + 1}; this medflow",
            "text": f"config_format must be a positive whole number, got '{CONFIG_FORMAT}'",
            "zero": "config_format must be a positive whole number, got 0",
            "list": "not a medflow config (a JSON list, not an object)"}[problem] in message
    assert problem != "newer" or f"reads formats up to {CONFIG_FORMAT}: upgrade medflow" in message


def test_a_head_larger_than_the_model_grid_is_a_quality_warning(trained, tmp_path):
    """The training heads set the grid (16 voxels of 6 mm here); a head of about 130 mm does not fit,
    so the PET would be zero where the grid cuts it: a warning naming the file, in a batch a
    note in the table, and with --strict-qc a refusal (exit 7) with no output."""
    run, _ = trained
    big = write_mri(tmp_path / "big.nii.gz", np.diag([6.0, 6.0, 6.0, 1.0]))
    warned = cli("synthesize", big, tmp_path / "warned.nii.gz", "--model", run)
    text = " ".join(warned.stderr.split())
    assert warned.exit_code == 0 and f"{big}: the head (" in text and "larger than the model grid 16x16x16" in text
    batch = tmp_path / "batch"
    batch.mkdir()
    shutil.copy(big, batch / "big.nii.gz")
    noted = cli("synthesize", batch, tmp_path / "out", "--model", run)
    assert noted.exit_code == 0 and "QC warning: the head" in " ".join(noted.stdout.split())
    refused = cli("synthesize", big, tmp_path / "refused.nii.gz", "--model", run, "--strict-qc")
    assert refused.exit_code == 7 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert not (tmp_path / "refused.nii.gz").exists()


def test_qc_slices_are_anatomical_planes_in_true_proportions():
    """An LPS copy of a RAS volume gives the same pictures, and 3 mm slices are drawn three times
    as tall as 1 mm pixels are wide (before: voxel order and square pixels)."""
    import matplotlib.pyplot as plt

    from medflow.qcplot import qc_figure

    volume = np.random.default_rng(0).random((20, 24, 12)).astype(np.float32)
    ras = np.diag([1.0, 1.0, 3.0, 1.0])
    lps = ras @ np.array([[-1, 0, 0, 19], [0, -1, 0, 23], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=float)
    flipped = volume[::-1, ::-1, :]
    figures = [qc_figure(ras, volume, volume, None), qc_figure(lps, flipped, flipped, None)]
    images = [[ax.images[0].get_array() for ax in fig.axes if ax.images] for fig in figures]
    for a, b in zip(*images):
        assert np.array_equal(a, b)
    assert [ax.get_aspect() for ax in figures[0].axes[:3]] == [1.0, 3.0, 3.0]
    for fig in figures:
        plt.close(fig)
