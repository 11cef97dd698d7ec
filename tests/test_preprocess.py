"""Preprocessing: the crop box comes from the first MRI contrast alone."""

import numpy as np
import torch
from monai.data import MetaTensor

from medflow.preprocess import stage1


def test_crop_box_follows_the_first_contrast_only():
    t1 = np.zeros((30, 30, 30), np.float32)
    t1[10:20, 8:22, 12:18] = 100.0
    flair = np.full((30, 30, 30), 5000.0, np.float32)
    mri = MetaTensor(torch.from_numpy(np.stack([t1, flair])), affine=torch.eye(4, dtype=torch.float64))
    alone = stage1((1.0, 1.0, 1.0), 0, keys=["mri"], load=False)({"mri": mri[:1].clone()})["mri"]
    both = stage1((1.0, 1.0, 1.0), 0, keys=["mri"], load=False)({"mri": mri})["mri"]
    assert tuple(alone.shape[1:]) == (10, 14, 6)
    assert tuple(both.shape[1:]) == (10, 14, 6)
