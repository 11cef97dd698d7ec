"""Oracle tests of the invertible blocks: exact inverses and brute-force log-determinants."""

import copy
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.autograd.functional import jacobian

from medflow.errors import ModelError
from medflow.flows import (
    ActNorm, AffineCoupling, ConditionalAffine, CovariateScale, FlowStep, Glow3d, GlowLevel, HaarDownsample3d,
    InvConv1x1x1, Squeeze3d,
)
from medflow.flows.conv import Conv3d
from medflow.flows.injector import RecomputedUnit, onednn_convolutions, per_channel_norms
from medflow.flows.norm import PerChannelNorm
from tests.old_invconv_layout import separate_factor_entries

SHAPE = (1, 2, 4, 4, 4)


def perturb(module, scale=0.2, seed=0):
    """Move every parameter off its (often zero) initial value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def blocks(channels=2, cond_channels=3):
    """name: (module, condition) where condition is None, a channel count (a spatial condition
    [B, channels, D, H, W]) or ("vector", S) (a side vector [B, S])."""
    return {
        "actnorm": (ActNorm(channels), None),
        "invconv": (InvConv1x1x1(channels), None),
        "coupling": (AffineCoupling(channels, 8), None),
        "coupling_cond": (AffineCoupling(channels, 8, cond_channels), cond_channels),
        "squeeze": (Squeeze3d(), None),
        "haar": (HaarDownsample3d(), None),
        "flowstep_cond": (FlowStep(channels, 8, cond_channels), cond_channels),
        "level": (GlowLevel(channels, 2, 8, "haar", 2.0, 0), None),
        "injector": (ConditionalAffine(channels, cond_channels, 8), cond_channels),
        "covariate_scale": (CovariateScale(channels, cond_channels, 3), ("vector", cond_channels)),
        "covariate_scale_some": (CovariateScale(channels, cond_channels, 3, mapped=[0, 2]), ("vector", cond_channels)),
        "covariate_scale_origin": (CovariateScale(channels, cond_channels, 3, origin=-0.5), ("vector", cond_channels)),
        "covariate_scale_static": (CovariateScale(channels, cond_channels, 3, mapped=[1], origin=-0.5, static=True),
                                   ("vector", cond_channels)),
        "uptake_map": (CovariateScale(channels, 0, 3, origin=-0.5, static=True), None),
    }


def make_cond(spec, batch, spatial, dtype=torch.float32):
    if spec is None:
        return None
    if isinstance(spec, tuple):
        return torch.randn(batch, spec[1], dtype=dtype)
    return torch.randn(batch, spec, *spatial, dtype=dtype)


def run_init(module, x, cond):
    module.train()
    module(x, cond)
    module.eval()


@pytest.mark.parametrize("name", list(blocks()))
def test_block_logdet_matches_brute_force_jacobian(name):
    torch.manual_seed(0)
    module, cc = blocks()[name]
    module = module.double()
    x = torch.randn(SHAPE, dtype=torch.float64)
    cond = make_cond(cc, 1, SHAPE[2:], torch.float64)
    run_init(module, x, cond)
    perturb(module)

    def f(flat):
        return module(flat.view(SHAPE), cond)[0].flatten()

    jac = jacobian(f, x.flatten())
    _, expected = torch.linalg.slogdet(jac)
    _, logdet = module(x, cond)
    assert logdet.shape == (1,)
    assert abs(logdet.item() - expected.item()) < 1e-6


@pytest.mark.parametrize("name", list(blocks()))
def test_block_round_trip_at_init_and_after_training(name):
    torch.manual_seed(1)
    module, cc = blocks(channels=4)[name]
    x = torch.randn(2, 4, 8, 8, 8)
    cond = make_cond(cc, 2, (8, 8, 8))
    run_init(module, x, cond)
    y, _ = module(x, cond)
    assert (module.inverse(y, cond) - x).abs().max() < 1e-4
    params = list(module.parameters())
    if params:
        module.train()
        opt = torch.optim.Adam(params, lr=5e-2)
        for _ in range(5):
            y, ld = module(x, cond)
            loss = (0.5 * y.pow(2).sum() - ld.sum()) / x.numel()
            opt.zero_grad()
            loss.backward()
            opt.step()
        module.eval()
        assert any(p.abs().sum() > 0 for p in params)
    y, _ = module(x, cond)
    assert (module.inverse(y, cond) - x).abs().max() < 1e-4


@pytest.mark.parametrize("module", ["coupling", "flow step"])
def test_rebuild_from_the_output_gives_the_input_and_autograds_gradients(module):
    """``recompute.rebuild`` (the memory-saving backward's step), part by part: the input from the
    output, and gradients of a loss on (y, log-det) for the input, the parameters and the condition
    equal to autograd's through the forward pass; the coupling's ``rebuild`` runs its subnet once."""
    from medflow.flows.recompute import rebuild

    torch.manual_seed(0)
    block = perturb(AffineCoupling(4, 8, cond_channels=3) if module == "coupling" else FlowStep(4, 8, 3))
    block.train()(torch.randn(2, 4, 4, 4, 4), torch.randn(2, 3, 4, 4, 4))  # ActNorm's initialisation
    x, cond = torch.randn(2, 4, 4, 4, 4, requires_grad=True), torch.randn(2, 3, 4, 4, 4, requires_grad=True)
    params = list(block.parameters())
    y, logdet = block(x, cond)
    grad_y, grad_logdet = torch.randn_like(y), torch.randn_like(logdet)
    expected = torch.autograd.grad((y, logdet), [x, cond] + params, (grad_y, grad_logdet))
    subnet_calls = []
    (block if module == "coupling" else block.coupling).net.register_forward_hook(lambda *a: subnet_calls.append(1))
    c = cond.detach().requires_grad_(True)
    out, grad_cond, grad_params = y.detach(), torch.zeros_like(cond), {id(q): torch.zeros_like(q) for q in params}
    for part in reversed(getattr(block, "parts", (block,))):
        out, leaves, y_part, ld_part = rebuild(part, out, c)
        part_params = list(part.parameters())
        got = torch.autograd.grad((y_part, ld_part), leaves + [c] + part_params, (grad_y, grad_logdet),
                                  allow_unused=True)
        grad_y = torch.cat(got[:len(leaves)], dim=1)
        grad_cond += got[len(leaves)] if got[len(leaves)] is not None else 0
        for q, g in zip(part_params, got[len(leaves) + 1:]):
            grad_params[id(q)] += g
    assert len(subnet_calls) == 1
    assert torch.allclose(out, x, atol=1e-5)
    assert torch.allclose(grad_y, expected[0], atol=1e-5)
    assert torch.allclose(grad_cond, expected[1], atol=1e-5)
    for q, g in zip(params, expected[2:]):
        assert torch.allclose(grad_params[id(q)], g, atol=1e-5)


def test_actnorm_initialises_once_and_survives_state_dict():
    torch.manual_seed(0)
    norm = ActNorm(3)
    x = 5.0 + 2.0 * torch.randn(4, 3, 4, 4, 4)
    y, _ = norm(x)
    assert y.mean().abs() < 1e-4 and (y.std(unbiased=False) - 1).abs() < 1e-3
    loaded = ActNorm(3)
    loaded.load_state_dict(norm.state_dict())
    loaded.train()
    y2, _ = loaded(torch.randn(4, 3, 4, 4, 4))
    assert torch.equal(loaded.bias, norm.bias) and bool(loaded.initialized)


def test_actnorm_constant_channel_stays_finite():
    norm = ActNorm(2)
    x = torch.zeros(2, 2, 4, 4, 4)
    x[:, 1] = torch.randn(2, 4, 4, 4)
    y, ld = norm(x)
    assert torch.isfinite(y).all() and torch.isfinite(ld).all()


def test_invconv_caches_inverse_in_eval_and_refreshes_after_update():
    conv = InvConv1x1x1(4).eval()
    first = conv.inverse_weight()
    assert conv.inverse_weight() is first
    with torch.no_grad():
        conv.log_s.add_(0.1)
    assert not torch.equal(conv.inverse_weight(), first)


def test_invconv_applies_factors_when_fewer_voxels_than_channels():
    torch.manual_seed(0)
    conv = perturb(InvConv1x1x1(8).double())
    x = torch.randn(1, 8, 1, 1, 2, dtype=torch.float64)
    y, logdet = conv(x)
    expected = torch.einsum("oc,bcdhw->bodhw", conv.weight(), x)
    assert torch.allclose(y, expected, atol=1e-12)
    jac = jacobian(lambda flat: conv(flat.view(x.shape))[0].flatten(), x.flatten())
    assert torch.allclose(logdet, torch.linalg.slogdet(jac)[1], atol=1e-9)
    assert torch.allclose(conv.inverse(y), x, atol=1e-12)


def test_invconv_loads_checkpoints_with_separate_lower_and_upper_factors():
    torch.manual_seed(0)
    conv = perturb(InvConv1x1x1(5))
    old = {**separate_factor_entries(conv.lu.detach(), conv.perm), "sign_s": conv.sign_s, "log_s": conv.log_s.detach()}
    lower = old["lower"] + torch.triu(torch.ones(5, 5), 1)  # masked entries never count
    upper = old["upper"] + torch.tril(torch.ones(5, 5))
    old.update(lower=lower, upper=upper)
    old_weight = old["perm"] @ (lower * old["lower_mask"] + torch.eye(5)) @ (
        upper * old["lower_mask"].T + torch.diag(conv.sign_s * conv.log_s.detach().exp()))
    loaded = InvConv1x1x1(5)
    loaded.load_state_dict(old)
    assert torch.allclose(loaded.weight(), old_weight, atol=1e-6)
    assert torch.allclose(loaded.weight(), conv.weight(), atol=1e-6)


def test_haar_is_orthonormal_and_splits_mean_from_detail():
    x = torch.ones(1, 1, 4, 4, 4)
    y, _ = HaarDownsample3d()(x)
    assert torch.allclose(y[:, 0], torch.full_like(y[:, 0], 8 ** 0.5))
    assert y[:, 1:].abs().max() < 1e-6
    assert torch.allclose(y.pow(2).sum(), x.pow(2).sum())


def tiny_glow(cond=False, squeeze="reshape", dtype=torch.float32):
    glow = Glow3d(1, [2, 2], 8, squeeze=squeeze, coupling_cond_channels=[3, 3] if cond else None,
                  prior_cond_channels=[2, 2], prior_hidden=4)
    return glow.to(dtype)


@pytest.mark.parametrize("squeeze", ["reshape", "haar"])
def test_glow_logdet_matches_brute_force_jacobian(squeeze):
    torch.manual_seed(2)
    glow = tiny_glow(cond=True, squeeze=squeeze, dtype=torch.float64)
    x = torch.randn(1, 1, 4, 4, 4, dtype=torch.float64)
    cond = [torch.randn(1, 3, 2, 2, 2, dtype=torch.float64), torch.randn(1, 3, 1, 1, 1, dtype=torch.float64)]
    glow.train()
    glow(x, cond)
    glow.eval()
    perturb(glow)

    def f(flat):
        zs, _ = glow(flat.view(1, 1, 4, 4, 4), cond)
        return torch.cat([z.flatten() for z in zs])

    _, expected = torch.linalg.slogdet(jacobian(f, x.flatten()))
    _, logdet = glow(x, cond)
    assert abs(logdet.item() - expected.item()) < 1e-6
    assert (glow.inverse(glow(x, cond)[0], cond) - x).abs().max() < 1e-8


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_glow_sampling_round_trip_recovers_the_prior_noise(temperature):
    """Encoding a sample gives back, at every level, mu + T sigma eps of that level's prior (at the
    half the encoding kept) with the generator's own eps, drawn top level first; T = 0 gives mu."""
    torch.manual_seed(3)
    glow = perturb(tiny_glow(cond=True, dtype=torch.float64), scale=0.05)
    glow.eval()
    prior_cond = [torch.randn(2, 2, 4, 4, 4, dtype=torch.float64), torch.randn(2, 2, 2, 2, 2, dtype=torch.float64)]
    coupling_cond = [torch.randn(2, 3, 4, 4, 4, dtype=torch.float64), torch.randn(2, 3, 2, 2, 2, dtype=torch.float64)]
    x = glow.sample(2, (8, 8, 8), temperature, coupling_cond, prior_cond, torch.Generator().manual_seed(5))
    assert x.shape == (2, 1, 8, 8, 8)
    shapes = glow.latent_shapes(2, (8, 8, 8))
    g = torch.Generator().manual_seed(5)
    eps = {i: torch.randn(shapes[i], generator=g, dtype=torch.float64) for i in reversed(range(glow.num_levels))}
    enc = glow.encode(x, coupling_cond)
    assert [tuple(z.shape) for z in enc.zs] == shapes
    for i, prior in enumerate(glow.priors):
        mean, log_sigma = prior.params(glow._prior_cond(i, enc.kept[i], prior_cond), shapes[i], x.device)
        assert log_sigma.abs().max() > 0.01
        torch.testing.assert_close(enc.zs[i], mean + temperature * torch.exp(log_sigma) * eps[i], rtol=1e-8, atol=1e-8)


