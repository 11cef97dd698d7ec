"""medflow.imageio: every bad input refused in one line, unusual inputs read exactly, atomic writes."""

import errno
import os
import threading

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from medflow import imageio
from medflow.errors import InputError, OutputError
from medflow.imageio import (Volume, atomic_path, atomic_paths, image_stem, is_image_path, read_mask, read_volume,
                             write_volume)
from tests.badfiles import (BAD_CASES, LPS_TO_RAS_4, SHAPE, UNUSUAL_CASES, bad_corpus, oblique_affine, pattern,
                            save_nifti, unusual_cases, write_dicom_series)

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0

EXPECTED_PROBLEM = {
    "missing": "no such image file",
    "truncated_gz": "truncated or corrupt compressed file",
    "garbage_gz": "not a gzip file",
    "header_only": "data is shorter than the header declares (0 of 34560 bytes",
    "short_data": "data is shorter than the header declares (5000 of 34560 bytes",
    "empty_file": "empty file (0 bytes)",
    "text_file": "not a recognised image format",
    "unknown_format": "not a recognised image format",
    "single_dicom_file": "give the folder that holds the whole series",
    "nan": "contains 12 NaN/Inf voxels",
    "inf": "contains 5 NaN/Inf voxels",
    "all_zero": "all voxels are 0: empty volume",
    "constant": "all voxels are 7.5: empty volume",
    "two_d": "2D image (20x24)",
    "single_slice": "2D image (20x24x1)",
    "four_d": "4D series with 12 frames; give one 3D volume",
    "five_d": "5D image (20x24x18x1x3)",
    "tiny_3x3x3": "3x3x3 volume is too small (minimum 8 voxels per axis)",
    "thin_20x24x5": "20x24x5 volume is too small (minimum 8 voxels per axis)",
    "singular_affine": "singular affine",
    "parallel_axes_affine": "singular affine",
    "sheared_affine": "sheared (non-orthogonal) affine",
    "nonfinite_affine": "non-finite (NaN/Inf) affine",
    "huge_declared": "declared size 100000x100000x100000 is too large",
    "huge_axis": "declared size 2000x24x18 is too large",
    "complex_dtype": "complex data type complex64",
    "rgb_dtype": "colour (RGB/RGBA) data",
    "analyze": "old Analyze 7.5 format",
    "no_orientation": "no orientation (NIfTI sform and qform codes 0)",
    "directory": "is a folder that holds no DICOM series",
    "two_dicom_series": "folder holds 2 DICOM series",
    "truncated_mha": "data is shorter than the header declares",
    "truncated_nrrd": "data is shorter than the header declares",
    "garbage_nrrd": "not a recognised image format",
    "mhd_missing_data": "separate data file is missing or unreadable",
    "nhdr_missing_data": "separate data file is missing or unreadable",
    "rgb_mha": "3-component pixels",
    "four_d_mha": "4D series with 3 frames; give one 3D volume",
    "two_d_mha": "2D image (20x24)",
    "unreadable": "permission denied",
}


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    return bad_corpus(tmp_path_factory.mktemp("bad"))


@pytest.fixture(scope="module")
def unusual(tmp_path_factory):
    return unusual_cases(tmp_path_factory.mktemp("unusual"))


def refusal(path, **kwargs) -> str:
    """The message of the InputError that reading `path` must raise, checked for form."""
    with pytest.raises(InputError) as caught:
        read_volume(path, **kwargs)
    message = str(caught.value)
    assert message.startswith(f"{path}: "), message
    assert "\n" not in message and "Traceback" not in message and len(message) < 300, message
    problem = message[len(f"{path}: "):]
    assert problem and not problem[0].isupper(), message
    assert caught.value.exit_code == 3
    return problem


def test_corpora_hold_every_named_case(bad, unusual):
    assert tuple(bad) == BAD_CASES and tuple(unusual) == UNUSUAL_CASES
    assert set(EXPECTED_PROBLEM) == set(BAD_CASES)


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_one_clean_line(bad, case, capfd):
    if case == "unreadable" and IS_ROOT:
        pytest.skip("running as root: file permissions are not enforced (see the simulated test below)")
    problem = refusal(bad[case])
    assert problem.startswith(EXPECTED_PROBLEM[case]) or EXPECTED_PROBLEM[case] in problem, problem
    out, err = capfd.readouterr()
    assert out == "" and err == "", "libraries printed their own lines"


def test_permission_denied_is_reported(monkeypatch, tmp_path):
    path = save_nifti(tmp_path / "locked.nii.gz", pattern(), np.eye(4))

    def denied(name, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(name))

    monkeypatch.setattr(imageio, "open", denied, raising=False)
    assert refusal(path) == "permission denied"


