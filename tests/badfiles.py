"""A corpus of bad and unusual input files, written into a test's tmp folder.

`bad_corpus(folder)` gives {case: path} for inputs every reader must refuse with one InputError;
`unusual_cases(folder)` gives {case: Case(path, data, affine)} for awkward but valid inputs with
the float32 (X, Y, Z) data and RAS+ mm affine that reading them must return; `unusual_corpus`
is the same as {case: path}.  Volumes are small (20x24x18) with a smooth, asymmetric pattern, so
a flipped or transposed axis changes the data.
"""

from __future__ import annotations

import gzip
import locale
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

SHAPE = (20, 24, 18)
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
LPS_TO_RAS_4 = np.diag([-1.0, -1.0, 1.0, 1.0])
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
UID_ROOT = "1.2.826.0.1.3680043.2.1125.77"

BAD_CASES = (
    "missing", "truncated_gz", "garbage_gz", "header_only", "short_data", "empty_file", "text_file",
    "unknown_format", "single_dicom_file", "nan", "inf", "all_zero", "constant", "two_d", "single_slice",
    "four_d", "five_d", "tiny_3x3x3", "thin_20x24x5", "singular_affine", "parallel_axes_affine",
    "sheared_affine", "nonfinite_affine", "huge_declared", "huge_axis", "complex_dtype", "rgb_dtype", "analyze",
    "no_orientation", "directory", "two_dicom_series", "truncated_mha", "truncated_nrrd", "garbage_nrrd",
    "mhd_missing_data", "nhdr_missing_data", "rgb_mha", "four_d_mha", "two_d_mha", "unreadable",
)
UNUSUAL_CASES = (
    "lps", "oblique", "anisotropic", "qform_only", "int16_scaled", "big_endian", "uint8", "four_d_one_frame",
    "nifti2", "nifti_pair", "mgz", "mgh", "nrrd", "nhdr", "mha", "mhd", "dicom_folder",
)


@dataclass
class Case:
    """A valid file and what reading it must give: `data` float32 (X, Y, Z), `affine` RAS+ mm."""

    path: Path
    data: np.ndarray
    affine: np.ndarray


def pattern(shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    """Smooth positive float32 volume (about 100..1000) with different ramps along each axis."""
    x, y, z = np.meshgrid(*[np.linspace(-1.0, 1.0, n) for n in shape], indexing="ij")
    blob = 600.0 * np.exp(-2.0 * ((x - 0.2) ** 2 + y**2 + (z + 0.1) ** 2))
    volume = 300.0 + blob + 80.0 * x + 40.0 * y + 20.0 * z + 30.0 * np.sin(3.0 * x) * np.cos(2.0 * y)
    return volume.astype(np.float32)


def oblique_affine(zooms=(0.9, 1.1, 2.5), degrees=(10.0, -7.0, 25.0), origin=(12.0, -30.0, 41.0)) -> np.ndarray:
    """A proper rotation (about x, then y, then z) times diag(zooms), with a translation; (4, 4)."""
    ax, ay, az = np.deg2rad(degrees)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ ry @ rx @ np.diag(zooms)
    affine[:3, 3] = origin
    return affine


def diagonal_affine(zooms, origin) -> np.ndarray:
    affine = np.diag([*zooms, 1.0])
    affine[:3, 3] = origin
    return affine


def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray, *, sform: bool = True, qform: bool = True,
               image_class=nib.Nifti1Image) -> Path:
    """Save with the affine in the sform and / or qform (code 1; code 0 and no affine where False)."""
    image = image_class(data, None)
    image.set_sform(affine if sform else None, code=int(sform))
    image.set_qform(affine if qform else None, code=int(qform))
    nib.save(image, path)
    return path


