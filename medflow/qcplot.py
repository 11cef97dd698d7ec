"""Quality-control picture: orthogonal mid-slices of MRI, synthetic PET and uncertainty."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _mid_slices(volume: np.ndarray, zooms: np.ndarray) -> list[tuple[np.ndarray, float]]:
    """Axial, coronal and sagittal mid-slices of a RAS volume, each with its pixels' height over
    width in mm (anterior, then superior, at the top)."""
    x, y, z = (s // 2 for s in volume.shape)
    zx, zy, zz = (float(v) for v in zooms)
    return [(np.rot90(volume[:, :, z]), zy / zx), (np.rot90(volume[:, y, :]), zz / zx),
            (np.rot90(volume[x, :, :]), zz / zy)]


def qc_figure(affine: np.ndarray, mri: np.ndarray, pet: np.ndarray, std: np.ndarray | None, title: str = ""):
    """A matplotlib figure with one row per volume (MRI, PET, std if given) and axial, coronal and
    sagittal columns: the volumes, on one grid with this voxel-to-world ``affine``, are turned to
    RAS first and shown with their voxels' true proportions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import nibabel as nib

    ornt = nib.orientations.io_orientation(affine)
    zooms = np.empty(3)
    zooms[ornt[:, 0].astype(int)] = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(0))
    rows = [("MRI", mri, "gray"), ("synthetic PET", pet, "hot")]
    if std is not None:
        rows.append(("PET std (uncertainty)", std, "viridis"))
    fig, axes = plt.subplots(len(rows), 3, figsize=(9, 3 * len(rows)), squeeze=False)
    for r, (label, volume, cmap) in enumerate(rows):
        vmax = float(np.percentile(volume, 99.5)) or 1.0
        for c, (image, aspect) in enumerate(_mid_slices(nib.orientations.apply_orientation(volume, ornt), zooms)):
            ax = axes[r][c]
            ax.imshow(image, cmap=cmap, vmin=0 if label != "MRI" else None, vmax=vmax, aspect=aspect)
            ax.set_axis_off()
        axes[r][0].set_title(label, loc="left", fontsize=10)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def save_qc_png(path: Path, affine: np.ndarray, mri: np.ndarray, pet: np.ndarray, std: np.ndarray | None,
                title: str = "") -> None:
    """Save ``qc_figure`` to ``path`` as a PNG (the caller makes the write atomic)."""
    fig = qc_figure(affine, mri, pet, std, title)
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=80, format="png")
    plt.close(fig)
