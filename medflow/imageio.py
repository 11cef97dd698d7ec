"""Read, validate and atomically write 3D medical volumes.

Readers: NIfTI-1/NIfTI-2 (.nii, .nii.gz, .hdr/.img pairs) and MGH (.mgh, .mgz) through nibabel;
NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd) and DICOM series folders through SimpleITK.
Every volume comes back as float32 (X, Y, Z) in the file's own voxel order with a voxel->world
affine in RAS+ mm, exactly as nibabel would give it for the same image.  Every problem with an
input is an InputError "<path>: <problem>" on one line, raised before the voxels are read where
the header already tells.  Outputs are written through `atomic_path`: a hidden temporary file in
the target folder, fsynced, then linked (or, with overwrite, renamed) onto the final name.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import secrets
import shutil
import sys
import tempfile
import threading
import warnings
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from math import prod
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from medflow.errors import InputError, OutputError, ResourceError

NIBABEL_SUFFIXES = (".nii.gz", ".nii", ".mgz", ".mgh", ".hdr")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
IMAGE_SUFFIXES = NIBABEL_SUFFIXES + ITK_SUFFIXES
MIN_AXIS = 8
MAX_AXIS = 1024
MAX_VOXELS = 2**28
ORTHOGONALITY_TOL = 1e-3
GRID_TOL = 1e-4
MASK_THRESHOLD = 0.5

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
_DICOM_SUFFIXES = (".dcm", ".ima")
_FULL_DISK = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG)
_NO_WRITE = (errno.EACCES, errno.EPERM, errno.EROFS)
_NO_HARDLINKS = (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS)
_NATIVE_OUTPUT_LOCK = threading.Lock()


@dataclass
class Volume:
    """A validated volume: `data` float32 (X, Y, Z), finite; `affine` (4, 4) float64 voxel->RAS+ mm."""

    data: np.ndarray
    affine: np.ndarray
    path: Path


@dataclass
class _Header:
    """What a reader learns before touching the voxels; `read` returns them (any dtype, header shape)."""

    shape: tuple[int, ...]
    dtype_problem: str | None
    affine: Callable[[], np.ndarray]
    read: Callable[[], np.ndarray]


def read_volume(path: str | Path, *, what: str = "image") -> Volume:
    """Load a 3D image as float32 (X, Y, Z) with its RAS+ affine; InputError for anything unusable.

    `what` ("MRI", "PET", ...) names the file in the message when it does not exist.
    """
    path = Path(path)
    data, affine = _load(path, what)
    low, high = float(data.min()), float(data.max())
    if low == high:
        raise InputError(f"{path}: all voxels are {low:g}: empty volume")
    return Volume(data, affine, path)


def read_mask(path: str | Path, *, like: Volume) -> np.ndarray:
    """Load a mask on the grid of `like` as a bool (X, Y, Z) array: voxels >= 0.5 are inside.

    Binary masks, label maps (labels >= 1) and probability maps (threshold 0.5) all work.
    """
    path = Path(path)
    data, affine = _load(path, "mask")
    if data.shape != like.data.shape:
        raise InputError(f"{path}: mask grid {_dims(data.shape)} does not match the image grid "
                         f"{_dims(like.data.shape)} of {like.path}")
    if not np.allclose(affine, like.affine, rtol=0.0, atol=GRID_TOL):
        raise InputError(f"{path}: mask affine differs from the affine of {like.path} "
                         f"(largest difference {np.abs(affine - like.affine).max():.3g}); resample the mask")
    mask = data >= MASK_THRESHOLD
    if not mask.any():
        raise InputError(f"{path}: mask is empty (no voxel >= {MASK_THRESHOLD})")
    return mask


def write_bytes_atomic(path: str | Path, payload: bytes, *, overwrite: bool = False) -> Path:
    """Write ``payload`` to ``path`` through ``atomic_path``: all or nothing, never clobbering by accident."""
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_bytes(payload)
    return Path(path)


def check_folder_creatable(folder: str | Path) -> None:
    """OutputError naming ``folder`` when its nearest existing ancestor is a file or not
    writable, so that a job can fail before its work rather than after it."""
    folder = Path(folder).absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise OutputError(f"{folder}: cannot create the folder ({existing} is a file)")
    if existing != folder and not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"{folder}: cannot create the folder ({existing} is not writable)")


def make_folder(folder: str | Path) -> Path:
    """Create ``folder`` and its parents where missing; OutputError naming it when that fails."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{folder}: cannot create the folder ({(exc.strerror or str(exc)).lower()})") from None
    return folder