def test_what_names_the_missing_file(tmp_path):
    assert refusal(tmp_path / "t1.nii.gz", what="MRI") == "no such MRI file"


@pytest.mark.parametrize("case", UNUSUAL_CASES)
def test_unusual_input_reads_exactly(unusual, case, capfd):
    truth = unusual[case]
    volume = read_volume(truth.path)
    assert isinstance(volume, Volume) and volume.path == truth.path
    assert volume.data.dtype == np.float32 and volume.data.shape == SHAPE
    np.testing.assert_allclose(volume.data, truth.data, rtol=1e-6, atol=1e-4)
    assert volume.affine.dtype == np.float64 and volume.affine.shape == (4, 4)
    np.testing.assert_allclose(volume.affine, truth.affine, atol=1e-4)
    assert capfd.readouterr() == ("", "")


def test_itk_formats_agree_with_nibabel_on_the_same_image(tmp_path):
    data = pattern()
    affine = LPS_TO_RAS_4 @ oblique_affine(zooms=(0.7, 1.4, 2.2), degrees=(20.0, -15.0, 40.0))
    nifti = save_nifti(tmp_path / "same.nii.gz", data, affine)
    reference = nib.load(nifti)
    for suffix in ("nrrd", "mha"):
        other = tmp_path / f"same.{suffix}"
        sitk.WriteImage(sitk.ReadImage(str(nifti)), str(other))
        volume = read_volume(other)
        np.testing.assert_array_equal(volume.data, reference.get_fdata(dtype=np.float32))
        np.testing.assert_allclose(volume.affine, reference.affine, atol=1e-5)
        assert nib.aff2axcodes(volume.affine) == nib.aff2axcodes(reference.affine)


def test_dicom_folder_voxel_order_and_position(tmp_path):
    raw = np.round(pattern()).astype(np.int16)
    affine = oblique_affine(zooms=(0.5, 0.6, 3.0))
    folder = write_dicom_series(tmp_path / "series", raw, affine)
    assert is_image_path(folder) and image_stem(folder) == "series"
    volume = read_volume(folder)
    np.testing.assert_array_equal(volume.data, raw.astype(np.float32))
    first_slice = sitk.ReadImage(str(folder / "s1_000.dcm"))
    lps_origin = np.array(first_slice.GetOrigin())
    np.testing.assert_allclose(volume.affine[:3, 3], [-lps_origin[0], -lps_origin[1], lps_origin[2]], atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(volume.affine[:3, :3], axis=0), [0.5, 0.6, 3.0], atol=1e-4)


def test_mask_on_the_same_grid(tmp_path):
    affine = oblique_affine()
    like = Volume(pattern(), affine, tmp_path / "pet.nii.gz")
    labels = np.zeros(SHAPE, np.float32)
    labels[5:15, 6:18, 4:12] = 1.0
    labels[8:10, 8:10, 8:10] = 3.0
    labels[0, 0, 0] = 0.4
    mask = read_mask(save_nifti(tmp_path / "mask.nii.gz", labels, affine), like=like)
    assert mask.dtype == bool and mask.shape == SHAPE
    np.testing.assert_array_equal(mask, labels >= 0.5)
    assert read_mask(save_nifti(tmp_path / "full.nii.gz", np.ones(SHAPE, np.float32), affine), like=like).all()


@pytest.mark.parametrize("problem", ["shape", "affine", "empty"])
def test_mask_off_grid_or_empty_is_refused(tmp_path, problem):
    affine = oblique_affine()
    like = Volume(pattern(), affine, tmp_path / "pet.nii.gz")
    mask = np.zeros(SHAPE, np.float32)
    if problem != "empty":
        mask[4:10, 4:10, 4:10] = 1.0
    if problem == "shape":
        mask = mask[:, :, :-1]
    if problem == "affine":
        affine = affine.copy()
        affine[0, 3] += 0.01
    path = save_nifti(tmp_path / f"{problem}.nii.gz", mask, affine)
    with pytest.raises(InputError) as caught:
        read_mask(path, like=like)
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert {"shape": "does not match the image grid", "affine": "affine differs",
            "empty": "mask is empty"}[problem] in message


