"""Small paired MRI/PET NIfTI studies for pipeline tests: mixed orientations and voxel sizes."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

ORIENTATIONS = {
    "RAS": np.diag([1.0, 1.0, 1.0]),
    "LPS": np.diag([-1.0, -1.0, 1.0]),
    "LAS": np.diag([-1.0, 1.0, 1.0]),
}


def phantom(shape, rng) -> tuple[np.ndarray, np.ndarray]:
    """A blobby 'head' MRI (arbitrary units) and a PET that depends on it nonlinearly, [X, Y, Z]."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    radius = np.sqrt((grid ** 2).sum(0))
    head = (radius < 0.8).astype(np.float32)
    texture = ndimage.gaussian_filter(rng.standard_normal(shape), 1.5)
    mri = head * (400 + 300 * np.tanh(3 * texture)) + rng.normal(0, 5, shape)
    pet = head * np.clip(1.0 + 1.5 * np.tanh(3 * texture) ** 2 + 0.05 * rng.standard_normal(shape), 0, None)
    return np.clip(mri, 0, None).astype(np.float32), pet.astype(np.float32)


def write_study(folder: Path, name: str, orientation: str, zooms, shape, rng) -> tuple[Path, Path]:
    mri, pet = phantom(shape, rng)
    affine = np.eye(4)
    affine[:3, :3] = ORIENTATIONS[orientation] @ np.diag(zooms)
    affine[:3, 3] = -np.asarray(shape) * np.asarray(zooms) / 2 * np.diag(ORIENTATIONS[orientation])
    paths = folder / f"{name}_t1.nii.gz", folder / f"{name}_pet.nii.gz"
    nib.save(nib.Nifti1Image(mri, affine), paths[0])
    nib.save(nib.Nifti1Image(pet, affine), paths[1])
    return paths


def write_paired_csv(folder: Path, n: int = 6, seed: int = 0) -> Path:
    """n studies with mixed orientations (RAS/LPS/LAS) and voxel sizes; returns the CSV path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    layouts = [("RAS", (4.0, 4.0, 4.0), (20, 22, 18)), ("LPS", (3.0, 3.0, 5.0), (26, 28, 15)),
               ("LAS", (5.0, 4.5, 4.0), (16, 20, 18))]
    for i in range(n):
        orientation, zooms, shape = layouts[i % len(layouts)]
        mri, pet = write_study(folder, f"sub-{i:02d}", orientation, zooms, shape, rng)
        rows.append({"subject": f"sub-{i:02d}", "mri": mri.name, "pet": pet.name})
    path = folder / "pairs.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, ["subject", "mri", "pet"])
        writer.writeheader()
        writer.writerows(rows)
    return path
