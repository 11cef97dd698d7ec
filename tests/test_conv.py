"""medflow's 3D convolution (oneDNN, patch product) against torch.nn.Conv3d: values, gradients, and when
each route applies."""

import pytest
import torch
from torch import nn

from medflow.flows.conv import Conv3d

CL = torch.channels_last_3d


def pair(cin, cout, k, bias, channels_last):
    torch.manual_seed(0)
    ours, ref = Conv3d(cin, cout, k, padding=k // 2, bias=bias), nn.Conv3d(cin, cout, k, padding=k // 2, bias=bias)
    ref.load_state_dict(ours.state_dict())
    return (ours.to(memory_format=CL), ref) if channels_last else (ours, ref)


@pytest.mark.parametrize("k,shape,bias,channels_last,input_grad", [
    (3, (1, 4, 6, 5, 7), True, True, True),
    (3, (1, 3, 7, 6, 6), True, False, False),
    (1, (1, 8, 4, 3, 5), False, True, True),
])
def test_onednn_conv_matches_torch_conv_and_its_gradients(k, shape, bias, channels_last, input_grad):
    ours, ref = pair(shape[1], 6, k, bias, channels_last)
    x = torch.randn(shape)
    x_ours = (x.to(memory_format=CL) if channels_last else x.clone()).requires_grad_(input_grad)
    x_ref = x.clone().requires_grad_(input_grad)
    y, y_ref = ours(x_ours), ref(x_ref)
    assert type(y.grad_fn).__name__.startswith("_OneDnnSameConv3d")
    grad = torch.randn_like(y_ref)
    y.backward(grad)
    y_ref.backward(grad)
    assert torch.allclose(y, y_ref, atol=1e-5)
    assert torch.allclose(ours.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-4)
    if bias:
        assert torch.allclose(ours.bias.grad, ref.bias.grad, rtol=1e-4, atol=1e-4)
    assert (x_ours.grad is None) == (not input_grad)
    if input_grad:
        assert torch.allclose(x_ours.grad, x_ref.grad, atol=1e-4)


@pytest.mark.parametrize("cin,cout,k,spatial,bias", [
    (64, 512, 3, (2, 2, 2), True),
    (5, 70, 3, (3, 4, 5), False),
    (6, 40, 1, (2, 3, 4), True),
])
def test_patch_product_matches_torch_conv_and_keeps_the_weight_layout(cin, cout, k, spatial, bias):
    ours, ref = pair(cin, cout, k, bias, channels_last=True)
    x = torch.randn(1, cin, *spatial)
    x_ours, x_ref = x.to(memory_format=CL).requires_grad_(), x.clone().requires_grad_()
    assert ours._runs_as_patch_product(x_ours) and not ours._runs_on_onednn(x_ours)
    y, y_ref = ours(x_ours), ref(x_ref)
    grad = torch.randn_like(y_ref)
    y.backward(grad)
    y_ref.backward(grad)
    assert torch.allclose(y, y_ref, atol=1e-5)
    assert torch.allclose(ours.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-4)
    assert ours.weight.grad.is_contiguous(memory_format=CL)
    if bias:
        assert torch.allclose(ours.bias.grad, ref.bias.grad, rtol=1e-4, atol=1e-4)
    assert torch.allclose(x_ours.grad, x_ref.grad, atol=1e-4)


def test_patch_product_only_for_channels_last_weights_larger_than_the_patches():
    conv = Conv3d(8, 64, 3, padding=1)
    small = torch.randn(1, 8, 2, 4, 4)
    assert not conv._runs_as_patch_product(small)
    conv = conv.to(memory_format=CL)
    assert conv._runs_as_patch_product(small)
    assert not conv._runs_as_patch_product(torch.randn(1, 8, 4, 4, 4))
    assert not conv._runs_as_patch_product(torch.randn(2, 8, 2, 4, 4))
    assert not Conv3d(8, 64, 3, stride=2, padding=1).to(memory_format=CL)._runs_as_patch_product(small)


def test_other_convolutions_use_torch_conv():
    same = Conv3d(2, 3, 3, padding=1)
    assert not same._runs_on_onednn(torch.randn(2, 2, 4, 4, 4))
    assert not same._runs_on_onednn(torch.randn(1, 2, 128, 96, 4))
    assert not same._runs_on_onednn(torch.randn(1, 2, 4, 4, 4, dtype=torch.float64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not same._runs_on_onednn(torch.randn(1, 2, 4, 4, 4))
    for conv in (Conv3d(2, 3, 3, stride=2, padding=1), Conv3d(2, 3, 3, padding=0), Conv3d(2, 3, 2, padding=1)):
        assert not conv._runs_on_onednn(torch.randn(1, 2, 4, 4, 4))
    assert same._runs_on_onednn(torch.randn(1, 2, 6, 6, 6))


def test_few_voxels_and_a_large_weight_stay_on_torch_conv():
    assert not Conv3d(64, 512, 3, padding=1)._runs_on_onednn(torch.randn(1, 64, 2, 2, 2))


def test_compiled_conv_uses_torch_conv_and_matches_eager():
    """Under torch.compile the oneDNN route (an op without a shape function for the tracer) is left
    to the compiler: a batch-1 CPU input that eager mode sends to oneDNN compiles and gives its values."""
    ours, ref = pair(4, 6, 3, True, False)
    x = torch.randn(1, 4, 6, 5, 7)
    assert ours._runs_on_onednn(x)
    compiled = torch.compile(ours.forward)
    y = compiled(x.requires_grad_())
    y.sum().backward()
    ref(x.detach().clone().requires_grad_()).sum().backward()
    assert torch.allclose(y, ref(x.detach()), atol=1e-5)
    assert torch.allclose(ours.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-4)
