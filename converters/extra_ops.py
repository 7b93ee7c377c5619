"""Converters for standard ops onnx2torch 1.5 lacks that a gradient must cross, registered when imported.

Each missing op between two weights split the graph: the layers after it were passed through untrained and
uncompressed (the dynamo exporter writes ``torch.sinh`` as ``Sinh``, ``F.grid_sample`` as ``GridSample``), or,
where onnx's version converter had no way down (``GridSample`` 20), the model did not import at all.

- ``Sinh``, ``Cosh``, ``Asinh``, ``Acosh``, ``Atanh`` (opset 9), ``Shrink`` (9), ``ThresholdedRelu`` (10),
  ``CastLike`` (15).
- ``GridSample``: opset 16 (modes ``bilinear`` / ``nearest`` / ``bicubic``) in the default domain, opset 20 (the
  same modes named ``linear`` / ``nearest`` / ``cubic``) moved to ``normalize.STASH_DOMAIN``; 4-D and 5-D inputs
  (bicubic 4-D only), as ``torch.nn.functional.grid_sample`` computes them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from onnx2torch.node_converters.registry import add_converter
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OnnxToTorchModule, OperationConverterResult, onnx_mapping_from_node
from torch import nn

from onnx_admm.converters.errors import UserError


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
        return F.grid_sample(x, grid.to(x.dtype), mode=self.mode, padding_mode=self.padding_mode,
                             align_corners=self.align_corners)


def _attr(node: OnnxNode, name: str, default):
    value = node.attributes.get(name, default)
    return value.decode() if isinstance(value, bytes) else value


def convert_grid_sample(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:  # noqa: ARG001
    module = OnnxGridSample(_attr(node, "mode", "bilinear"), _attr(node, "padding_mode", "zeros"),
                            bool(_attr(node, "align_corners", 0)))
    return OperationConverterResult(module, onnx_mapping_from_node(node))


def _register(op: str, version: int, factory: Callable[[OnnxNode], nn.Module]) -> None:
    def convert(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:  # noqa: ARG001
        return OperationConverterResult(factory(node), onnx_mapping_from_node(node))

    add_converter(operation_type=op, version=version)(convert)


for _op, _function in (("Sinh", torch.sinh), ("Cosh", torch.cosh), ("Asinh", torch.asinh), ("Acosh", torch.acosh),
                       ("Atanh", torch.atanh)):
    _register(_op, 9, lambda node, f=_function: _Elementwise(f))
_register("Shrink", 9, lambda node: OnnxShrink(float(_attr(node, "bias", 0.0)), float(_attr(node, "lambd", 0.5))))
_register("ThresholdedRelu", 10, lambda node: OnnxThresholdedRelu(float(_attr(node, "alpha", 1.0))))
_register("CastLike", 15, lambda node: OnnxCastLike())
add_converter(operation_type="GridSample", version=16)(convert_grid_sample)
