"""Identity maps that rescale the gradient passing backward through them."""

from __future__ import annotations

import torch


class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def scale_gradient(x: torch.Tensor, factor: float | torch.Tensor) -> torch.Tensor:
    """``x`` unchanged; in the backward pass its gradient is multiplied by ``factor`` (a number,
    or a tensor broadcast to x's shape and held constant: no gradient flows into it)."""
    return _ScaleGradient.apply(x, factor.detach() if isinstance(factor, torch.Tensor) else factor)
