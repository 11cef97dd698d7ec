"""Memory-saving backward for chains of invertible steps (as in memcnn, i-RevNet, iUNet).

The forward pass runs without building an autograd graph and keeps only the chain's
output. The backward pass rebuilds each step's input by inverting its output, re-runs
that one step with autograd on and back-propagates through it, so activation memory no
longer grows with the number of steps.
"""

from __future__ import annotations

import torch
from torch import nn


def run_chain(steps: nn.ModuleList, x: torch.Tensor, cond: torch.Tensor | None):
    """Apply ``steps`` in order; returns (y, summed log-det [B])."""
    logdet = x.new_zeros(x.shape[0])
    for step in steps:
        x, ld = step(x, cond)
        logdet = logdet + ld
    return x, logdet


class _RecomputeChain(torch.autograd.Function):
    @staticmethod
    def forward(ctx, steps, cond, x, *params):
        ctx.steps = steps
        with torch.no_grad():
            y, logdet = run_chain(steps, x, cond)
        ctx.save_for_backward(y, cond)
        return y, logdet

    @staticmethod
    def backward(ctx, grad_y, grad_logdet):
        y, cond = ctx.saved_tensors
        steps = ctx.steps
        grad_y = torch.zeros_like(y) if grad_y is None else grad_y
        grad_logdet = y.new_zeros(y.shape[0]) if grad_logdet is None else grad_logdet
        want_cond = cond is not None and ctx.needs_input_grad[1]
        param_grads: dict[int, torch.Tensor] = {}
        grad_cond = None
        y = y.detach()
        for step in reversed(steps):
            with torch.no_grad():
                x = step.inverse(y, cond)
            with torch.enable_grad():
                x = x.detach().requires_grad_(True)
                c = cond.detach().requires_grad_(True) if want_cond else cond
                y_step, ld_step = step(x, c)
                params = [p for p in step.parameters() if p.requires_grad]
                inputs = [x] + params + ([c] if want_cond else [])
                grads = torch.autograd.grad((y_step, ld_step), inputs, (grad_y, grad_logdet), allow_unused=True)
            grad_y = grads[0]
            for p, g in zip(params, grads[1 : 1 + len(params)]):
                if g is not None:
                    param_grads[id(p)] = param_grads[id(p)] + g if id(p) in param_grads else g
            if want_cond and grads[-1] is not None:
                grad_cond = grads[-1] if grad_cond is None else grad_cond + grads[-1]
            y = x.detach()
        all_params = [p for p in steps.parameters()]
        return (None, grad_cond, grad_y, *[param_grads.get(id(p)) for p in all_params])


def chain_forward(steps: nn.ModuleList, x: torch.Tensor, cond: torch.Tensor | None, recompute: bool):
    """Run a chain of invertible steps, with the memory-saving backward when ``recompute``."""
    if not (recompute and torch.is_grad_enabled()):
        return run_chain(steps, x, cond)
    for step in steps:
        for module in step.modules():
            if getattr(module, "needs_initialization", False):
                return run_chain(steps, x, cond)
    return _RecomputeChain.apply(steps, cond, x, *steps.parameters())