@pytest.mark.parametrize("name", ["out.nii.gz", "out.nii"])
def test_write_volume_round_trip(tmp_path, name):
    affine = LPS_TO_RAS_4 @ oblique_affine()
    data = pattern().astype(np.float64) * 1.001
    path = write_volume(tmp_path / name, data, affine)
    assert path == tmp_path / name
    image = nib.load(path)
    assert image.get_data_dtype() == np.float32
    assert int(image.header["sform_code"]) == 1 and int(image.header["qform_code"]) == 1
    np.testing.assert_allclose(image.header.get_qform(), affine, atol=1e-4)
    volume = read_volume(path)
    np.testing.assert_array_equal(volume.data, data.astype(np.float32))
    np.testing.assert_allclose(volume.affine, affine, atol=1e-5)
    assert os.listdir(tmp_path) == [name]


def test_write_volume_refuses_other_suffixes_and_shapes(tmp_path):
    with pytest.raises(OutputError, match="must be a NIfTI file"):
        write_volume(tmp_path / "out.mha", pattern(), np.eye(4))
    with pytest.raises(ValueError):
        write_volume(tmp_path / "out.nii.gz", pattern()[..., None], np.eye(4))
    assert os.listdir(tmp_path) == []


def test_atomic_path_publishes_on_clean_exit(tmp_path):
    target = tmp_path / "pet.nii.gz"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".pet.tmp-") and tmp.name.endswith(".nii.gz")
        assert tmp.exists() and not target.exists()
        tmp.write_bytes(b"payload")
    assert target.read_bytes() == b"payload"
    assert os.listdir(tmp_path) == ["pet.nii.gz"]


@pytest.mark.parametrize("error", [ValueError("boom"), KeyboardInterrupt()])
def test_atomic_path_leaves_nothing_when_the_body_fails(tmp_path, error):
    target = tmp_path / "pet.nii.gz"
    with pytest.raises(type(error)):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise error
    assert os.listdir(tmp_path) == []


def test_atomic_path_refuses_to_overwrite_unless_asked(tmp_path):
    target = tmp_path / "pet.nii.gz"
    target.write_bytes(b"old")
    with pytest.raises(OutputError) as caught:
        with atomic_path(target):
            pytest.fail("the body must not run")
    assert str(caught.value) == f"{target}: exists; pass --overwrite to replace it"
    with atomic_path(target, overwrite=True) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and os.listdir(tmp_path) == ["pet.nii.gz"]


def test_atomic_path_refuses_a_folder_as_target(tmp_path):
    with pytest.raises(OutputError, match="is a folder"):
        with atomic_path(tmp_path, overwrite=True):
            pass


def test_second_writer_of_the_same_name_gets_an_output_error(tmp_path):
    target = tmp_path / "pet.nii.gz"
    with pytest.raises(OutputError, match="exists"):
        with atomic_path(target) as second:
            with atomic_path(target) as first:
                first.write_bytes(b"first")
            second.write_bytes(b"second")
    assert target.read_bytes() == b"first" and os.listdir(tmp_path) == ["pet.nii.gz"]