def write_raw_nifti(path: Path, header: nib.Nifti1Header, payload: bytes) -> Path:
    """A single-file NIfTI: `header` as it is (scaling included), then `payload` bytes (gzipped for .gz)."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wb") as handle:
        header.write_to(handle)
        handle.write(payload)
    return path


def nifti_header(shape, dtype, affine=None, *, header_class=nib.Nifti1Header, endianness=None) -> nib.Nifti1Header:
    """A header with the sform (code 1) set and no data behind it yet."""
    header = header_class(endianness=endianness)
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_sform(np.eye(4) if affine is None else affine, code=1)
    return header


def write_dicom_series(folder: Path, raw: np.ndarray, affine: np.ndarray, *, series: int = 1) -> Path:
    """One MR DICOM file per z slice of int16 (X, Y, Z) `raw`, geometry taken from the RAS `affine`.
    GDCM's writer leaves the process in the C locale (ASCII text I/O, which breaks later
    imports that read UTF-8 files, e.g. torch.compile's), so the caller's locale is restored."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        return _write_dicom_slices(folder, raw, affine, series)
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def _write_dicom_slices(folder: Path, raw: np.ndarray, affine: np.ndarray, series: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    lps = LPS_TO_RAS @ affine[:3, :3] / zooms
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(raw.shape[2]):
        image = sitk.GetImageFromArray(np.ascontiguousarray(raw[:, :, k].T))
        image.SetSpacing((float(zooms[0]), float(zooms[1])))
        position = LPS_TO_RAS @ (affine @ [0.0, 0.0, k, 1.0])[:3]
        tags = {
            "0008|0016": MR_IMAGE_STORAGE,
            "0008|0018": f"{UID_ROOT}.{series}.{k + 1}",
            "0008|0060": "MR",
            "0010|0010": "TEST^PHANTOM",
            "0018|0050": f"{zooms[2]:.6f}",
            "0020|000d": f"{UID_ROOT}.0",
            "0020|000e": f"{UID_ROOT}.{series}",
            "0020|0011": str(series),
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:.6f}" for v in position),
            "0020|0037": "\\".join(f"{v:.6f}" for v in (*lps[:, 0], *lps[:, 1])),
            "0028|0030": f"{zooms[1]:.6f}\\{zooms[0]:.6f}",
        }
        for tag, value in tags.items():
            image.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"s{series}_{k:03d}.dcm"))
        writer.Execute(image)
    return folder


def _via_itk(folder: Path, name: str, data: np.ndarray, affine: np.ndarray) -> Path:
    """Write through ITK's own NIfTI reader, so the LPS conversion is ITK's, not medflow's."""
    source = save_nifti(folder / f"_{name}_source.nii.gz", data, affine)
    path = folder / name
    image = sitk.ReadImage(str(source))
    for key in image.GetMetaDataKeys():
        image.EraseMetaData(key)
    sitk.WriteImage(image, str(path))
    source.unlink()
    return path


def _cut(source: Path, target: Path, fraction: float) -> Path:
    payload = source.read_bytes()
    target.write_bytes(payload[: int(len(payload) * fraction)])
    return target


