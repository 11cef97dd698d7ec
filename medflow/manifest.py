"""Training manifests: which MRI and PET files belong together.

Two forms (see README, "Data format"):

* a CSV with columns ``mri`` and ``pet`` (paths relative to the CSV's folder), optional
  ``mask`` and ``subject``, further MRI contrasts in columns named with ``--mri-columns``
  (e.g. ``mri,t2``), and any other columns kept as side information;
* a folder with sub-folders ``mri/`` and ``pet/`` (optionally ``mask/``) holding files of
  identical names, paired by name.
"""

from __future__ import annotations

import codecs
import csv
import io
import os
from dataclasses import dataclass, field
from pathlib import Path

from medflow.errors import InputError
from medflow.imageio import image_stem, is_image_path


@dataclass
class Subject:
    """One paired study: MRI contrasts (in channel order), PET, optional mask and side info."""

    subject: str
    mri: list[Path]
    pet: Path | None
    mask: Path | None = None
    side: dict[str, str] = field(default_factory=dict)
    split: str = ""


def resolve_listed_path(value: str, base: Path, source: Path, allow_outside: bool) -> Path:
    """A path from a list file, relative to ``base``; refuses to leave ``base`` unless allowed."""
    raw = Path(value.strip())
    path = raw if raw.is_absolute() else base / os.path.normpath(raw)
    if not allow_outside:
        if raw.is_absolute():
            raise InputError(f"{source}: absolute path {value!r} not allowed (pass --allow-outside-paths)")
        if Path(os.path.normpath(raw)).parts[:1] == ("..",):
            raise InputError(f"{source}: path {value!r} leaves the list's folder (pass --allow-outside-paths)")
    return path


def read_csv_rows(csv_path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """The header's column names and the rows of a CSV file, names and values stripped of
    surrounding spaces; a UTF-8 byte-order mark (Excel's "CSV UTF-8") is ignored. Text in
    another encoding is refused with the line of its first foreign byte."""
    try:
        data = Path(csv_path).read_bytes()
    except OSError as exc:
        raise InputError(f"{csv_path}: cannot read CSV ({exc.strerror or exc})") from None
    data = data.removeprefix(codecs.BOM_UTF8)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise InputError(f"{csv_path}: line {line} is not UTF-8 text (byte 0x{data[exc.start]:02x}); save the "
                         "file as \"CSV UTF-8\"") from None
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        columns = [c.strip() for c in reader.fieldnames or []]
        rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items() if isinstance(v, str) or v is None}
                for row in reader]
    except csv.Error as exc:
        raise InputError(f"{csv_path}: cannot read CSV ({exc})") from None
    return columns, rows


def read_csv_manifest(csv_path: Path, mri_columns: list[str], *, need_pet: bool = True,
                      allow_outside: bool = False) -> list[Subject]:
    """Subjects listed in a CSV file."""
    csv_path = Path(csv_path)
    columns, rows = read_csv_rows(csv_path)
    required = list(mri_columns) + (["pet"] if need_pet else [])
    missing = [c for c in required if c not in columns]
    if missing:
        raise InputError(f"{csv_path}: missing column(s) {', '.join(missing)}")
    if not rows:
        raise InputError(f"{csv_path}: lists no subjects (a header and no rows)")
    base = csv_path.parent
    reserved = set(mri_columns) | {"pet", "mask", "subject", "split"}
    subjects = []
    for index, row in enumerate(rows):
        def path_of(column):
            value = row.get(column, "")
            return resolve_listed_path(value, base, csv_path, allow_outside) if value else None

        mri = [path_of(c) for c in mri_columns]
        if any(p is None for p in mri) or (need_pet and path_of("pet") is None):
            raise InputError(f"{csv_path}: row {index + 2} has an empty path")
        name = row.get("subject") or image_stem(mri[0])
        side = {k: v for k, v in row.items() if k and k not in reserved and v}
        subjects.append(Subject(name, mri, path_of("pet") if "pet" in columns else None, path_of("mask"), side,
                                row.get("split", "").lower()))
    if not subjects:
        raise InputError(f"{csv_path}: no rows")
    return subjects


def read_folder_manifest(folder: Path) -> list[Subject]:
    """Subjects from ``folder/mri/NAME`` and ``folder/pet/NAME`` (and ``folder/mask/NAME``)."""
    folder = Path(folder)
    mri_dir, pet_dir, mask_dir = folder / "mri", folder / "pet", folder / "mask"
    if not mri_dir.is_dir() or not pet_dir.is_dir():
        raise InputError(f"{folder}: expected sub-folders mri/ and pet/ with files of the same names")
    subjects = []
    for mri in sorted(p for p in mri_dir.iterdir() if is_image_path(p)):
        pet = pet_dir / mri.name
        if not pet.exists():
            raise InputError(f"{mri}: no PET of the same name in {pet_dir}")
        mask = mask_dir / mri.name
        subjects.append(Subject(image_stem(mri), [mri], pet, mask if mask.exists() else None))
    if not subjects:
        raise InputError(f"{folder}: no images in {mri_dir}")
    return subjects


def read_manifest(source: Path, mri_columns: list[str] | None = None, *, need_pet: bool = True,
                  allow_outside: bool = False) -> list[Subject]:
    """Subjects from a CSV file or a paired folder."""
    source = Path(source)
    if source.is_dir():
        if mri_columns and len(mri_columns) > 1:
            raise InputError(f"{source}: a folder gives one MRI per subject; for {', '.join(mri_columns)} give a "
                             "CSV with those columns")
        return read_folder_manifest(source)
    if not source.exists():
        raise InputError(f"{source}: no such file or folder")
    return read_csv_manifest(source, mri_columns or ["mri"], need_pet=need_pet, allow_outside=allow_outside)
