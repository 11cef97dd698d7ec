"""Dual-Glow model tests: round trips, memory-saving backward, the condition is used, presets."""

import copy
import re

import pytest
import torch

from medflow import DualGlow
from medflow.flows import AffineCoupling, ConditionalAffine
from medflow.flows.glow import Encoding
from medflow.flows.injector import RecomputedUnit
from medflow.model import DualGlowConfig, bits_per_voxel
from medflow.presets import available_presets, load_preset
from tests.test_flows import perturb


def paired_batch(n, size=8, seed=0):
    """Smooth random 'MRI' and a PET that is a nonlinear function of it plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    mri = torch.randn(n, 1, size // 2, size // 2, size // 2, generator=g)
    mri = torch.nn.functional.interpolate(mri, size=(size,) * 3, mode="trilinear", align_corners=False)
    pet = 0.4 * torch.tanh(2.0 * mri) + 0.02 * torch.randn(mri.shape, generator=g)
    return mri * 0.3, pet


def trained_tiny(steps=4, **overrides):
    torch.manual_seed(0)
    model = DualGlow.from_preset("tiny", **overrides)
    mri, pet = paired_batch(4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss, _ = model.loss(pet, mri)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), mri, pet


def test_both_flows_round_trip_after_training():
    model, mri, pet = trained_tiny()
    zs, _ = model.mri_flow(mri)
    assert (model.mri_flow.inverse(zs) - mri).abs().max() < 1e-4
    enc = model.mri_flow.encode(mri)
    zs, _ = model.pet_flow(pet, enc.features)
    assert (model.pet_flow.inverse(zs, enc.features) - pet).abs().max() < 1e-4


def test_condition_encoder_feeds_every_level_and_keeps_round_trip():
    model, mri, pet = trained_tiny(condition_width=6)
    enc = model.mri_flow.encode(mri)
    coupling, prior, _ = model._pet_conditions(mri, enc)
    assert [c.shape[1] for c in coupling] == [f + 6 for f in model.mri_flow.feature_channels]
    zs, _ = model.pet_flow(pet, coupling)
    assert (model.pet_flow.inverse(zs, coupling) - pet).abs().max() < 1e-4
    loss, _ = model.train().loss(pet, mri)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.parameters())


@pytest.mark.parametrize("normalize", [False, True])
def test_normalized_condition_ignores_the_scale_of_mri_latents(normalize):
    """With ``normalize_condition`` the PET flow sees the same conditions when every MRI latent and
    feature is multiplied by a positive factor per sample (so the PET loss cannot reward inflating
    them); without it (configs written before the option) it does not."""
    model, mri, _ = trained_tiny(normalize_condition=normalize)
    enc = model.mri_flow.encode(mri)
    factor = torch.tensor([3.0, 0.2, 7.0, 1.5])[:, None, None, None, None]
    scaled = Encoding([z * factor for z in enc.zs], enc.kept, [f * factor for f in enc.features], enc.logdet)
    (coupling, prior, _), (coupling2, prior2, _) = model._pet_conditions(mri, enc), model._pet_conditions(mri, scaled)
    same = all(torch.allclose(a, b, atol=1e-5) for a, b in zip(coupling + prior, coupling2 + prior2))
    assert same == normalize
    assert DualGlow.from_preset("tiny").config.normalize_condition
    assert not DualGlowConfig.from_dict({}).normalize_condition


@pytest.mark.parametrize("width", [0, 6])
def test_injector_round_trip_and_log_prob(width):
    model, mri, pet = trained_tiny(injector_width=8, condition_width=width, uptake_map=False)  # the injector alone
    perturb(model, scale=0.05)
    enc = model.mri_flow.encode(mri)
    coupling, prior, cond = model._pet_conditions(mri, enc)
    assert cond.shape == (4, 1 + width, 8, 8, 8)
    flow_in, logdet = model.injector(pet, cond)
    assert not torch.allclose(flow_in, pet)
    lp, pet_enc = model.pet_flow.log_prob(flow_in, coupling, prior)
    assert torch.allclose(model.log_prob(pet, mri)["pet"], lp + logdet)
    back = model.injector.inverse(model.pet_flow.inverse(pet_enc.zs, coupling), cond)
    assert (back - pet).abs().max() < 1e-4
    draws = model.sample(mri, temperature=0.0, n=1)
    flow_mode = model.pet_flow.sample(4, (8, 8, 8), 0.0, coupling, prior)
    assert torch.allclose(draws[0], model.injector.inverse(flow_mode, cond))


def test_several_draws_run_the_injector_net_once_and_equal_single_inverses():
    model, mri, _ = trained_tiny(injector_width=8, uptake_map=False)
    perturb(model, scale=0.05)
    enc = model.mri_flow.encode(mri)
    coupling, prior, cond = model._pet_conditions(mri, enc)
    calls = []
    hook = model.injector.net.register_forward_hook(lambda *args: calls.append(1))
    draws = model.sample(mri, temperature=0.7, n=4, generator=torch.Generator().manual_seed(5))
    hook.remove()
    assert len(calls) == 1 and draws.shape == (4, 4, 1, 8, 8, 8)
    generator = torch.Generator().manual_seed(5)
    for k, draw in enumerate(draws):
        if k % 2 == 0:
            state = generator.get_state()
        generator.set_state(state)
        flow = model.pet_flow.sample(4, (8, 8, 8), 0.7, coupling, prior, generator, mirror=k % 2 == 1)
        torch.testing.assert_close(draw, model.injector.inverse(flow, cond))


def test_antithetic_pairs_mirror_every_level_and_cancel_first_order_noise():
    """Oracle: re-encoding draws 0 and 1 gives latents z = mu + T sigma eps at every level with
    opposite eps; and as T halves, a single draw's distance to the T = 0 mode halves while the pair
    mean's falls by 2^1.5 (the pair cancels the noise's first-order term; the ReLU kinks of the
    subnets leave a T^1.5 remainder where a smooth flow would leave T^2)."""
    model, mri, _ = trained_tiny(injector_width=8, uptake_map=False)
    perturb(model, scale=0.05)
    enc = model.mri_flow.encode(mri)
    coupling, prior, cond = model._pet_conditions(mri, enc)
    draws = model.sample(mri, temperature=0.5, n=2, generator=torch.Generator().manual_seed(3))
    noise = []
    for draw in draws:
        flow_in, _ = model.injector(draw, cond)
        pet_enc = model.pet_flow.encode(flow_in, coupling)
        levels = []
        for i, z in enumerate(pet_enc.zs):
            mean, log_sigma = model.pet_flow.priors[i].params(
                model.pet_flow._prior_cond(i, pet_enc.kept[i], prior), z.shape, z.device)
            levels.append((z - mean) / (0.5 * log_sigma.exp()))
        noise.append(levels)
    for a, b in zip(*noise):
        assert a.abs().mean() > 0.5
        torch.testing.assert_close(a, -b, atol=2e-3, rtol=0)
    mode = model.sample(mri, temperature=0.0)[0]
    single, pair = [], []
    for t in (0.2, 0.1):
        draws = model.sample(mri, temperature=t, n=2, generator=torch.Generator().manual_seed(3))
        single.append((draws[0] - mode).norm())
        pair.append((draws.mean(0) - mode).norm())
    assert 1.8 < single[0] / single[1] < 2.2
    assert 2.6 < pair[0] / pair[1] and pair[1] < 0.1 * single[1]
    with pytest.raises(ValueError, match="1 or even"):
        model.sample(mri, temperature=0.5, n=3)


def test_bf16_coupling_inverts_exactly():
    torch.manual_seed(0)
    coupling = perturb(AffineCoupling(4, 8, 3))
    coupling.subnet_bf16 = True
    x, cond = torch.randn(2, 4, 4, 4, 4), torch.randn(2, 3, 4, 4, 4)
    y, ld = coupling(x, cond)
    assert ld.dtype == torch.float32
    assert (coupling.inverse(y, cond) - x).abs().max() < 1e-6


@pytest.mark.parametrize("seed", range(4))
def test_bf16_subnets_round_trip_within_a_fraction_of_an_intensity_bin(seed):
    model, mri, pet = trained_tiny()
    perturb(model, scale=0.05, seed=seed)
    model.set_subnet_bf16(True)
    enc = model.mri_flow.encode(mri)
    zs, ld = model.pet_flow(pet, enc.features)
    assert torch.isfinite(ld).all() and ld.dtype == torch.float32
    error = (model.pet_flow.inverse(zs, enc.features) - pet).abs()
    assert error.max() < 0.5 / model.config.n_bins and error.mean() < 1e-4


def test_compiled_subnets_give_the_eager_loss_and_gradients_under_the_same_names(monkeypatch):
    """Every subnet shape signature gets its own compiled graph, even past dynamo's cache limit
    (lowered to 2 here; a preset with four levels like ``small``'s has more than the default 8)."""
    from torch._dynamo.utils import counters

    model, mri, pet = trained_tiny(injector_width=4)
    perturb(model, scale=0.05)
    model.zero_grad(set_to_none=True)
    eager = copy.deepcopy(model)
    signatures = set()
    for module in model.modules():
        if isinstance(module, (AffineCoupling, ConditionalAffine)):
            module.net.register_forward_pre_hook(lambda net, args: signatures.add(
                (tuple(args[0].shape), tuple(p.shape for p in net.parameters()))))
    torch._dynamo.reset()
    monkeypatch.setattr(torch._dynamo.config, "cache_size_limit", 2)
    counters.clear()
    model.compile_subnets()
    losses = []
    for m in (eager, model):
        loss, _ = m.loss(pet, mri)
        loss.backward()
        losses.append(loss)
    assert len(signatures) > 2 and counters["stats"]["unique_graphs"] == len(signatures)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    assert list(model.state_dict()) == list(eager.state_dict())
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("overrides, recompute",
                         [({}, False), ({}, True), ({"side_channels": 2, "side_map_cells": 4}, False)])
def test_training_step_never_waits_for_the_device(overrides, recompute):
    """No tensor is read back to Python (aten._local_scalar_dense, what .item() and bool() run) in
    a training forward and backward once ActNorm is initialised: on a GPU each read would stall
    the host until the device has finished all queued work."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class ScalarReads(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                ScalarReads.count += 1
            return func(*args, **(kwargs or {}))

    model = DualGlow.from_preset("tiny", **overrides).train()
    model.set_recompute(recompute)
    mri, pet = paired_batch(2)
    side = torch.zeros(2, 2) if overrides else None
    with torch.no_grad():
        model.loss(pet, mri, side)
    with ScalarReads():
        loss, _ = model.loss(pet, mri, side)
        loss.backward()
    assert ScalarReads.count == 0


def test_loaded_actnorm_does_not_reinitialise():
    model, mri, pet = trained_tiny(steps=1)
    fresh = DualGlow.from_preset("tiny")
    fresh.load_state_dict(model.state_dict())
    fresh.train()
    fresh.loss(pet[:1] + 1.0, mri[:1])
    for a, b in zip(fresh.state_dict().values(), model.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_log_prob_terms_and_bits_per_voxel():
    model, mri, pet = trained_tiny()
    terms = model.log_prob(pet, mri)
    for key in ("pet", "mri", "pet_bpv", "mri_bpv"):
        assert terms[key].shape == (4,)
    voxels = pet[0].numel()
    expected = (-terms["pet"] / voxels + torch.log(torch.tensor(256.0))) / torch.log(torch.tensor(2.0))
    assert torch.allclose(terms["pet_bpv"], expected)
    loss, _ = model.loss(pet, mri)
    assert torch.isclose(loss, -(terms["pet"] + 0.001 * terms["mri"]).mean() / voxels)


def test_bits_per_voxel_are_those_of_the_quantisation_bins():
    """Oracle: values on the 1/256 grid under a standard normal density; each value's bin has
    probability Phi(x + 1/512) - Phi(x - 1/512), and minus the mean log2 of those masses is what
    ``bits_per_voxel`` gives from the density (to the density's curvature across a bin)."""
    x = torch.tensor([[-1.5, -0.25, 0.0, 0.75, 2.0]], dtype=torch.float64)
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0)
    log_density = normal.log_prob(x).sum(1)
    masses = normal.cdf(x + 0.5 / 256) - normal.cdf(x - 0.5 / 256)
    expected = -torch.log2(masses).mean(1)
    torch.testing.assert_close(bits_per_voxel(log_density, x, 256), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("overrides", [{}, {"condition_width": 6}, {"condition_width": 6, "coupling_condition": False},
                                       {"condition_width": 6, "injector_width": 8}])
def test_memory_saving_backward_matches_autograd(overrides):
    model, mri, pet = trained_tiny(**overrides)
    assert_memory_saving_gradients_match(model, mri, pet)


def test_memory_saving_backward_matches_autograd_with_the_unet_injector():
    """``set_recompute`` reaches the U-Net injector's units (on a 32^3 grid, the least it takes)."""
    torch.manual_seed(0)
    model = DualGlow.from_preset("tiny", injector_width=4, injector_net="unet")
    mri, pet = torch.rand(1, 1, 32, 32, 32) - 0.5, torch.rand(1, 1, 32, 32, 32) - 0.5
    with torch.no_grad():
        model.loss(pet, mri)
    model.set_recompute(True)
    assert all(u.recompute for u in model.injector.net.modules() if isinstance(u, RecomputedUnit))
    assert_memory_saving_gradients_match(model, mri, pet)


def assert_memory_saving_gradients_match(model, mri, pet):
    perturb(model, scale=0.05)
    model.train()
    grads = {}
    for recompute in (False, True):
        m = copy.deepcopy(model)
        m.set_recompute(recompute)
        loss, _ = m.loss(pet, mri)
        loss.backward()
        grads[recompute] = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    assert grads[False].keys() == grads[True].keys() and len(grads[True]) > 0
    for name, g in grads[False].items():
        scale = g.abs().max().clamp_min(1.0)
        assert (g - grads[True][name]).abs().max() <= 1e-5 * scale, name


def test_sample_shapes_temperature_zero_is_deterministic():
    model, mri, _ = trained_tiny()
    draws = model.sample(mri[:2], temperature=0.7, n=4, generator=torch.Generator().manual_seed(1))
    assert draws.shape == (4, 2, 1, 8, 8, 8)
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    again = model.sample(mri[:2], temperature=0.7, n=4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(draws, again)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    mean = model.sample(mri[:2], temperature=0.0)
    assert torch.equal(torch.rand(3), expected), "the prior means must not consume the global RNG"
    torch.manual_seed(0)
    unseeded = model.sample(mri[:2], temperature=0.7, n=2)
    torch.manual_seed(0)
    assert torch.equal(unseeded, model.sample(mri[:2], temperature=0.7, n=2))
    assert not torch.equal(unseeded[0], unseeded[1])
    assert torch.equal(model.sample(mri[:2], temperature=0.0, n=2)[1], mean[0])


def fit_bits(condition_is_noise: bool, steps=300):
    """Held-out PET bits per voxel after ``steps`` Adam steps on fresh paired batches (no overfitting)."""
    torch.manual_seed(0)
    model = DualGlow.from_preset("tiny")
    test_mri, test_pet = paired_batch(16, seed=2)
    g = torch.Generator().manual_seed(5)
    if condition_is_noise:
        test_mri = 0.3 * torch.randn(test_mri.shape, generator=g)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(steps):
        mri, pet = paired_batch(4, seed=100 + step)
        if condition_is_noise:
            mri = 0.3 * torch.randn(mri.shape, generator=g)
        loss, _ = model.loss(pet, mri)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
    model.eval()
    with torch.no_grad():
        return model.log_prob(test_pet, test_mri)["pet_bpv"].mean().item()


def test_condition_is_used():
    """About 0.24 bit/voxel apart after 300 steps (5.59 vs 5.83 on torch 2.13 CPU): over the 512
    voxels of a test volume that is a log-likelihood ratio of about 85 nats per volume."""
    real = fit_bits(condition_is_noise=False)
    noise = fit_bits(condition_is_noise=True)
    assert real < noise - 0.1, (real, noise)


@pytest.mark.parametrize("text, problem", [
    (b"model:\n  hidden: 8\ndescription: K\xf6ln\n", "not UTF-8 text"),
    (b"model: [1, 2]\n", "a preset needs a 'model' section of settings"),
    (b"model:\n  hidden: 8\ntrain: 3\n", "the 'train' section must hold settings"),
])
def test_a_preset_file_that_is_not_a_preset_is_a_model_error(tmp_path, text, problem):
    """A user's YAML preset is checked where it is read (ModelError, exit 5), not where a
    section is first used (AttributeError or TypeError: "internal error")."""
    from medflow.errors import ModelError

    (tmp_path / "mine.yaml").write_bytes(text)
    with pytest.raises(ModelError, match=re.escape(f"mine.yaml: {problem}")):
        load_preset(tmp_path / "mine.yaml")


def test_empty_data_and_train_sections_of_a_preset_mean_defaults(tmp_path):
    (tmp_path / "mine.yaml").write_text("model:\n  hidden: 8\ndata:\ntrain:\n")
    preset = load_preset(tmp_path / "mine.yaml")
    assert preset["data"] == {} and preset["train"] == {} and preset["name"] == "mine"


@pytest.mark.parametrize("name", available_presets())
def test_presets_load_and_build(name):
    preset = load_preset(name)
    assert {"model", "data", "train"} <= set(preset)
    if name == "dualglow3d":
        with torch.device("meta"):
            model = DualGlow.from_preset(name)
        assert [len(level.steps) for level in model.pet_flow.levels] == [16, 16, 16, 16]
        print(f"dualglow3d parameters: {model.num_parameters():,}")
    else:
        assert DualGlow.from_preset(name).num_parameters() > 0


def test_model_from_before_the_uptake_map_loads_without_it():
    """Configs written before ``uptake_map`` existed have no such key and no map in their state dict."""
    values = dict(load_preset("small")["model"])
    del values["uptake_map"]
    model = DualGlow(DualGlowConfig.from_dict(values))
    assert model.side_scale is None and not any("side_scale" in k for k in model.state_dict())
    assert DualGlow.from_preset("small").side_scale.maps.shape == (1, 1, 8, 8, 8)
    from medflow.errors import ModelError

    with pytest.raises(ModelError, match="uptake_map needs side_map_cells"):
        DualGlow.from_preset("tiny", side_map_cells=0)


def test_overrides_and_bad_options():
    from medflow.errors import ModelError

    model = DualGlow.from_preset("tiny", steps=[1, 1, 1], prior="mean", mri_channels=2)
    assert model.config.levels == 3 and model.divisor == 8
    with pytest.raises(ModelError, match="unknown model option"):
        DualGlow.from_preset("tiny", widht=3)
    with pytest.raises(ModelError, match="unknown preset"):
        DualGlow.from_preset("nope")
    with pytest.raises(ModelError, match="injector_net must be one of"):
        DualGlow.from_preset("tiny", injector_width=4, injector_net="resnet")
    with pytest.raises(ModelError, match="injector_beta must be between 0 and 1, got 1.5"):
        DualGlow.from_preset("tiny", injector_width=4, injector_beta=1.5)
    for option, value, kind in [("hidden", "abc", "an integer"), ("hidden", True, "an integer"),
                                ("injector_beta", "abc", "a number"), ("steps", [1, "2"], "a list of integers"),
                                ("uptake_map", 1, "true or false"), ("side_map_channels", 0, "a list of integers or null")]:
        with pytest.raises(ModelError, match=re.escape(f"model option {option} must be {kind}, got {value!r}")):
            DualGlow.from_preset("tiny", **{option: value})


@pytest.mark.parametrize("batch", [4, 1])
def test_cpu_placement_is_channels_last_and_changes_no_number(batch, monkeypatch):
    """``place_model`` stores 5-D weights channels-last on CPU; log p, gradients and samples match
    the default layout's to float32 rounding, and the state dict loads into a plain model. At
    batch 1 the top level's subnets (2³ voxels, more channels) run as patch products."""
    from medflow.device import place_model
    from medflow.flows import conv as conv_module

    patch_product, patch_calls = conv_module._patch_product, []
    monkeypatch.setattr(conv_module, "_patch_product", lambda *args: patch_calls.append(1) or patch_product(*args))
    model, mri, pet = trained_tiny(injector_width=4)
    mri, pet = mri[:batch], pet[:batch]
    placed = place_model(copy.deepcopy(model), torch.device("cpu"))
    conv = next(m for m in placed.modules() if isinstance(m, torch.nn.Conv3d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
    for net in (model, placed):
        net.zero_grad()
        net.loss(pet, mri)[0].backward()
    assert torch.allclose(placed.log_prob(pet, mri)["pet"], model.log_prob(pet, mri)["pet"], rtol=1e-5, atol=1e-3)
    for a, b in zip(model.parameters(), placed.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-3, atol=1e-5)
    torch.manual_seed(1)
    expected = model.sample(mri, temperature=0.7)
    torch.manual_seed(1)
    assert torch.allclose(placed.sample(mri, temperature=0.7), expected, atol=1e-5)
    plain = DualGlow.from_preset("tiny", injector_width=4)
    plain.load_state_dict(placed.state_dict())
    assert torch.allclose(plain.log_prob(pet, mri)["pet"], model.log_prob(pet, mri)["pet"], rtol=1e-5, atol=1e-3)
    assert bool(patch_calls) == (batch == 1)