def unusual_cases(folder: str | Path) -> dict[str, Case]:
    """Valid but awkward inputs with their ground truth."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = pattern()
    oblique = oblique_affine()
    cases: dict[str, Case] = {}

    def add(name, path, truth=data, affine=oblique):
        cases[name] = Case(path, truth, affine)

    lps = diagonal_affine((-1.2, -1.2, 1.5), (40.0, 45.0, -35.0))
    add("lps", save_nifti(folder / "lps.nii.gz", data, lps), affine=lps)
    add("oblique", save_nifti(folder / "oblique.nii.gz", data, oblique))
    anisotropic = diagonal_affine((0.8, 1.1, 3.0), (-8.0, -13.0, -27.0))
    add("anisotropic", save_nifti(folder / "anisotropic.nii.gz", data, anisotropic), affine=anisotropic)
    add("qform_only", save_nifti(folder / "qform_only.nii", data, oblique, sform=False))

    raw = np.round(data * 2).astype(np.int16)
    header = nifti_header(SHAPE, np.int16, oblique)
    header.set_slope_inter(0.5, -100.0)
    add("int16_scaled", write_raw_nifti(folder / "int16_scaled.nii.gz", header, raw.tobytes(order="F")),
        truth=raw.astype(np.float32) * 0.5 - 100.0)
    big = nifti_header(SHAPE, np.float32, oblique, endianness=">")
    add("big_endian", write_raw_nifti(folder / "big_endian.nii", big, data.astype(">f4").tobytes(order="F")))
    add("uint8", save_nifti(folder / "uint8.nii.gz", np.round(data / 4).astype(np.uint8), oblique),
        truth=np.round(data / 4).astype(np.float32))
    add("four_d_one_frame", save_nifti(folder / "four_d_one_frame.nii.gz", data[..., None], oblique))
    add("nifti2", save_nifti(folder / "nifti2.nii", data, oblique, image_class=nib.Nifti2Image))
    add("nifti_pair", save_nifti(folder / "nifti_pair.hdr", data, oblique, image_class=nib.Nifti1Pair))
    nib.save(nib.MGHImage(data, oblique), folder / "volume.mgz")
    add("mgz", folder / "volume.mgz")
    nib.save(nib.MGHImage(data, oblique), folder / "volume.mgh")
    add("mgh", folder / "volume.mgh")

    lps_oblique = LPS_TO_RAS_4 @ oblique_affine(zooms=(1.3, 0.7, 2.0), degrees=(-12.0, 5.0, 30.0))
    for suffix in ("nrrd", "nhdr", "mha", "mhd"):
        add(suffix, _via_itk(folder, f"itk_{suffix}.{suffix}", data, lps_oblique), affine=lps_oblique)

    add("dicom_folder", write_dicom_series(folder / "dicom_series", raw, oblique), truth=raw.astype(np.float32))
    return cases


def unusual_corpus(folder: str | Path) -> dict[str, Path]:
    """{case: path} of `unusual_cases`."""
    return {name: case.path for name, case in unusual_cases(folder).items()}


def bad_corpus(folder: str | Path) -> dict[str, Path]:
    """{case: path} of inputs that must each be refused with one InputError naming the path.

    "unreadable" is chmod 000, which root can still read: callers running as root skip it.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = pattern()
    eye = np.eye(4)
    rng = np.random.default_rng(7)
    paths: dict[str, Path] = {"missing": folder / "missing.nii.gz"}

    good = save_nifti(folder / "_good.nii.gz", data, eye)
    paths["truncated_gz"] = _cut(good, folder / "truncated.nii.gz", 0.6)
    paths["garbage_gz"] = folder / "garbage.nii.gz"
    paths["garbage_gz"].write_bytes(rng.bytes(4000))
    paths["header_only"] = write_raw_nifti(folder / "header_only.nii", nifti_header(SHAPE, np.float32), b"")
    paths["short_data"] = write_raw_nifti(folder / "short_data.nii", nifti_header(SHAPE, np.float32),
                                          data.tobytes(order="F")[:5000])
    paths["empty_file"] = folder / "empty.nii.gz"
    paths["empty_file"].write_bytes(b"")
    paths["text_file"] = folder / "notes.nii"
    paths["text_file"].write_text("subject,age\nsub-01,42\n" * 40)
    paths["unknown_format"] = folder / "scan.vtk"
    paths["unknown_format"].write_text("# vtk DataFile Version 3.0\n")
    paths["single_dicom_file"] = folder / "slice.dcm"
    paths["single_dicom_file"].write_bytes(b"\0" * 128 + b"DICM")

    with_nan = data.copy()
    with_nan.flat[rng.choice(data.size, 12, replace=False)] = np.nan
    paths["nan"] = save_nifti(folder / "nan.nii.gz", with_nan, eye)
    with_inf = data.copy()
    with_inf.flat[rng.choice(data.size, 5, replace=False)] = [np.inf, -np.inf, np.inf, np.inf, -np.inf]
    paths["inf"] = save_nifti(folder / "inf.nii.gz", with_inf, eye)
    paths["all_zero"] = save_nifti(folder / "all_zero.nii.gz", np.zeros(SHAPE, np.float32), eye)
    paths["constant"] = save_nifti(folder / "constant.nii.gz", np.full(SHAPE, 7.5, np.float32), eye)

    paths["two_d"] = save_nifti(folder / "two_d.nii.gz", data[:, :, 0], eye)
    paths["single_slice"] = save_nifti(folder / "single_slice.nii.gz", data[:, :, :1], eye)
    paths["four_d"] = save_nifti(folder / "four_d.nii.gz", np.stack([data] * 12, axis=-1), eye)
    paths["five_d"] = save_nifti(folder / "five_d.nii.gz", np.stack([data[..., None]] * 3, axis=-1), eye)
    paths["tiny_3x3x3"] = save_nifti(folder / "tiny.nii.gz", pattern((3, 3, 3)), eye)
    paths["thin_20x24x5"] = save_nifti(folder / "thin.nii.gz", pattern((20, 24, 5)), eye)

    paths["singular_affine"] = save_nifti(folder / "singular.nii.gz", data, np.diag([2.0, 2.0, 0.0, 1.0]),
                                          qform=False)
    parallel = np.eye(4)
    parallel[:3, 1] = [1.0, 0.0, 0.0]
    paths["parallel_axes_affine"] = save_nifti(folder / "parallel.nii.gz", data, parallel, qform=False)
    sheared = np.eye(4)
    sheared[0, 1] = 0.3
    paths["sheared_affine"] = save_nifti(folder / "sheared.nii.gz", data, sheared, qform=False)
    paths["nonfinite_affine"] = write_raw_nifti(folder / "nonfinite.nii.gz",
                                                nifti_header(SHAPE, np.float32, np.diag([np.nan, 1.0, 1.0, 1.0])),
                                                data.tobytes(order="F"))

    paths["huge_declared"] = write_raw_nifti(folder / "huge.nii",
                                             nifti_header((100000,) * 3, np.float32, header_class=nib.Nifti2Header),
                                             b"")
    paths["huge_axis"] = write_raw_nifti(folder / "huge_axis.nii", nifti_header((2000, 24, 18), np.float32), b"")
    paths["complex_dtype"] = save_nifti(folder / "complex.nii.gz", data.astype(np.complex64), eye)
    rgb = np.zeros(SHAPE, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    paths["rgb_dtype"] = write_raw_nifti(folder / "rgb.nii", nifti_header(SHAPE, rgb.dtype), rgb.tobytes(order="F"))
    nib.save(nib.AnalyzeImage(data, eye), folder / "analyze.hdr")
    paths["analyze"] = folder / "analyze.hdr"
    paths["no_orientation"] = save_nifti(folder / "no_orientation.nii.gz", data, eye, sform=False, qform=False)

    paths["directory"] = folder / "not_dicom"
    paths["directory"].mkdir(exist_ok=True)
    (paths["directory"] / "notes.txt").write_text("not an image\n")
    paths["two_dicom_series"] = folder / "two_series"
    raw = np.round(data).astype(np.int16)
    write_dicom_series(paths["two_dicom_series"], raw, eye, series=1)
    write_dicom_series(paths["two_dicom_series"], raw, eye, series=2)

    itk_image = sitk.GetImageFromArray(np.ascontiguousarray(data.T))
    itk_good, nrrd_good = folder / "_good.mha", folder / "_good.nrrd"
    sitk.WriteImage(itk_image, str(itk_good))
    paths["truncated_mha"] = _cut(itk_good, folder / "truncated.mha", 0.6)
    sitk.WriteImage(itk_image, str(nrrd_good))
    paths["truncated_nrrd"] = _cut(nrrd_good, folder / "truncated.nrrd", 0.6)
    paths["garbage_nrrd"] = folder / "garbage.nrrd"
    paths["garbage_nrrd"].write_bytes(rng.bytes(3000))
    sitk.WriteImage(itk_image, str(folder / "no_data.mhd"))
    (folder / "no_data.raw").unlink()
    paths["mhd_missing_data"] = folder / "no_data.mhd"
    sitk.WriteImage(itk_image, str(folder / "no_nrrd_data.nhdr"))
    (folder / "no_nrrd_data.raw").unlink()
    paths["nhdr_missing_data"] = folder / "no_nrrd_data.nhdr"
    paths["rgb_mha"] = folder / "rgb.mha"
    sitk.WriteImage(sitk.Image([20, 24, 18], sitk.sitkVectorUInt8, 3), str(paths["rgb_mha"]))
    frames = [sitk.GetImageFromArray(np.ascontiguousarray((data + i).T)) for i in range(3)]
    paths["four_d_mha"] = folder / "four_d.mha"
    sitk.WriteImage(sitk.JoinSeries(frames), str(paths["four_d_mha"]))
    paths["two_d_mha"] = folder / "two_d.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.ascontiguousarray(data[:, :, 0].T)), str(paths["two_d_mha"]))

    paths["unreadable"] = folder / "unreadable.nii.gz"
    shutil.copyfile(good, paths["unreadable"])
    os.chmod(paths["unreadable"], 0)
    for helper in (good, itk_good, nrrd_good):
        helper.unlink()
    return paths