def test_odd_spatial_size_is_a_clear_error():
    with pytest.raises(ValueError, match="divisible by 2"):
        tiny_glow()(torch.randn(1, 1, 6, 8, 8))


@pytest.mark.parametrize("net, size, hidden, kept", [("conv", 6, 16, 0.5), ("unet", 32, 4, 0.6)])
def test_injector_recompute_keeps_fewer_bytes_for_backward_and_gives_the_same_gradients(net, size, hidden, kept):
    """With ``set_recompute(True)`` the injector net's hidden activations are not saved for backward
    (counted through saved-tensor hooks; the U-Net keeps each unit's input) and are rebuilt instead."""
    torch.manual_seed(0)
    injector = ConditionalAffine(1, 2, hidden, net=net)
    perturb(injector)
    x, cond = torch.randn(2, 1, size, size, size), torch.randn(2, 2, size, size, size)
    saved, grads = {}, {}
    for recompute in (False, True):
        injector.set_recompute(recompute)
        injector.zero_grad()
        sizes = []

        def pack(t, sizes=sizes):
            sizes.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y, logdet = injector(x, cond)
        (y.square().sum() + logdet.sum()).backward()
        saved[recompute] = sum(sizes)
        grads[recompute] = [p.grad.clone() for p in injector.parameters()]
    assert saved[True] < kept * saved[False]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads[False], grads[True]))