def check_nifti_name(path: Path) -> None:
    """OutputError unless ``path`` names a NIfTI file (.nii or .nii.gz)."""
    if not Path(path).name.lower().endswith((".nii", ".nii.gz")):
        raise OutputError(f"{path}: output must be a NIfTI file ending in .nii or .nii.gz")


def nifti_image(data: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    """(X, Y, Z) ``data`` as a float32 NIfTI-1 image with ``affine`` in both sform and qform (code 1,
    scanner), so every reader agrees on it."""
    data = np.asarray(data, dtype=np.float32)
    affine = np.asarray(affine, dtype=np.float64)
    if data.ndim != 3 or affine.shape != (4, 4):
        raise ValueError(f"nifti_image needs 3D data and a (4, 4) affine, got {data.shape} and {affine.shape}")
    image = nib.Nifti1Image(data, affine)
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    image.header.set_xyzt_units("mm")
    return image


def write_volume(path: str | Path, data: np.ndarray, affine: np.ndarray, *, overwrite: bool = False) -> Path:
    """Write ``nifti_image(data, affine)`` to ``path`` (.nii or .nii.gz by suffix), atomically."""
    path = Path(path)
    check_nifti_name(path)
    image = nifti_image(data, affine)
    with atomic_path(path, overwrite=overwrite) as tmp:
        nib.save(image, tmp)
    return path


@contextmanager
def atomic_path(path: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """``atomic_paths`` for one file: yields its temporary path."""
    with atomic_paths([path], overwrite=overwrite) as (tmp,):
        yield tmp


@contextmanager
def atomic_paths(paths: list[str | Path], *, overwrite: bool = False,
                 inputs: list[str | Path] = ()) -> Iterator[list[Path]]:
    """Yield a hidden temporary path next to each of ``paths`` (same suffix); publish them all there
    on clean exit: the outputs of one result appear together or not at all.

    Checks before yielding: the paths are distinct and none is one of ``inputs``; none exists
    unless ``overwrite``; each folder exists and is writable.  On clean exit all the files are
    fsynced, then each is hard-linked onto its path (so a file that another writer created
    meanwhile is never clobbered: OutputError, and the outputs already published are removed) or,
    with ``overwrite``, renamed over it (the files it replaces are kept aside until all are in place,
    and put back if one fails).  On any exception, KeyboardInterrupt included, the temporary files
    are removed and the exception re-raised; a full disk becomes OutputError.
    """
    paths = [Path(p) for p in paths]
    check_output_paths(paths, [Path(p) for p in inputs], overwrite)
    tmps: list[Path] = []
    published: list[Path] = []
    replaced: dict[Path, Path] = {}
    try:
        for path in paths:
            tmp = _hidden_sibling(path, "tmp")
            try:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            except OSError as exc:
                raise _output_error(path, exc) from None
            tmps.append(tmp)
        yield list(tmps)
        for tmp, path in zip(tmps, paths):
            try:
                _fsync(tmp)
            except OSError as exc:
                raise _output_error(path, exc) from None
        for tmp, path in zip(tmps, paths):
            try:
                if overwrite and path.exists():
                    replaced[path] = _keep_aside(path)
                _publish(tmp, path, overwrite)
            except OSError as exc:
                raise _output_error(path, exc) from None
            published.append(path)
    except BaseException as exc:
        for tmp in tmps:
            _remove_quietly(tmp)
        for path in published:
            if path in replaced:
                os.replace(replaced.pop(path), path)
            else:
                _remove_quietly(path)
        for old in replaced.values():
            _remove_quietly(old)
        if isinstance(exc, OSError) and exc.errno in _FULL_DISK:
            raise _output_error(paths[len(published)], exc) from None
        raise
    for old in replaced.values():
        _remove_quietly(old)
    for folder in dict.fromkeys(path.parent for path in paths):
        _fsync_folder(folder)


def _keep_aside(path: Path) -> Path:
    """A hidden hard link to (or, where the folder has none, copy of) the file at ``path``."""
    old = _hidden_sibling(path, "old")
    try:
        os.link(path, old)
    except OSError as exc:
        if exc.errno not in _NO_HARDLINKS:
            raise
        shutil.copyfile(path, old)
    return old


def _hidden_sibling(path: Path, tag: str) -> Path:
    """A new hidden name beside ``path`` with its suffix: ``.NAME.TAG-PID-RANDOM.nii.gz``."""
    stem, suffix = _split_suffix(path.name)
    return path.parent / f".{stem}.{tag}-{os.getpid()}-{secrets.token_hex(4)}{suffix}"


def check_output_paths(paths: list[Path], inputs: list[Path], overwrite: bool) -> None:
    """``atomic_paths``' checks, for a caller to run before the work whose results it will write."""
    seen: dict[str, Path] = {}
    given = {os.path.realpath(p) for p in inputs}
    for path in paths:
        key = os.path.realpath(path)
        if key in seen:
            raise OutputError(f"{path}: given for two outputs ({seen[key]} too); give each its own path")
        seen[key] = path
        if key in given:
            raise OutputError(f"{path}: is an input; choose another output path")
        if path.is_dir():
            raise OutputError(f"{path}: is a folder; give a file name")
        if os.path.lexists(path) and not overwrite:
            raise OutputError(f"{path}: exists; pass --overwrite to replace it")
        if not path.parent.is_dir():
            raise OutputError(f"{path}: folder {path.parent} does not exist")


def is_image_path(path: str | Path) -> bool:
    """True for a non-hidden file with a supported suffix, or a folder holding DICOM files.

    A folder counts as DICOM when a non-hidden file in it ends in .dcm/.ima or carries the
    'DICM' preamble; files without a preamble (old ACR-NEMA) are only found by `read_volume`.
    """
    path = Path(path)
    if path.name.startswith("."):
        return False
    if path.is_dir():
        return _holds_dicom(path)
    return path.name.lower().endswith(IMAGE_SUFFIXES)


def image_stem(path: str | Path) -> str:
    """The name without its image suffix ("sub-01_t1" for "sub-01_t1.nii.gz"); a folder's own name."""
    path = Path(path)
    if path.is_dir():
        return path.name
    return _split_suffix(path.name)[0]


def _load(path: Path, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Validated (data float32 (X, Y, Z), affine (4, 4) float64) of any supported image."""
    _check_readable(path, what)
    native: list[str] = []
    uses_itk = path.is_dir() or path.name.lower().endswith(ITK_SUFFIXES)
    try:
        with warnings.catch_warnings(), _nibabel_quiet(), (
                _native_output_captured(native) if uses_itk else nullcontext()):
            warnings.simplefilter("ignore")
            header = _open(path)
            shape = _check_shape(path, header.shape)
            if header.dtype_problem:
                raise InputError(f"{path}: {header.dtype_problem}")
            affine = _check_affine(path, header.affine())
            data = np.asarray(header.read(), dtype=np.float32).reshape(shape)
    except InputError:
        raise
    except MemoryError:
        raise ResourceError(f"{path}: not enough memory to load this volume") from None
    except Exception as exc:
        raise InputError(f"{path}: {_problem(exc, ' '.join(native))}") from None
    bad = int(data.size - np.count_nonzero(np.isfinite(data)))
    if bad:
        raise InputError(f"{path}: contains {bad} NaN/Inf voxels")
    return data, affine


def _check_readable(path: Path, what: str) -> None:
    """Existence and permission checks that every format shares."""
    try:
        if path.is_dir():
            os.listdir(path)
            return
        with open(path, "rb") as handle:
            head = handle.read(1)
    except FileNotFoundError:
        raise InputError(f"{path}: no such {what} file") from None
    except PermissionError:
        raise InputError(f"{path}: permission denied") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot be opened ({(exc.strerror or str(exc)).lower()})") from None
    if not head:
        raise InputError(f"{path}: empty file (0 bytes)")


def _open(path: Path) -> _Header:
    """Dispatch on folder / suffix to the reader that handles it."""
    name = path.name.lower()
    if path.is_dir():
        return _open_dicom(path)
    if name.endswith(NIBABEL_SUFFIXES + (".img",)):
        return _open_nibabel(path)
    if name.endswith(ITK_SUFFIXES):
        return _open_itk_file(path)
    if name.endswith(_DICOM_SUFFIXES):
        raise InputError(f"{path}: a single DICOM file; give the folder that holds the whole series")
    raise InputError(f"{path}: not a recognised image format (expected {', '.join(IMAGE_SUFFIXES)} "
                     f"or a DICOM folder)")


def _open_nibabel(path: Path) -> _Header:
    image = nib.load(path, mmap=False)
    if not isinstance(image, (nib.Nifti1Pair, nib.MGHImage)):
        raise InputError(f"{path}: old Analyze 7.5 format, whose left-right orientation is ambiguous; "
                         "convert it to NIfTI with a known orientation")
    if isinstance(image, nib.Nifti1Pair) and not image.header["sform_code"] and not image.header["qform_code"]:
        raise InputError(f"{path}: no orientation (NIfTI sform and qform codes 0), so its position and "
                         "left-right orientation are unknown; set them from the scanner's data (e.g. fslorient)")
    dtype = image.get_data_dtype()
    if dtype.fields:
        problem = "colour (RGB/RGBA) data; give a scalar (grey-level) volume"
    elif dtype.kind == "c":
        problem = f"complex data type {dtype}; give a real-valued volume"
    elif dtype.kind not in "biuf":
        problem = f"non-numeric data type {dtype}"
    else:
        problem = None
    return _Header(tuple(image.header.get_data_shape()), problem, lambda: image.affine,
                   lambda: image.get_fdata(dtype=np.float32))


def _open_itk_file(path: Path) -> _Header:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return _itk_header(reader, reader.GetNumberOfComponents(), reader.Execute)


def _open_dicom(path: Path) -> _Header:
    """A folder holding exactly one DICOM series, slices sorted by position along the normal."""
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path))
    if not series:
        raise InputError(f"{path}: is a folder that holds no DICOM series")
    if len(series) > 1:
        raise InputError(f"{path}: folder holds {len(series)} DICOM series; give a folder with one series")
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), series[0])
    if len(files) == 1:
        return _open_itk_file(Path(files[0]))
    first = sitk.ImageFileReader()
    first.SetFileName(files[0])
    first.ReadImageInformation()
    _check_shape(path, (*first.GetSize()[:2], len(files)))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    image = reader.Execute()
    return _itk_header(image, image.GetNumberOfComponentsPerPixel(), lambda: image)


def _itk_header(source, components: int, execute: Callable[[], sitk.Image]) -> _Header:
    """Header of an ITK reader or image; LPS geometry converted to a RAS affine, data to (X, Y, Z)."""
    pixel = sitk.GetPixelIDValueAsString(source.GetPixelID())
    problem = None
    if components > 1:
        problem = f"{components}-component pixels ({pixel}); give a scalar (grey-level) volume"
    dim = source.GetDimension()

    def affine() -> np.ndarray:
        direction = np.asarray(source.GetDirection(), dtype=np.float64).reshape(dim, dim)[:3, :3]
        result = np.eye(4)
        result[:3, :3] = _LPS_TO_RAS @ direction @ np.diag(source.GetSpacing()[:3])
        result[:3, 3] = _LPS_TO_RAS @ np.asarray(source.GetOrigin()[:3], dtype=np.float64)
        return result

    def read() -> np.ndarray:
        array = sitk.GetArrayFromImage(execute())
        return array.transpose(tuple(range(array.ndim))[::-1])

    return _Header(tuple(source.GetSize()), problem, affine, read)


def _check_shape(path: Path, shape: tuple[int, ...]) -> tuple[int, int, int]:
    """The 3D shape after dropping trailing singleton axes; InputError for any unusable shape."""
    dims = tuple(int(n) for n in shape)
    while len(dims) > 3 and dims[-1] == 1:
        dims = dims[:-1]
    text = _dims(dims)
    if len(dims) < 3 or (len(dims) == 3 and dims.count(1) == 1):
        raise InputError(f"{path}: 2D image ({text}); give a 3D volume")
    if len(dims) == 4:
        raise InputError(f"{path}: 4D series with {dims[3]} frames; give one 3D volume")
    if len(dims) > 4:
        raise InputError(f"{path}: {len(dims)}D image ({text}); give one 3D volume")
    if max(dims) > MAX_AXIS or prod(dims) > MAX_VOXELS:
        raise InputError(f"{path}: declared size {text} is too large (limit {MAX_AXIS} voxels per axis, "
                         f"{MAX_VOXELS} in all)")
    if min(dims) < MIN_AXIS:
        raise InputError(f"{path}: {text} volume is too small (minimum {MIN_AXIS} voxels per axis)")
    return dims


def _check_affine(path: Path, affine: np.ndarray) -> np.ndarray:
    """The affine as float64 (4, 4) if finite, invertible and free of shear."""
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise InputError(f"{path}: non-finite (NaN/Inf) affine")
    columns = affine[:3, :3]
    zooms = np.linalg.norm(columns, axis=0)
    if (zooms < 1e-6).any() or abs(np.linalg.det(columns / zooms)) < 1e-6:
        raise InputError(f"{path}: singular affine (a voxel axis has zero length or two axes coincide)")
    cosines = columns / zooms
    if np.abs(cosines.T @ cosines - np.eye(3)).max() > ORTHOGONALITY_TOL:
        raise InputError(f"{path}: sheared (non-orthogonal) affine")
    return affine


def _problem(exc: Exception, native: str) -> str:
    """A short lower-case description of a library failure, without tracebacks or source paths."""
    text = f"{exc} {native}"
    short = re.search(r"Expected (\d+) bytes, got (\d+) bytes", text)
    if short:
        return f"data is shorter than the header declares ({short[2]} of {short[1]} bytes; truncated file?)"
    if "not read completely" in text or "fread got only" in text:
        return "data is shorter than the header declares (truncated file?)"
    if "Cannot open data file" in text or "nrrdIoStateDataFileIterNext" in text:
        return "its separate data file is missing or unreadable"
    if isinstance(exc, (EOFError, zlib.error)) or "end-of-stream" in text:
        return "truncated or corrupt compressed file"
    if "not a gzip file" in text.lower():
        return "not a gzip file (corrupt, or the name ends in .gz by mistake)"
    if isinstance(exc, nib.filebasedimages.ImageFileError) or "Unable to determine ImageIO" in text:
        return "not a recognised image format (unreadable header)"
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith(("Exception thrown in SimpleITK", "Traceback"))]
    detail = re.sub(r"^(ITK ERROR: \w+\(0x[0-9a-f]+\): |sitk::ERROR: )", "", lines[0] if lines else type(exc).__name__)
    return f"cannot be read ({detail[:200]})"


def _dims(shape: tuple[int, ...]) -> str:
    return "x".join(str(n) for n in shape)


def _split_suffix(name: str) -> tuple[str, str]:
    """("sub-01_t1", ".nii.gz") for "sub-01_t1.nii.gz"; a known image suffix wins, else the last one (two with .gz)."""
    lower = name.lower()
    for suffix in IMAGE_SUFFIXES:
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)], name[-len(suffix):]
    stem, dot, last = name.rpartition(".")
    if not dot or not stem:
        return name, ""
    if last.lower() == "gz" and "." in stem.lstrip("."):
        stem, _, before = stem.rpartition(".")
        return stem, f".{before}.{last}"
    return stem, f".{last}"


def _holds_dicom(folder: Path) -> bool:
    try:
        entries = [p for p in folder.iterdir() if not p.name.startswith(".") and p.is_file()]
    except OSError:
        return False
    for entry in entries:
        if entry.name.lower().endswith(_DICOM_SUFFIXES):
            return True
        if entry.name.lower().endswith(IMAGE_SUFFIXES):
            continue
        try:
            with open(entry, "rb") as handle:
                if handle.read(132)[128:] == b"DICM":
                    return True
        except OSError:
            continue
    return False


@contextmanager
def _nibabel_quiet() -> Iterator[None]:
    """Silence nibabel's header-check logger, which otherwise prints its own lines to stderr."""
    logger = nib.imageglobals.logger
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextmanager
def _native_output_captured(sink: list[str]) -> Iterator[None]:
    """Route what C++ code (ITK, GDCM, MetaIO) prints on fds 1 and 2 into `sink` instead of the terminal.

    File descriptors are process-wide, so one thread at a time; Python output meanwhile goes there too.
    """
    with _NATIVE_OUTPUT_LOCK, tempfile.TemporaryFile() as capture:
        copies = _std_fd_copies()
        for fd in copies:
            os.dup2(capture.fileno(), fd)
        try:
            yield
        finally:
            for fd, copy in copies.items():
                os.dup2(copy, fd)
                os.close(copy)
            capture.seek(0)
            sink.append(capture.read().decode(errors="replace"))


def _std_fd_copies() -> dict[int, int]:
    """{fd: duplicate} for fds 1 and 2 after flushing Python's buffers; closed ones are left out."""
    copies = {}
    for fd, stream in ((1, sys.stdout), (2, sys.stderr)):
        try:
            if stream is not None:
                stream.flush()
            copies[fd] = os.dup(fd)
        except (OSError, ValueError):
            continue
    return copies


def _output_error(path: Path, exc: OSError) -> OutputError:
    if exc.errno in _FULL_DISK:
        return OutputError(f"{path}: disk full or quota exceeded while writing; nothing was written")
    if exc.errno in _NO_WRITE:
        return OutputError(f"{path}: folder {path.parent} is not writable")
    if isinstance(exc, FileExistsError):
        return OutputError(f"{path}: exists (another writer created it meanwhile); pass --overwrite to replace it")
    return OutputError(f"{path}: cannot write ({(exc.strerror or str(exc)).lower()})")


def _publish(tmp: Path, path: Path, overwrite: bool) -> None:
    """Move the finished `tmp` onto `path`; without `overwrite`, never replace a file that appeared meanwhile."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except OSError as exc:
        if isinstance(exc, FileExistsError) or exc.errno not in _NO_HARDLINKS:
            raise
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: Path) -> None:
    """Make the new directory entry durable; some filesystems cannot, which is harmless."""
    try:
        _fsync(folder)
    except OSError:
        pass


def _remove_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
