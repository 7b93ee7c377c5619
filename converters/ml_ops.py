"""Converters of the ai.onnx.ml preprocessing ops skl2onnx writes ahead of a model. The normalize pass moves
those nodes to ``normalize.STASH_DOMAIN`` (onnx2torch names modules after the domain, and ``ai.onnx.ml`` has
dots), where ``converters.onnx_ops`` registers these converters.

A scikit-learn pipeline such as ``make_pipeline(StandardScaler(), MLPClassifier())`` exports as a ``Scaler``
node feeding the network (``SimpleImputer``: an ``Imputer`` node). Without a converter every trainable tensor
depended on that node, and the whole model failed to import. Each works along the last axis (the features):

- ``Scaler``: ``Y = (X - offset) * scale``, float output; ``offset`` and ``scale`` hold one value or one per
  feature.
- ``Normalizer`` (scikit-learn's Normalizer): each row divided by its max, L1 or L2 norm; ``Binarizer``: 1 above the
  threshold, else 0.
- ``Imputer``: entries equal to ``replaced_value_float`` (NaN, its usual value, matches NaN) take the imputed
  value of their feature (``imputed_value_floats``, one or one per feature); integer inputs use the int64
  attributes. Data whose NaN marks a value the graph imputes is accepted as such
  (``graphinfo.graph_inputs``: ``InputSpec.imputes_nan``).
"""

from __future__ import annotations

import math

import torch
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OnnxToTorchModule, OperationConverterResult, onnx_mapping_from_node
from torch import nn


class OnnxScaler(nn.Module, OnnxToTorchModule):
    """(x - offset) * scale along the last axis, in float32 whatever the input's type (the op's output type)."""

    def __init__(self, offset: list[float], scale: list[float]) -> None:
        super().__init__()
        self.register_buffer("offset", torch.tensor(offset or [0.0], dtype=torch.float32))
        self.register_buffer("scale", torch.tensor(scale or [1.0], dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return (x.to(torch.float32) - self.offset) * self.scale


class OnnxImputer(nn.Module, OnnxToTorchModule):
    """Entries equal to ``replaced`` (NaN matches NaN) replaced by their feature's imputed value (last axis)."""

    def __init__(self, imputed: list[float] | list[int], replaced: float | int, integer: bool) -> None:
        super().__init__()
        self.register_buffer("imputed", torch.tensor(imputed, dtype=torch.int64 if integer else torch.float32))
        self.replaced = replaced

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        missing = x.isnan() if isinstance(self.replaced, float) and math.isnan(self.replaced) else x == self.replaced
        return torch.where(missing, self.imputed.to(x.dtype), x)


class OnnxNormalizer(nn.Module, OnnxToTorchModule):
    """Each row (last axis) divided by its max (MAX: the largest value, signed, as onnxruntime divides), its sum
    of absolute values (L1) or its Euclidean norm (L2)."""

    def __init__(self, norm: str) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = x.to(torch.float32)
        if self.norm == "MAX":
            return x / x.amax(dim=-1, keepdim=True)
        if self.norm == "L1":
            return x / x.abs().sum(dim=-1, keepdim=True)
        return x / x.square().sum(dim=-1, keepdim=True).sqrt()


class OnnxBinarizer(nn.Module, OnnxToTorchModule):
    """1 where x > threshold, else 0, in the input's type."""

    def __init__(self, threshold: float) -> None:
        super().__init__()
        self.threshold = threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return (x > self.threshold).to(x.dtype)


def convert_normalizer(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:  # noqa: ARG001
    norm = node.attributes.get("norm", "MAX")
    norm = norm.decode() if isinstance(norm, bytes) else str(norm)
    if norm not in ("MAX", "L1", "L2"):
        raise NotImplementedError(f"Normalizer norm {norm!r} (MAX, L1 and L2 are defined)")
    return OperationConverterResult(OnnxNormalizer(norm), onnx_mapping_from_node(node))


def convert_binarizer(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:  # noqa: ARG001
    module = OnnxBinarizer(float(node.attributes.get("threshold", 0.0)))
    return OperationConverterResult(module, onnx_mapping_from_node(node))


def convert_scaler(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:  # noqa: ARG001
    a = node.attributes
    module = OnnxScaler([float(v) for v in a.get("offset", [])], [float(v) for v in a.get("scale", [])])
    return OperationConverterResult(module, onnx_mapping_from_node(node))


def convert_imputer(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:  # noqa: ARG001
    a = node.attributes
    floats = a.get("imputed_value_floats")
    if floats:
        module = OnnxImputer([float(v) for v in floats], float(a.get("replaced_value_float", 0.0)), integer=False)
    else:
        module = OnnxImputer([int(v) for v in a.get("imputed_value_int64s", [])],
                             int(a.get("replaced_value_int64", 0)), integer=True)
    return OperationConverterResult(module, onnx_mapping_from_node(node))
