"""Converters for standard ops onnx2torch 1.5 lacks that a gradient must cross, registered when imported.

Each missing op between two weights split the graph: the layers after it were passed through untrained and
uncompressed (the dynamo exporter writes ``torch.sinh`` as ``Sinh``, ``F.grid_sample`` as ``GridSample``), or,
where onnx's version converter had no way down (``GridSample`` 20), the model did not import at all.

- ``Sinh``, ``Cosh``, ``Asinh``, ``Acosh``, ``Atanh`` (opset 9), ``Shrink`` (9), ``ThresholdedRelu`` (10),
  ``CastLike`` (15), ``SpaceToDepth`` (tf2onnx writes it for ``tf.nn.space_to_depth``), ``LpNormalization``,
  ``MeanVarianceNormalization``, ``GlobalLpPool``, ``ScatterElements`` (11-16; 18, whose max and min reductions
  have no way down to opset 17, moved to ``normalize.STASH_DOMAIN``).
- ``GridSample``: opset 16 (modes ``bilinear`` / ``nearest`` / ``bicubic``) in the default domain, opset 20 (the
  same modes named ``linear`` / ``nearest`` / ``cubic``) moved to ``normalize.STASH_DOMAIN``; 4-D and 5-D inputs
  (bicubic 4-D only), as ``torch.nn.functional.grid_sample`` computes them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from onnx import defs
from onnx2torch.node_converters.registry import add_converter
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OnnxToTorchModule, OperationConverterResult, onnx_mapping_from_node
from torch import nn

from onnx_admm.converters.errors import UserError
from onnx_admm.converters.normalize import TARGET_OPSET


class _Elementwise(nn.Module, OnnxToTorchModule):
    def __init__(self, function: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.function = function

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.function(x)


class OnnxShrink(nn.Module, OnnxToTorchModule):
    """x - bias above lambd, x + bias below -lambd, 0 between (ONNX Shrink)."""

    def __init__(self, bias: float, lambd: float) -> None:
        super().__init__()
        self.bias, self.lambd = bias, lambd

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        zero = torch.zeros_like(x)
        return torch.where(x > self.lambd, x - self.bias, torch.where(x < -self.lambd, x + self.bias, zero))


class OnnxThresholdedRelu(nn.Module, OnnxToTorchModule):
    """x above alpha, else 0."""

    def __init__(self, alpha: float) -> None:
        super().__init__()
        self.alpha = alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return torch.where(x > self.alpha, x, torch.zeros_like(x))


class OnnxCastLike(nn.Module, OnnxToTorchModule):
    """x in the element type of ``target`` (read for its type only)."""

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return x.to(target.dtype)


class OnnxSpaceToDepth(nn.Module, OnnxToTorchModule):
    """[N, C, H, W] -> [N, C * b * b, H / b, W / b], each b x b block's values in (row, column, channel) order."""

    def __init__(self, block: int) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        n, c, h, w = x.shape
        b = self.block
        blocks = x.reshape(n, c, h // b, b, w // b, b).permute(0, 3, 5, 1, 2, 4)
        return blocks.reshape(n, c * b * b, h // b, w // b)


class OnnxLpNormalization(nn.Module, OnnxToTorchModule):
    """x over its L1 or L2 norm along ``axis``; a zero norm leaves the values as they are (zeros), as onnxruntime
    leaves them."""

    def __init__(self, axis: int, p: int) -> None:
        super().__init__()
        self.axis, self.p = axis, p

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        norm = torch.linalg.vector_norm(x, ord=self.p, dim=self.axis, keepdim=True)
        return torch.where(norm == 0, x, x / torch.where(norm == 0, torch.ones_like(norm), norm))


class OnnxMeanVarianceNormalization(nn.Module, OnnxToTorchModule):
    """(x - E[x]) / sqrt(E[x^2] - E[x]^2) over ``axes``, as onnxruntime computes it (without the function body's
    epsilon: a constant slice gives 0 / 0, NaN, there too)."""

    def __init__(self, axes: list[int]) -> None:
        super().__init__()
        self.axes = tuple(axes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        mean = x.mean(self.axes, keepdim=True)
        variance = (x * x).mean(self.axes, keepdim=True) - mean * mean
        return (x - mean) / variance.sqrt()


_SCATTER_REDUCE = {"add": "sum", "mul": "prod", "max": "amax", "min": "amin"}


class OnnxScatterElements(nn.Module, OnnxToTorchModule):
    """ScatterElements(data, indices, updates) along ``axis``: replaced, or reduced into the data (opsets 11-18)."""

    def __init__(self, axis: int, reduction: str) -> None:
        super().__init__()
        if reduction not in ("none", *_SCATTER_REDUCE):
            raise UserError(f"ScatterElements with reduction {reduction!r} is not converted; re-export with none, "
                            "add, mul, max or min")
        self.axis, self.reduction = axis, reduction

    def forward(self, data: torch.Tensor, indices: torch.Tensor, updates: torch.Tensor) -> torch.Tensor:  # noqa: D102
        axis = self.axis % data.dim()
        index = indices.long()
        index = torch.where(index < 0, index + data.shape[axis], index)
        if self.reduction == "none":
            return data.scatter(axis, index, updates)
        return data.scatter_reduce(axis, index, updates, _SCATTER_REDUCE[self.reduction], include_self=True)


class OnnxGlobalLpPool(nn.Module, OnnxToTorchModule):
    """(sum |x|^p over the spatial dims)^(1/p), kept as dims of size 1."""

    def __init__(self, p: int) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return torch.linalg.vector_norm(x, ord=self.p, dim=tuple(range(2, x.dim())), keepdim=True)


_GRID_MODES = {"linear": "bilinear", "bilinear": "bilinear", "nearest": "nearest", "cubic": "bicubic",
               "bicubic": "bicubic"}


class OnnxGridSample(nn.Module, OnnxToTorchModule):
    """GridSample(x, grid) of opsets 16 and 20 by ``F.grid_sample``."""

    def __init__(self, mode: str, padding_mode: str, align_corners: bool) -> None:
        super().__init__()
        if mode not in _GRID_MODES or padding_mode not in ("zeros", "border", "reflection"):
            raise UserError(f"GridSample with mode {mode!r} and padding_mode {padding_mode!r} is not converted; "
                            "re-export with bilinear, nearest or bicubic sampling")
        self.mode, self.padding_mode, self.align_corners = _GRID_MODES[mode], padding_mode, align_corners

    def forward(self, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if x.dim() not in (4, 5) or (self.mode == "bicubic" and x.dim() != 4):
            raise UserError(f"GridSample with {self.mode} sampling of a {x.dim()}-D input is not converted (torch "
                            "samples 4-D inputs, and 5-D ones bilinear or nearest); re-export with one of those")
        return F.grid_sample(x, grid.to(x.dtype), mode=self.mode, padding_mode=self.padding_mode,
                             align_corners=self.align_corners)


def simple_converter(factory: Callable[[OnnxNode], nn.Module]) -> Callable[..., OperationConverterResult]:
    """An onnx2torch converter whose module ``factory`` builds from the node alone, reading the node's inputs in
    order."""
    def convert(node: OnnxNode, graph: OnnxGraph | None) -> OperationConverterResult:  # noqa: ARG001
        return OperationConverterResult(factory(node), onnx_mapping_from_node(node))

    return convert


def _register(op: str, factory: Callable[[OnnxNode], nn.Module]) -> None:
    """One converter for every version of ``op`` up to the opset of the import (onnx2torch looks a converter up by
    the version the op changed at)."""
    for version in sorted({defs.get_schema(op, v).since_version for v in range(1, TARGET_OPSET + 1)
                           if _exists(op, v)}):
        add_converter(operation_type=op, version=version)(simple_converter(factory))


def _grid_sample(node: OnnxNode) -> OnnxGridSample:
    return OnnxGridSample(node.attributes.get("mode", "bilinear"), node.attributes.get("padding_mode", "zeros"),
                          bool(node.attributes.get("align_corners", 0)))


def _scatter_elements(node: OnnxNode) -> OnnxScatterElements:
    return OnnxScatterElements(int(node.attributes.get("axis", 0)), node.attributes.get("reduction", "none"))


# Also registered in normalize.STASH_DOMAIN (converters.onnx_ops), for the versions onnx cannot bring down to 17.
convert_grid_sample = simple_converter(_grid_sample)
convert_scatter_elements = simple_converter(_scatter_elements)


def _exists(op: str, version: int) -> bool:
    try:
        defs.get_schema(op, version)
    except defs.SchemaError:
        return False
    return True


for _op, _function in (("Sinh", torch.sinh), ("Cosh", torch.cosh), ("Asinh", torch.asinh), ("Acosh", torch.acosh),
                       ("Atanh", torch.atanh)):
    _register(_op, lambda node, f=_function: _Elementwise(f))
_register("Shrink", lambda node: OnnxShrink(float(node.attributes.get("bias", 0.0)),
                                            float(node.attributes.get("lambd", 0.5))))
_register("ThresholdedRelu", lambda node: OnnxThresholdedRelu(float(node.attributes.get("alpha", 1.0))))
_register("CastLike", lambda node: OnnxCastLike())
_register("SpaceToDepth", lambda node: OnnxSpaceToDepth(int(node.attributes.get("blocksize", 2))))
_register("LpNormalization", lambda node: OnnxLpNormalization(int(node.attributes.get("axis", -1)),
                                                              int(node.attributes.get("p", 2))))
_register("MeanVarianceNormalization",
          lambda node: OnnxMeanVarianceNormalization(list(node.attributes.get("axes", [0, 2, 3]))))
_register("ScatterElements", _scatter_elements)  # 18 is stashed (converters.onnx_ops): max / min have no way down
_register("GlobalLpPool", lambda node: OnnxGlobalLpPool(int(node.attributes.get("p", 2))))
add_converter(operation_type="GridSample", version=16)(convert_grid_sample)  # 20 is stashed: no way down to 17
