"""AveragePool and ConvTranspose with any padding, as ONNX and onnxruntime define them (onnx2torch
converters for the nodes ``normalize.stash_ops`` moves to its domain; pure torch).

onnx2torch's AveragePool and ConvTranspose take only pads equal at both ends of every axis. Keras-era
exports (tf2onnx's SAME padding, onnx-caffe2's Inception) pad one end more, and an AveragePool with
``count_include_pad = 0`` (the default) then divides each window by the count of real input positions in
it. Here the input is padded with zeros, summed over each window, and divided by the window's count of
input positions (or of input and padding positions, ``count_include_pad = 1``), counted the same way on a
mask. ``ceil_mode`` adds the
last partial window, except where it would start inside the end padding (ONNX 19's rule, torch's too);
positions past the padding count in neither case. A ConvTranspose runs torch's with the padding both
ends share, then crops what one end pads more (padding a transposed convolution removes output positions).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OnnxMapping, OnnxToTorchModule, OperationConverterResult, onnx_mapping_from_node
from torch import nn

from onnx_admm.converters.normalize import same_pads

_POOLS = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


class OnnxAveragePool(nn.Module, OnnxToTorchModule):
    """AveragePool with explicit pads (begins then ends, ONNX order) or SAME padding found at run time."""

    def __init__(self, kernel: tuple[int, ...], strides: tuple[int, ...], pads: tuple[int, ...] | None,
                 auto_pad: str, count_include_pad: bool, ceil_mode: bool) -> None:
        super().__init__()
        if len(kernel) not in _POOLS:
            raise NotImplementedError(f"AveragePool over {len(kernel)} spatial axes is not supported")
        self.kernel, self.strides, self.auto_pad = tuple(kernel), tuple(strides), auto_pad
        self.pads = tuple(pads) if pads else (0,) * (2 * len(kernel))
        self.count_include_pad, self.ceil_mode = count_include_pad, ceil_mode

    def _axis(self, i: int, size: int) -> tuple[int, int, int]:
        """(pad at the beginning, pad at the end, positions past the end padding) of spatial axis i."""
        k, s, n = self.kernel[i], self.strides[i], len(self.kernel)
        if self.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            begin, end = same_pads(size, k, s, 1, self.auto_pad == "SAME_UPPER")
        else:
            begin, end = self.pads[i], self.pads[n + i]
        span = size + begin + end - k
        out = (math.ceil(span / s) if self.ceil_mode else span // s) + 1
        if self.ceil_mode and (out - 1) * s >= size + begin:
            out -= 1  # the last window would start in the end padding
        return begin, end, max((out - 1) * s + k - (size + begin + end), 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        spatial = tuple(x.shape[2:])
        axes = [self._axis(i, size) for i, size in enumerate(spatial)]
        pool = _POOLS[len(spatial)]
        # F.pad lists the last axis first.
        padding = [p for b, e, extra in reversed(axes) for p in (b, e + extra)]
        sums = pool(F.pad(x, padding), self.kernel, self.strides)
        if self.count_include_pad:
            inside = x.new_ones((1, 1, *(size + b + e for size, (b, e, _) in zip(spatial, axes))))
            mask = F.pad(inside, [p for _, _, extra in reversed(axes) for p in (0, extra)])
        else:
            mask = F.pad(x.new_ones((1, 1, *spatial)), padding)
        counts = pool(mask, self.kernel, self.strides)  # both divided by the whole kernel: the ratio is exact
        return sums / counts.clamp(min=1 / math.prod(self.kernel))


def convert_average_pool(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:  # noqa: ARG001
    """The converter for a stashed AveragePool (any opset up to 22; dilations other than 1 are refused)."""
    attrs = node.attributes
    kernel = tuple(attrs["kernel_shape"])
    if any(d != 1 for d in attrs.get("dilations", [1] * len(kernel))):
        raise NotImplementedError("AveragePool with dilations is not supported")
    auto_pad = attrs.get("auto_pad", "NOTSET")
    module = OnnxAveragePool(kernel, tuple(attrs.get("strides", [1] * len(kernel))), attrs.get("pads"),
                             auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad,
                             attrs.get("count_include_pad", 0) == 1, attrs.get("ceil_mode", 0) == 1)
    return OperationConverterResult(module, onnx_mapping_from_node(node))


class Crop(nn.Module):
    """Drops ``begins[i]`` positions at the start and ``ends[i]`` at the end of spatial axis i."""

    def __init__(self, begins: tuple[int, ...], ends: tuple[int, ...]) -> None:
        super().__init__()
        self.begins, self.ends = tuple(begins), tuple(ends)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        index = [slice(None), slice(None)] + [slice(b, x.shape[2 + i] - e) for i, (b, e) in
                                              enumerate(zip(self.begins, self.ends))]
        return x[tuple(index)]


_CONV_TRANSPOSE = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


def convert_conv_transpose(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    """A stashed ConvTranspose (explicit pads that differ between the ends; ``normalize.explicit_auto_pad``
    has already turned SAME and ``output_shape`` into pads): Sequential(ConvTranspose, Crop). The weight
    and bias stay the module's Parameters, so the importer maps them like any ConvTranspose's."""
    attrs = node.attributes
    if "output_shape" in attrs or attrs.get("auto_pad", "NOTSET") in ("SAME_UPPER", "SAME_LOWER"):
        raise NotImplementedError(f"ConvTranspose {node.name!r} sets its output size (output_shape or SAME) from "
                                  "input sizes shape inference could not find; give the graph input fixed sizes")
    weight = graph.initializers[node.input_values[1]].to_torch()
    names = node.input_values
    bias = graph.initializers[names[2]].to_torch() if len(names) > 2 and names[2] else None
    n = weight.dim() - 2
    if n not in _CONV_TRANSPOSE:
        raise NotImplementedError(f"ConvTranspose over {n} spatial axes is not supported")
    pads = list(attrs.get("pads", [0] * 2 * n))
    begins, ends = pads[:n], pads[n:]
    shared = [min(b, e) for b, e in zip(begins, ends)]
    groups = attrs.get("group", 1)
    conv = _CONV_TRANSPOSE[n](weight.shape[0], weight.shape[1] * groups, tuple(weight.shape[2:]),
                              stride=tuple(attrs.get("strides", [1] * n)), padding=tuple(shared),
                              output_padding=tuple(attrs.get("output_padding", [0] * n)), groups=groups,
                              bias=bias is not None, dilation=tuple(attrs.get("dilations", [1] * n)))
    with torch.no_grad():
        conv.weight.copy_(weight)
        if bias is not None:
            conv.bias.copy_(bias)
    crop = Crop(tuple(b - m for b, m in zip(begins, shared)), tuple(e - m for e, m in zip(ends, shared)))
    return OperationConverterResult(nn.Sequential(conv, crop),
                                    OnnxMapping(inputs=(node.input_values[0],), outputs=node.output_values))
