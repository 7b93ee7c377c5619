"""onnx2torch converters for the private ops ``converters.fused`` spells onnxruntime's fused ops with,
registered under ``fused.FUSED_DOMAIN`` when this module is imported (``converters.onnx_ops`` imports it).

None has a weight: the weights stay with the standard MatMul, Gather, LayerNormalization and Mul nodes
around them. Each computes what onnxruntime's CPU kernel computes (tests/test_fused.py compares them).
"""

from __future__ import annotations

import math

import torch
from onnx2torch.node_converters.registry import add_converter
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OnnxToTorchModule, OperationConverterResult, onnx_mapping_from_node
from torch import nn

from onnx_admm.converters.fused import FUSED_DOMAIN


class OnnxAttentionCore(nn.Module, OnnxToTorchModule):
    """The heads of com.microsoft.Attention after its projection: ``qkv`` [B, S, q + k + v] split into heads,
    keys and values after the ``past`` ones, ``softmax(scale * q k^T + mask (+ attention_bias)) v``.

    The mask adds ``mask_filter_value`` where a key is masked: by a 1-D mask_index (the keys at or past each
    row's end; with 2B entries, also before its start), a 2-D [B, T] or 3-D [B, S, T] mask (entries 0), and
    after a query's position where ``unidirectional``. ``present`` stacks the keys and values [2, B, heads, T, head size].
    """

    def __init__(self, heads: int, sizes: list[int], unidirectional: bool, mask_filter_value: float,
                 scale: float, given: str, present: bool) -> None:
        super().__init__()
        self.heads, self.sizes, self.unidirectional = heads, sizes, unidirectional
        self.mask_filter_value, self.scale, self.given, self.present = mask_filter_value, scale, given, present

    def forward(self, qkv: torch.Tensor, *extra: torch.Tensor):  # noqa: D102
        given = dict(zip(self.given, extra))
        b, s, _ = qkv.shape
        q, k, v = qkv.split(self.sizes, -1) if self.sizes else qkv.chunk(3, -1)
        q, k, v = (t.reshape(b, s, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        past = given.get("p")
        if past is not None:
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
        total = k.shape[2]
        scale = self.scale or 1.0 / math.sqrt(q.shape[-1])
        scores = torch.matmul(q, k.transpose(-1, -2)) * scale
        keep = self._keep(given.get("m"), b, s, total, qkv.device)
        if keep is not None:
            scores = scores + torch.where(keep, 0.0, self.mask_filter_value).to(scores.dtype)
        if "b" in given:
            scores = scores + given["b"]
        out = torch.matmul(torch.softmax(scores, -1), v).transpose(1, 2).reshape(b, s, -1)
        return (out, torch.stack([k, v])) if self.present else out

    def _keep(self, mask: torch.Tensor | None, b: int, s: int, total: int, device) -> torch.Tensor | None:
        """[B or 1, 1, S or 1, T] booleans: which keys each query attends to (None: all)."""
        keys = torch.arange(total, device=device)
        keep = None
        if mask is not None:
            if mask.dim() == 1:
                end = mask[:b].reshape(b, 1)
                keep = keys < end
                if mask.numel() == 2 * b:
                    keep = keep & (keys >= mask[b:].reshape(b, 1))
                keep = keep[:, None, None, :]
            elif mask.dim() == 2:
                keep = (mask != 0)[:, None, None, :]
            elif mask.dim() == 3:
                keep = (mask != 0)[:, None]
            else:  # onnxruntime's CPU kernel refuses the 4-D (Megatron) mask too
                raise ValueError(f"Attention's {mask.dim()}-D mask_index is not supported")
        if self.unidirectional:
            queries = torch.arange(s, device=device) + (total - s)
            causal = (keys[None, :] <= queries[:, None])[None, None]
            keep = causal if keep is None else keep & causal
        return keep


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
    """x / sqrt(mean(x^2 over the last axis) + epsilon), in float32 as onnxruntime computes it."""

    def __init__(self, epsilon: float) -> None:
        super().__init__()
        self.epsilon = epsilon

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        wide = x.float()
        return (wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + self.epsilon)).to(x.dtype)


def _attention(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:  # noqa: ARG001
    a = node.attributes
    module = OnnxAttentionCore(int(a["num_heads"]), [int(x) for x in a.get("qkv_hidden_sizes", [])],
                               bool(a.get("unidirectional", 0)), float(a.get("mask_filter_value", -10000.0)),
                               float(a.get("scale", 0.0)), str(a.get("given", "")), bool(a.get("present", 0)))
    return OperationConverterResult(module, onnx_mapping_from_node(node))


def _mask_index(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:  # noqa: ARG001
    return OperationConverterResult(OnnxMaskIndex(bool(node.attributes.get("counts", 1))), onnx_mapping_from_node(node))


def _positions(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:  # noqa: ARG001
    return OperationConverterResult(OnnxPositions(), onnx_mapping_from_node(node))


def _rms_normalize(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:  # noqa: ARG001
    return OperationConverterResult(OnnxRmsNormalize(float(node.attributes.get("epsilon", 1e-6))),
                                    onnx_mapping_from_node(node))


for _op, _converter in (("AttentionCore", _attention), ("MaskIndex", _mask_index), ("Positions", _positions),
                        ("RmsNormalize", _rms_normalize)):
    add_converter(operation_type=_op, version=1, domain=FUSED_DOMAIN)(_converter)
