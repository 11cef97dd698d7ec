"""3D convolution that keeps batch-1 CPU training off PyTorch's slowest paths (forward and backward).

PyTorch sends a CPU float32 convolution with batch 1 to its im2col path whenever
channels x depth x height (the width is not counted) is at most 20480, a rule written for
2D images: a [1, 4, 48, 56, 48] input qualifies (and, with channels-last weights, that path
copies the weight to the contiguous layout on each call). ``Conv3d`` runs those convolutions
on oneDNN, which PyTorch uses for larger inputs: the forward pass and the input gradient as
oneDNN convolutions, and the weight gradient as a oneDNN convolution of the input with the
output gradient (batch and channel axes swapped). It does so only where the input has at
least as many voxels as the weight has values per input channel, because this route's
backward copies a flipped weight and convolves over the whole volume: work that grows with
the weight, which at a flow's top levels (a few voxels, large weights) is most of it.
Where PyTorch would use im2col and the weight has more values than the patch columns (more
output channels than voxels: a flow's top levels), a channels-last weight is not copied to the
contiguous layout that im2col reads, as PyTorch does three times per training step (a copy of
the whole weight each time): ``Conv3d`` multiplies the patches, ordered like that weight, by the
weight in place (autograd differentiates the product).
BENCHMARKS.md (section 1) times medflow's batch-1 training step against the FrEIA peer's,
whose subnets use ``torch.nn.Conv3d``. Values equal ``torch.nn.Conv3d``'s up to float
rounding; every other case (other devices, dtypes, autocast, batches > 1, inputs PyTorch
already sends to oneDNN, convolutions that are not stride-1 "same" convolutions, code that
``torch.compile`` traces, whose compiler picks its own convolution) runs ``torch.nn.Conv3d`` unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CHANNELS_LAST = torch.channels_last_3d
IM2COL_MAX = 20480  # PyTorch's bound on channels x depth x height for its im2col path at batch 1


def _onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding) -> torch.Tensor:
    return torch.ops.aten.mkldnn_convolution(x, weight, bias, list(padding), [1, 1, 1], [1, 1, 1], 1)


class _OneDnnSameConv3d(torch.autograd.Function):
    """y = conv3d(x, weight, bias), stride 1, padding (k - 1) / 2, for x [1, C, D, H, W]."""

    @staticmethod
    def forward(ctx, x, weight, bias, padding):
        ctx.save_for_backward(x, weight)
        ctx.padding = padding
        ctx.has_bias = bias is not None
        return _onednn(x, weight, bias, padding)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        padding = ctx.padding
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            flipped = weight.flip(2, 3, 4).transpose(0, 1).contiguous(memory_format=CHANNELS_LAST)
            grad_x = _onednn(grad, flipped, None, padding)
        if ctx.needs_input_grad[1]:
            grad_weight = _onednn(x.transpose(0, 1), grad.transpose(0, 1), None, padding).transpose(0, 1)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum(dim=(0, 2, 3, 4))
        return grad_x, grad_weight, grad_bias, None


def _patch_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding) -> torch.Tensor:
    """y = conv3d(x, weight, bias), stride 1, "same" padding, as one matrix product of the input's
    patches, ordered (kd, kh, kw, C) like a channels-last weight, with that weight read in place.
    x [B, C, D, H, W] -> y [B, O, D, H, W] (channels-last strides)."""
    b, _, d, h, w = x.shape
    k = weight.shape[2:]
    pd, ph, pw = padding
    patches = F.pad(x, (pw, pw, ph, ph, pd, pd)).unfold(2, k[0], 1).unfold(3, k[1], 1).unfold(4, k[2], 1)
    columns = patches.permute(0, 2, 3, 4, 5, 6, 7, 1).reshape(b, d * h * w, -1)
    matrix = weight.permute(0, 2, 3, 4, 1).reshape(weight.shape[0], -1)
    return F.linear(columns, matrix, bias).view(b, d, h, w, -1).permute(0, 4, 1, 2, 3)


class Conv3d(nn.Conv3d):
    """``torch.nn.Conv3d`` whose batch-1 CPU float32 "same" convolutions that PyTorch would run
    with im2col run on oneDNN, or, with more output channels than input voxels and a
    channels-last weight, as a product of the input's patches with the weight in place."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.same_size = (self.groups == 1 and self.padding_mode == "zeros" and self.stride == (1, 1, 1)
                          and self.dilation == (1, 1, 1)
                          and all(k % 2 == 1 and p == k // 2 for k, p in zip(self.kernel_size, self.padding)))

    @classmethod
    def like(cls, conv: nn.Conv3d) -> "Conv3d":
        """A ``Conv3d`` with ``conv``'s settings, device, dtype and weights."""
        ours = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                   dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                   padding_mode=conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype)
        ours.load_state_dict(conv.state_dict())
        return ours

    def _on_im2col(self, x: torch.Tensor) -> bool:
        """Whether PyTorch would run this convolution with im2col (batch-1 CPU float32 "same")."""
        return (self.same_size and not torch.compiler.is_compiling() and x.device.type == "cpu"
                and x.shape[0] == 1 and x.dtype == torch.float32
                and x.shape[1] * x.shape[2] * x.shape[3] <= IM2COL_MAX
                and self.weight.dtype == torch.float32 and not torch.is_autocast_enabled("cpu"))

    def _runs_on_onednn(self, x: torch.Tensor) -> bool:
        return (self._on_im2col(x) and x.shape[2] * x.shape[3] * x.shape[4] >= self.weight[:, 0].numel()
                and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)

    def _runs_as_patch_product(self, x: torch.Tensor) -> bool:
        return (self._on_im2col(x) and self.out_channels > x.shape[2] * x.shape[3] * x.shape[4]
                and self.weight.is_contiguous(memory_format=CHANNELS_LAST))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._runs_on_onednn(x):
            return _OneDnnSameConv3d.apply(x, self.weight, self.bias, self.padding)
        if self._runs_as_patch_product(x):
            return _patch_product(x, self.weight, self.bias, self.padding)
        return super().forward(x)
