"""AveragePool with any padding, as ONNX and onnxruntime define it (an onnx2torch converter, pure torch).

onnx2torch's AveragePool takes only pads equal at both ends of every axis. Keras-era exports (tf2onnx's
SAME padding, onnx-caffe2's Inception) pad one end more, and ``count_include_pad = 0`` (the default)
then divides each window by the count of real input positions in it. Here the input is padded with
zeros, summed over each window, and divided by the window's count of input positions (or of input and
padding positions, ``count_include_pad = 1``), counted the same way on a mask. ``ceil_mode`` adds the
last partial window, except where it would start inside the end padding (ONNX 19's rule, torch's too);
positions past the padding count in neither case.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OnnxToTorchModule, OperationConverterResult, onnx_mapping_from_node
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
