"""Property-based tests (hypothesis): random shapes, widths and seeds keep the flow exact.

Round-trip error is bounded relative to the latents' magnitude: float32 rounding scales with
it (a tiny batch can give actnorm scales up to 1/min_std = 100).
"""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.autograd.functional import jacobian

from medflow.flows import Glow3d
from tests.test_flows import perturb

FAST = settings(max_examples=12, deadline=None)


def build(seed, channels, hidden, steps, squeeze, dtype=torch.float32):
    torch.manual_seed(seed)
    glow = Glow3d(channels, steps, hidden, squeeze=squeeze, prior_cond_channels=[2] * len(steps), prior_hidden=4)
    return glow.to(dtype)


@FAST
@given(seed=st.integers(0, 10_000), channels=st.integers(1, 3), hidden=st.integers(2, 12),
       steps=st.lists(st.integers(1, 3), min_size=1, max_size=2), squeeze=st.sampled_from(["reshape", "haar"]),
       dims=st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3)), batch=st.integers(1, 3))
def test_round_trip_for_random_architectures(seed, channels, hidden, steps, squeeze, dims, batch):
    glow = build(seed, channels, hidden, steps, squeeze)
    size = [d * 2 ** len(steps) for d in dims]
    x = torch.randn(batch, channels, *size, generator=torch.Generator().manual_seed(seed))
    glow.train()
    glow(x)
    glow.eval()
    perturb(glow, scale=0.02, seed=seed)
    zs, logdet = glow(x)
    assert torch.isfinite(logdet).all() and logdet.shape == (batch,)
    scale = max(1.0, max(z.abs().max().item() for z in zs))
    assert (glow.inverse(zs) - x).abs().max() < 1e-4 * scale


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 10_000), hidden=st.integers(2, 6), squeeze=st.sampled_from(["reshape", "haar"]))
def test_logdet_matches_jacobian_for_random_flows(seed, hidden, squeeze):
    glow = build(seed, 1, hidden, [1, 1], squeeze, torch.float64)
    x = torch.randn(1, 1, 4, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    glow.train()
    glow(x)
    glow.eval()
    perturb(glow, scale=0.1, seed=seed)

    def f(flat):
        return torch.cat([z.flatten() for z in glow(flat.view(1, 1, 4, 4, 4))[0]])

    _, expected = torch.linalg.slogdet(jacobian(f, x.flatten()))
    assert abs(glow(x)[1].item() - expected.item()) < 1e-6


@FAST
@given(seed=st.integers(0, 10_000), magnitude=st.floats(1e2, 1e5), temperature=st.floats(0.0, 3.0))
def test_out_of_range_inputs_and_hot_sampling_stay_finite(seed, magnitude, temperature):
    glow = build(seed, 1, 8, [2, 2], "reshape")
    x = torch.randn(2, 1, 8, 8, 8, generator=torch.Generator().manual_seed(seed))
    glow.train()
    glow(x)
    glow.eval()
    perturb(glow, scale=0.1, seed=seed)
    zs, logdet = glow(x * magnitude)
    assert all(torch.isfinite(z).all() for z in zs) and torch.isfinite(logdet).all()
    prior_cond = [torch.randn(2, 2, 4, 4, 4), torch.randn(2, 2, 2, 2, 2)]
    sample = glow.sample(2, (8, 8, 8), temperature, prior_cond=prior_cond,
                         generator=torch.Generator().manual_seed(seed))
    assert torch.isfinite(sample).all()