def test_unet_injector_units_keep_monai_keys_and_follow_set_recompute():
    """Every conv-norm-activation unit of the U-Net injector recomputes (or not) with
    ``set_recompute``, and the state-dict keys are MONAI's own, so older checkpoints load."""
    from monai.networks.nets import BasicUNet

    injector = ConditionalAffine(1, 2, 4, net="unet")
    units = [m for m in injector.net.modules() if isinstance(m, RecomputedUnit)]
    assert len(units) == 18 and not any(u.recompute for u in units)
    injector.set_recompute(True)
    assert all(u.recompute for u in units)
    injector.set_recompute(False)
    assert not any(u.recompute for u in units)
    monai_keys = BasicUNet(3, 2, 2, features=(4, 4, 8, 16, 32, 4)).state_dict().keys()
    assert list(injector.net.state_dict().keys()) == list(monai_keys)


PEAK_SCRIPT = """
import torch
from medflow.flows.injector import ConditionalAffine
from medflow.measure import memory_now_mib, peak_memory_mib, reset_peak_memory

cpu = torch.device("cpu")
spike = torch.ones(64 * 2**20 // 4)
del spike
base = memory_now_mib(cpu)
reset_peak_memory(cpu)
if peak_memory_mib(cpu) - base > 32:
    print("no-reset")
    raise SystemExit
torch.manual_seed(0)
injector = ConditionalAffine(1, 1, 8, net="unet")
x, cond = torch.randn(1, 1, 64, 64, 64), torch.randn(1, 1, 64, 64, 64)

def step():
    injector.zero_grad(set_to_none=False)
    y, logdet = injector(x, cond)
    (y.square().sum() + logdet.sum()).backward()

peaks = {}
for recompute in (False, True) * 2:
    injector.set_recompute(recompute)
    step()
    base = memory_now_mib(cpu)
    reset_peak_memory(cpu)
    step()
    peaks[recompute] = peak_memory_mib(cpu) - base
print(peaks[False], peaks[True])
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists() or platform.libc_ver()[0] != "glibc",
                    reason="needs Linux's resettable VmHWM and glibc's MALLOC_MMAP_THRESHOLD_")
def test_unet_injector_recompute_lowers_the_backward_peak():
    """The peak resident memory of a U-Net injector's forward and backward (64^3 voxels, width 8, a
    fresh process whose allocations above 64 KiB are each mapped and unmapped, so the resident set
    follows the live tensors): recomputing the net unit by unit (``set_recompute``) stays below
    plain autograd (109 against 131 MiB when written). One checkpoint around the whole net, as
    medflow had before, recomputed every activation at once in the backward and peaked as high
    as plain autograd (151 MiB for both, 113 unit by unit, measured on the net's output alone)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT], env=env, capture_output=True, text=True, check=True)
    if out.stdout.strip() == "no-reset":
        pytest.skip("this system does not reset the resident-memory high-water mark")
    plain, units = map(float, out.stdout.split())
    assert units < 0.9 * plain


def test_unet_injector_starts_as_a_shift_whose_whole_net_learns_then_inverts_with_its_jacobian_log_det():
    """The U-Net injector on a 32^3 grid, float64. At init log_s is zero (no log-det) and mu a
    non-constant function of the condition whose first layer already has a gradient; y = x - mu.
    Its Jacobian in x is diagonal (mu and log_s come from the condition alone), so the gradient of
    sum(y) is that diagonal: the oracle of the log-det."""
    torch.manual_seed(0)
    injector = ConditionalAffine(1, 2, 4, net="unet").double()
    x = torch.randn(2, 1, 32, 32, 32, dtype=torch.float64, requires_grad=True)
    cond = torch.randn(2, 2, 32, 32, 32, dtype=torch.float64)
    mu, log_s = injector.params(cond)
    assert torch.equal(log_s, torch.zeros_like(log_s)) and mu.std() > 0
    y, logdet = injector(x, cond)
    assert torch.equal(y, x - mu) and torch.equal(logdet, torch.zeros(2, dtype=torch.float64))
    (y.square().sum()).backward()
    first = next(p for p in injector.net.parameters() if p.dim() == 5)
    assert first.grad is not None and first.grad.abs().max() > 0
    perturb(injector, scale=0.05)
    y, logdet = injector(x, cond)
    diagonal, = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(logdet, diagonal.abs().log().flatten(1).sum(1), rtol=0, atol=1e-8)
    mu, log_s = injector.params(cond)
    assert mu.std() > 0 and log_s.std() > 0
    torch.testing.assert_close(injector.inverse(y.detach(), cond), x.detach(), rtol=0, atol=1e-10)


@pytest.mark.parametrize("beta", [0.5, 1.0])
def test_injector_mean_beta_scales_only_the_gradient_of_mu(beta):
    """Oracle: the Gaussian NLL of y = (x - mu) / sigma by autograd, float64. With ``mean_beta``
    the values, the log-det and the gradients of x and log_s are the same, the gradient of mu is
    sigma^(2 beta) times the likelihood's: -(x - mu) / sigma^(2 - 2 beta), the squared error's at beta = 1."""
    torch.manual_seed(0)
    x, mu, log_s = (torch.randn(2, 1, 3, 4, 5, dtype=torch.float64) for _ in range(3))

    def run(b):
        leaves = [t.clone().requires_grad_() for t in (x, mu, log_s)]
        y, logdet = ConditionalAffine.forward_from(*leaves, mean_beta=b)
        (0.5 * y.square().sum() - logdet.sum()).backward()
        return y, logdet, [t.grad for t in leaves]

    y0, logdet0, (gx0, gmu0, gs0) = run(0.0)
    y, logdet, (gx, gmu, gs) = run(beta)
    assert torch.equal(y, y0) and torch.equal(logdet, logdet0)
    torch.testing.assert_close(gx, gx0, rtol=0, atol=0)
    torch.testing.assert_close(gs, gs0, rtol=0, atol=0)
    torch.testing.assert_close(gmu0, -(x - mu) * torch.exp(-2 * log_s), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gmu, -(x - mu) * torch.exp((2 * beta - 2) * log_s), rtol=1e-12, atol=1e-12)


def test_injector_mean_beta_changes_training_steps_not_the_model():
    """Two injectors with the same weights, mean_beta 0 and 0.5: the same output, log-det and
    inverse; the mean's gradient differs, so the net's parameter gradients do."""
    torch.manual_seed(0)
    plain = perturb(ConditionalAffine(1, 2, 8), scale=0.3)
    weighted = copy.deepcopy(plain)
    weighted.mean_beta = 0.5
    x, cond = torch.randn(1, 1, 6, 6, 6), torch.randn(1, 2, 6, 6, 6)
    outputs = []
    for injector in (plain, weighted):
        y, logdet = injector(x, cond)
        (0.5 * y.square().sum() - logdet.sum()).backward()
        outputs.append((y, logdet))
    assert torch.equal(outputs[0][0], outputs[1][0]) and torch.equal(outputs[0][1], outputs[1][1])
    torch.testing.assert_close(weighted.inverse(outputs[1][0].detach(), cond), x, rtol=0, atol=1e-5)
    first = plain.net[0].weight.grad
    assert not torch.allclose(first, weighted.net[0].weight.grad, rtol=1e-3, atol=0)


def test_per_channel_norms_are_monais_instance_norm_unet_in_both_layouts():
    """Oracle: MONAI's BasicUNet with its instance norms, float64, a batch of 2. The converted copy
    has the same state-dict keys, loads the original's weights and gives the same output, also
    with the input and weights channels-last (the CPU layout of ``device.place_model``)."""
    from monai.networks.nets import BasicUNet

    torch.manual_seed(0)
    original = perturb(BasicUNet(3, 2, 2, features=(4, 4, 8, 8, 16, 4)).double(), scale=0.05)
    converted = per_channel_norms(copy.deepcopy(original))
    assert not any(isinstance(m, torch.nn.InstanceNorm3d) for m in converted.modules())
    assert sum(isinstance(m, PerChannelNorm) for m in converted.modules()) == 18
    assert converted.state_dict().keys() == original.state_dict().keys()
    converted.load_state_dict(original.state_dict())
    x = torch.randn(2, 2, 32, 32, 32, dtype=torch.float64)
    expected = original(x)
    torch.testing.assert_close(converted(x), expected, rtol=0, atol=1e-10)
    channels_last = converted.to(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(channels_last(x.to(memory_format=torch.channels_last_3d)), expected, rtol=0, atol=1e-10)
    one = x[:1].to(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(channels_last(one), original(x[:1]), rtol=0, atol=1e-10)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("affine", [True, False])
def test_per_channel_norm_as_batch_norm_is_instance_norm_with_its_gradients(dtype, tolerance, affine):
    """Oracle: ``torch.nn.InstanceNorm3d`` on a contiguous copy. A batch-1 channels-last volume
    (the route through batch norm) gives its output and gradients for input, weight and bias."""
    torch.manual_seed(0)
    reference = torch.nn.InstanceNorm3d(6, affine=affine, dtype=dtype)
    if affine:
        perturb(reference, scale=0.5)
    ours = PerChannelNorm(6, affine=affine, dtype=dtype)
    ours.load_state_dict(reference.state_dict())
    x = (3.0 + 2.0 * torch.randn(1, 6, 10, 12, 8, dtype=dtype)).to(memory_format=torch.channels_last_3d)
    assert ours._runs_as_batch_norm(x) and not ours._runs_as_batch_norm(x.contiguous())
    x_ours, x_ref = x.clone().requires_grad_(), x.contiguous().requires_grad_()
    y, y_ref = ours(x_ours), reference(x_ref)
    grad = torch.randn_like(y_ref)
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=tolerance)
    torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=0, atol=tolerance)
    for p, p_ref in zip(ours.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=0, atol=tolerance * 100)


def test_onednn_convolutions_are_monais_unet_with_its_gradients():
    """Oracle: MONAI's BasicUNet with torch's convolutions, float32, batch 1, channels-last (the
    case ``Conv3d`` takes to oneDNN): same state-dict keys, output and gradients to float32
    rounding, and the coarse levels' convolutions do run on oneDNN."""
    from monai.networks.nets import BasicUNet

    torch.manual_seed(0)
    original = perturb(BasicUNet(3, 1, 1, features=(4, 4, 8, 16, 32, 4)), scale=0.05)
    original = original.to(memory_format=torch.channels_last_3d)
    converted = onednn_convolutions(copy.deepcopy(original))
    convs = [m for m in converted.modules() if isinstance(m, torch.nn.Conv3d)]
    assert len(convs) == 19 and all(isinstance(m, Conv3d) for m in convs)
    assert converted.state_dict().keys() == original.state_dict().keys()
    on_onednn = []
    for conv in convs:
        conv.register_forward_pre_hook(lambda m, args: on_onednn.append(m._runs_on_onednn(args[0])))
    x = torch.randn(1, 1, 32, 40, 32).to(memory_format=torch.channels_last_3d)
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, y_ref = converted(x_ours), original(x_ref)
    assert 0 < sum(on_onednn) < len(convs)
    grad = torch.randn_like(y_ref)
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=1e-4, atol=1e-5)
    scale = max(p.grad.abs().max() for p in original.parameters())  # biases before a norm get ~0
    for (name, p), p_ref in zip(converted.named_parameters(), original.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=0, atol=1e-5 * scale, msg=name)


def test_unet_injector_runs_per_channel_norms_and_medflow_convolutions():
    net = ConditionalAffine(1, 1, 4, net="unet").net
    assert not any(isinstance(m, torch.nn.InstanceNorm3d) for m in net.modules())
    norms = [m for m in net.modules() if isinstance(m, PerChannelNorm)]
    assert len(norms) == 18 and all(m.num_groups == m.num_channels for m in norms)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv3d)]
    assert len(convs) == 19 and all(isinstance(m, Conv3d) for m in convs)


def test_per_channel_norms_refuse_running_statistics():
    with pytest.raises(ModelError, match="running statistics"):
        per_channel_norms(torch.nn.Sequential(torch.nn.InstanceNorm3d(4, track_running_stats=True)))


def test_unet_injector_refuses_a_grid_below_its_minimum():
    with pytest.raises(ModelError, match="at least 32 voxels per axis, got a 32x16x32 grid"):
        ConditionalAffine(1, 1, 4, net="unet")(torch.randn(1, 1, 32, 16, 32), torch.randn(1, 1, 32, 16, 32))
