"""medflow.optimizer: fused AdamW steps as torch's default AdamW does; a state saved on another kernel resumes on it."""

import copy

import pytest
import torch

from medflow.optimizer import adamw, with_kernel_of


def parameter_pair(seed: int = 0) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """Two identical lists of parameters (a 3D conv's weight and bias, and a vector)."""
    g = torch.Generator().manual_seed(seed)
    values = [torch.randn(8, 4, 1, 1, 1, generator=g), torch.randn(8, generator=g), torch.randn(5, generator=g)]
    return ([torch.nn.Parameter(v.clone()) for v in values], [torch.nn.Parameter(v.clone()) for v in values])


def groups(params: list[torch.nn.Parameter]) -> list[dict]:
    return [{"params": params[:2]}, {"params": params[2:], "lr": 3e-3}]


def step_both(optimizers, params_pair, steps: int, seed: int = 1) -> None:
    """``steps`` AdamW steps of each optimiser on the same seeded gradients."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        grads = [torch.randn(p.shape, generator=g) for p in params_pair[0]]
        for optimizer, params in zip(optimizers, params_pair):
            for p, grad in zip(params, grads):
                p.grad = grad.clone()
            optimizer.step()


def test_the_fused_adamw_steps_as_torchs_default_adamw():
    fused_params, plain_params = parameter_pair()
    fused = adamw(groups(fused_params), lr=1e-3, weight_decay=0.05)
    plain = torch.optim.AdamW(groups(plain_params), lr=1e-3, weight_decay=0.05)
    assert [g["fused"] for g in fused.param_groups] == [True, True]
    step_both((fused, plain), (fused_params, plain_params), steps=6)
    for a, b in zip(fused_params, plain_params):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert all(not torch.isclose(a, b).any() for a, b in zip(fused_params, parameter_pair()[0])), "every value moved"


@pytest.mark.parametrize("saved_kernel", [{}, {"foreach": True}, {"fused": False}])
def test_a_state_saved_on_another_kernel_resumes_on_this_machines_and_continues_alike(saved_kernel):
    saved_params, resumed_params = parameter_pair()
    saving = torch.optim.AdamW(groups(saved_params), lr=1e-3, weight_decay=0.05, **saved_kernel)
    step_both((saving,), (saved_params,), steps=3)
    for a, b in zip(resumed_params, saved_params):
        a.data.copy_(b.data)
    resumed = adamw(groups(resumed_params), lr=1e-3, weight_decay=0.05)
    resumed.load_state_dict(with_kernel_of(copy.deepcopy(saving.state_dict()), resumed))  # as from a file
    assert [(g["fused"], g["foreach"]) for g in resumed.param_groups] == [(True, None)] * 2
    assert [g["lr"] for g in resumed.param_groups] == [1e-3, 3e-3], "everything else is the saved state's"
    step_both((saving, resumed), (saved_params, resumed_params), steps=3, seed=2)
    for a, b in zip(resumed_params, saved_params):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
