"""onnx2torch converters for the private ops ``converters.fused`` spells onnxruntime's fused ops with,
registered under ``fused.FUSED_DOMAIN`` when this module is imported (``converters.onnx_ops`` imports it).

None has a weight: the weights stay with the standard MatMul, Gather, LayerNormalization and Mul nodes
around them. Each computes what onnxruntime's CPU kernel computes (tests/test_fused.py compares them).
"""

from __future__ import annotations

import torch
from onnx2torch.node_converters.registry import add_converter
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OnnxToTorchModule, OperationConverterResult, onnx_mapping_from_node
from torch import nn

from onnx_admm.converters.attention import OnnxAttentionCore, OnnxMultiHeadCore
from onnx_admm.converters.fused import FUSED_DOMAIN


class OnnxMaskIndex(nn.Module, OnnxToTorchModule):
    """EmbedLayerNormalization's mask_index: each row's count of nonzero mask entries (int32), or zeros."""

    def __init__(self, counts: bool) -> None:
        super().__init__()
        self.counts = counts

    def forward(self, mask: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if not self.counts:
            return torch.zeros(mask.shape[0], dtype=torch.int32, device=mask.device)
        return (mask != 0).sum(1).to(torch.int32)


class OnnxPositions(nn.Module, OnnxToTorchModule):
    """The positions 0 .. S-1 of ``ids`` [B, S], as [1, S] int64 (EmbedLayerNormalization without position ids)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)


class OnnxRmsNormalize(nn.Module, OnnxToTorchModule):
    """x / sqrt(mean(x^2 over the axes from ``axis`` on) + epsilon) (times ``scale`` when given: ONNX's
    RMSNormalization of opset 23), in float32 as onnxruntime computes it."""

    def __init__(self, epsilon: float, axis: int = -1) -> None:
        super().__init__()
        self.epsilon, self.axis = epsilon, axis

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:  # noqa: D102
        wide = x.float()
        axes = tuple(range(self.axis % x.dim(), x.dim()))
        out = (wide * torch.rsqrt(wide.pow(2).mean(axes, keepdim=True) + self.epsilon)).to(x.dtype)
        return out if scale is None else out * scale


def _attention(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:  # noqa: ARG001
    a = node.attributes
    module = OnnxAttentionCore(int(a["num_heads"]), [int(x) for x in a.get("qkv_hidden_sizes", [])],
                               bool(a.get("unidirectional", 0)), float(a.get("mask_filter_value", -10000.0)),
                               float(a.get("scale", 0.0)), str(a.get("given", "")), bool(a.get("present", 0)))
    return OperationConverterResult(module, onnx_mapping_from_node(node))


def _multi_head(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:  # noqa: ARG001
    a = node.attributes
    module = OnnxMultiHeadCore(int(a["num_heads"]), bool(a.get("unidirectional", 0)),
                               float(a.get("mask_filter_value", -10000.0)), float(a.get("scale", 0.0)),
                               str(a.get("given", "")), int(a.get("presents", 0)))
    return OperationConverterResult(module, onnx_mapping_from_node(node))


def _mask_index(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:  # noqa: ARG001
    return OperationConverterResult(OnnxMaskIndex(bool(node.attributes.get("counts", 1))), onnx_mapping_from_node(node))


def _positions(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:  # noqa: ARG001
    return OperationConverterResult(OnnxPositions(), onnx_mapping_from_node(node))


def _rms_normalize(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:  # noqa: ARG001
    return OperationConverterResult(OnnxRmsNormalize(float(node.attributes.get("epsilon", 1e-6))),
                                    onnx_mapping_from_node(node))


for _op, _converter in (("AttentionCore", _attention), ("MultiHeadCore", _multi_head), ("MaskIndex", _mask_index),
                        ("Positions", _positions), ("RmsNormalize", _rms_normalize)):
    add_converter(operation_type=_op, version=1, domain=FUSED_DOMAIN)(_converter)
