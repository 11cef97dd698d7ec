"""InvConv1x1x1 state-dict entries as checkpoints written before the single ``lu`` parameter held them."""

from __future__ import annotations

import torch


def separate_factor_entries(lu: torch.Tensor, perm: torch.Tensor) -> dict:
    """What an InvConv1x1x1 state dict held instead of ``lu`` before it existed: ``lower`` (unit
    diagonal), ``upper``, the strict-lower mask, and P as a matrix."""
    c = lu.shape[0]
    return {"lower": torch.tril(lu, -1) + torch.eye(c), "upper": torch.triu(lu, 1),
            "lower_mask": torch.tril(torch.ones(c, c), -1), "perm": torch.eye(c)[perm]}
