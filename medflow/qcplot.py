"""Quality-control picture: orthogonal mid-slices of MRI, synthetic PET and uncertainty."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _mid_slices(volume: np.ndarray) -> list[np.ndarray]:
    x, y, z = (s // 2 for s in volume.shape)
    return [np.rot90(volume[:, :, z]), np.rot90(volume[:, y, :]), np.rot90(volume[x, :, :])]


def save_qc_png(path: Path, mri: np.ndarray, pet: np.ndarray, std: np.ndarray | None, title: str = "") -> None:
    """Save to ``path`` a PNG with one row per volume (MRI, PET, std if given) and
    axial/coronal/sagittal columns (the caller makes the write atomic).

    Slices are taken in voxel order at the volume centre; all volumes share the input grid.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [("MRI", mri, "gray"), ("synthetic PET", pet, "hot")]
    if std is not None:
        rows.append(("PET std (uncertainty)", std, "viridis"))
    fig, axes = plt.subplots(len(rows), 3, figsize=(9, 3 * len(rows)), squeeze=False)
    for r, (label, volume, cmap) in enumerate(rows):
        vmax = float(np.percentile(volume, 99.5)) or 1.0
        for c, image in enumerate(_mid_slices(volume)):
            ax = axes[r][c]
            ax.imshow(image, cmap=cmap, vmin=0 if label != "MRI" else None, vmax=vmax)
            ax.set_axis_off()
        axes[r][0].set_title(label, loc="left", fontsize=10)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80, format="png")
    plt.close(fig)
