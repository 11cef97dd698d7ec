"""Memory-saving backward for chains of invertible steps (as in memcnn, i-RevNet, iUNet).

The forward pass runs without building an autograd graph and keeps only the chain's
output. The backward pass rebuilds each step's input by inverting its output, re-runs
that one step with autograd on and back-propagates through it, so activation memory no
longer grows with the number of steps. A step with ``parts`` (``FlowStep``: actnorm, 1x1x1
conv, coupling) is rebuilt part by part, and a part with a ``rebuild`` method (the affine
coupling) rebuilds its input and its forward pass from one subnet evaluation instead of one
for the inverse and one for the forward.
"""

from __future__ import annotations

import torch
from torch import nn


def run_chain(steps, x: torch.Tensor, cond: torch.Tensor | None):
    """Apply ``steps`` (invertible modules) in order; returns (y, summed log-det [B])."""
    logdet = x.new_zeros(x.shape[0])
    for step in steps:
        x, ld = step(x, cond)
        logdet = logdet + ld
    return x, logdet


def rebuild(module: nn.Module, y: torch.Tensor, cond: torch.Tensor | None):
    """``module``'s input x from its output y, and its forward pass from x with autograd on:
    ``(x, leaves, y_again, logdet)``, x detached, ``leaves`` tensors that require grad and whose
    concatenation over channels is x, ``y_again`` and ``logdet`` [B] functions of the leaves, the
    module's parameters and ``cond``. Uses ``module.rebuild`` where there is one."""
    if hasattr(module, "rebuild"):
        return module.rebuild(y, cond)
    with torch.no_grad():
        x = module.inverse(y, cond)
    leaf = x.detach().requires_grad_(True)
    y_again, logdet = module(leaf, cond)
    return leaf.detach(), [leaf], y_again, logdet


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
        parts = [part for step in steps for part in getattr(step, "parts", (step,))]
        for part in reversed(parts):
            with torch.enable_grad():
                c = cond.detach().requires_grad_(True) if want_cond else cond
                x, leaves, y_part, ld_part = rebuild(part, y, c)
                params = [p for p in part.parameters() if p.requires_grad]
                inputs = leaves + params + ([c] if want_cond else [])
                grads = torch.autograd.grad((y_part, ld_part), inputs, (grad_y, grad_logdet), allow_unused=True)
            n = len(leaves)
            grad_y = torch.cat(grads[:n], dim=1) if n > 1 else grads[0]
            for p, g in zip(params, grads[n : n + len(params)]):
                if g is not None:
                    param_grads[id(p)] = param_grads[id(p)] + g if id(p) in param_grads else g
            if want_cond and grads[-1] is not None:
                grad_cond = grads[-1] if grad_cond is None else grad_cond + grads[-1]
            y = x
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