def test_racing_threads_exactly_one_wins(tmp_path):
    target = tmp_path / "pet.nii.gz"
    barrier = threading.Barrier(4)
    outcomes = {}

    def writer(name):
        try:
            with atomic_path(target) as tmp:
                tmp.write_bytes(name.encode())
                barrier.wait(timeout=10)
            outcomes[name] = "won"
        except OutputError as error:
            outcomes[name] = str(error)

    threads = [threading.Thread(target=writer, args=(f"w{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [name for name, outcome in outcomes.items() if outcome == "won"]
    assert len(outcomes) == 4 and len(winners) == 1
    assert all("exists" in outcome for outcome in outcomes.values() if outcome != "won")
    assert target.read_bytes() == winners[0].encode() and os.listdir(tmp_path) == ["pet.nii.gz"]


def test_publish_without_hard_links_still_never_clobbers(tmp_path, monkeypatch):
    def no_links(*args, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    target = tmp_path / "pet.nii.gz"
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"one")
    assert target.read_bytes() == b"one"
    target.unlink()
    with pytest.raises(OutputError, match="exists"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"two")
            target.write_bytes(b"someone else")
    assert target.read_bytes() == b"someone else" and os.listdir(tmp_path) == ["pet.nii.gz"]


@pytest.mark.parametrize("hard_links", [True, False])
def test_overwriting_outputs_that_fail_midway_puts_the_old_ones_back(tmp_path, monkeypatch, hard_links):
    """With overwrite, a PET and its std map replace the old pair together: when the second cannot
    be published, the first old file comes back, and nothing else is left in the folder."""
    pet, std = tmp_path / "pet.nii.gz", tmp_path / "std.nii.gz"
    pet.write_bytes(b"old pet")
    std.write_bytes(b"old std")
    if not hard_links:
        monkeypatch.setattr(os, "link", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EPERM, "no links")))
    real_replace = os.replace

    def std_fails(source, target):
        if os.fspath(target) == str(std):
            raise OSError(errno.EIO, "Input/output error")
        return real_replace(source, target)

    monkeypatch.setattr(os, "replace", std_fails)
    with pytest.raises(OutputError, match="std.nii.gz"):
        with atomic_paths([pet, std], overwrite=True) as (new_pet, new_std):
            new_pet.write_bytes(b"new pet")
            new_std.write_bytes(b"new std")
    assert pet.read_bytes() == b"old pet" and std.read_bytes() == b"old std"
    assert sorted(os.listdir(tmp_path)) == ["pet.nii.gz", "std.nii.gz"]
    monkeypatch.setattr(os, "replace", real_replace)
    with atomic_paths([pet, std], overwrite=True) as (new_pet, new_std):
        new_pet.write_bytes(b"new pet")
        new_std.write_bytes(b"new std")
    assert pet.read_bytes() == b"new pet" and std.read_bytes() == b"new std"
    assert sorted(os.listdir(tmp_path)) == ["pet.nii.gz", "std.nii.gz"]


def test_missing_output_folder_is_named(tmp_path):
    target = tmp_path / "absent" / "pet.nii.gz"
    with pytest.raises(OutputError) as caught:
        write_volume(target, pattern(), np.eye(4))
    assert str(caught.value) == f"{target}: folder {tmp_path / 'absent'} does not exist"


@pytest.mark.skipif(IS_ROOT, reason="running as root: folder permissions are not enforced (simulated below)")
def test_read_only_folder_is_refused(tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(OutputError, match="is not writable"):
            write_volume(folder / "pet.nii.gz", pattern(), np.eye(4))
    finally:
        folder.chmod(0o700)
    assert os.listdir(folder) == []


def test_read_only_folder_is_refused_simulated(tmp_path, monkeypatch):
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):
        if flags & os.O_CREAT and os.path.dirname(os.fspath(path)) == str(tmp_path):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    target = tmp_path / "pet.nii.gz"
    with pytest.raises(OutputError) as caught:
        write_volume(target, pattern(), np.eye(4))
    assert str(caught.value) == f"{target}: folder {tmp_path} is not writable"
    assert os.listdir(tmp_path) == []


def test_disk_full_while_writing_leaves_no_partial_file(tmp_path, monkeypatch):
    def fills_the_disk(image, filename):
        with open(filename, "wb") as handle:
            handle.write(b"\x1f\x8b half a volume")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(imageio.nib, "save", fills_the_disk)
    target = tmp_path / "pet.nii.gz"
    with pytest.raises(OutputError) as caught:
        write_volume(target, pattern(), np.eye(4))
    assert str(caught.value).startswith(f"{target}: disk full") and caught.value.exit_code == 4
    assert os.listdir(tmp_path) == []


def test_disk_full_at_fsync_leaves_no_partial_file(tmp_path, monkeypatch):
    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    target = tmp_path / "pet.nii.gz"
    with pytest.raises(OutputError, match="disk full"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"payload")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("name, expected", [
    ("sub-01_t1.nii.gz", True), ("SUB.NII.GZ", True), ("a.nii", True), ("a.mgz", True), ("a.mgh", True),
    ("a.nrrd", True), ("a.nhdr", True), ("a.mha", True), ("a.mhd", True), ("a.hdr", True),
    ("a.img", False), ("a.raw", False), ("a.txt", False), ("a.csv", False), ("a.nii.gz.bak", False),
    (".pet.tmp-12-ab34cd56.nii.gz", False), ("._sub-01.nii.gz", False),
])
def test_is_image_path_by_name(tmp_path, name, expected):
    assert is_image_path(tmp_path / name) is expected


def test_is_image_path_for_folders(unusual, bad, tmp_path):
    assert is_image_path(unusual["dicom_folder"].path)
    assert not is_image_path(bad["directory"])
    assert not is_image_path(tmp_path)


@pytest.mark.parametrize("name, stem", [
    ("sub-01_t1.nii.gz", "sub-01_t1"), ("sub-01_t1.nii", "sub-01_t1"), ("SCAN.NII.GZ", "SCAN"),
    ("brain.v2.mgz", "brain.v2"), ("ct.nrrd", "ct"), ("ct.mhd", "ct"), ("pair.hdr", "pair"),
    ("notes.tar.gz", "notes"), ("README", "README"),
])
def test_image_stem(tmp_path, name, stem):
    assert image_stem(tmp_path / name) == stem
