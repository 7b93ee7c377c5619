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


def _keep(mask: torch.Tensor | None, unidirectional: bool, b: int, s: int, total: int, device) -> torch.Tensor | None:
    """[B or 1, 1, S or 1, T] booleans: which of the T keys each of the S queries attends to (None: all).

    A 1-D mask gives each row's end (keys at or past it are masked; with 2B entries, also its start), a 2-D
    [B, T] or 3-D [B, S, T] one masks its zero entries; ``unidirectional`` masks the keys after a query's
    position (the past's keys come first).
    """
    keys = torch.arange(total, device=device)
    keep = None
    if mask is not None:
        if mask.dim() == 1:
            keep = keys < mask[:b].reshape(b, 1)
            if mask.numel() == 2 * b:
                keep = keep & (keys >= mask[b:].reshape(b, 1))
            keep = keep[:, None, None, :]
        elif mask.dim() == 2:
            keep = (mask != 0)[:, None, None, :]
        elif mask.dim() == 3:
            keep = (mask != 0)[:, None]
        else:  # onnxruntime's CPU kernel refuses the 4-D (Megatron) mask too
            raise ValueError(f"a {mask.dim()}-D attention mask is not supported")
    if unidirectional:
        queries = torch.arange(s, device=device) + (total - s)
        causal = (keys[None, :] <= queries[:, None])[None, None]
        keep = causal if keep is None else keep & causal
    return keep


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None, mask_filter_value: float,
            scale: float, bias: torch.Tensor | None) -> torch.Tensor:
    """softmax(scale * q k^T + mask_filter_value where not kept (+ bias)) v over heads [B, N, S or T, h], as
    [B, S, N * h_v]: the mask is added to the scores as onnxruntime adds it, so a fully masked row comes out as
    its kernel's does."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * (scale or 1.0 / math.sqrt(q.shape[-1]))
    if keep is not None:
        scores = scores + torch.where(keep, 0.0, mask_filter_value).to(scores.dtype)
    if bias is not None:
        scores = scores + bias
    out = torch.matmul(torch.softmax(scores, -1), v)
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, L, N * h] -> [B, N, L, h]; a tensor already [B, N, L, h] is kept."""
    return t if t.dim() == 4 else t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)


class OnnxAttentionCore(nn.Module, OnnxToTorchModule):
    """com.microsoft.Attention after its projection: ``qkv`` [B, S, q + k + v] split into heads, the keys and
    values after the ``past`` ones (given "p"), the mask_index ("m") and attention_bias ("b") as ``_keep`` and
    ``_attend`` take them; ``present`` stacks the keys and values [2, B, heads, T, head size]."""

    def __init__(self, heads: int, sizes: list[int], unidirectional: bool, mask_filter_value: float,
                 scale: float, given: str, present: bool) -> None:
        super().__init__()
        self.heads, self.sizes, self.unidirectional = heads, sizes, unidirectional
        self.mask_filter_value, self.scale, self.given, self.present = mask_filter_value, scale, given, present

    def forward(self, qkv: torch.Tensor, *extra: torch.Tensor):  # noqa: D102
        given = dict(zip(self.given, extra))
        q, k, v = (_heads(t, self.heads) for t in (qkv.split(self.sizes, -1) if self.sizes else qkv.chunk(3, -1)))
        if "p" in given:
            k, v = torch.cat([given["p"][0], k], 2), torch.cat([given["p"][1], v], 2)
        keep = _keep(given.get("m"), self.unidirectional, qkv.shape[0], qkv.shape[1], k.shape[2], qkv.device)
        out = _attend(q, k, v, keep, self.mask_filter_value, self.scale, given.get("b"))
        return (out, torch.stack([k, v])) if self.present else out


class OnnxMultiHeadCore(nn.Module, OnnxToTorchModule):
    """com.microsoft.MultiHeadAttention: query [B, S, D], key and value [B, L, D] (or already [B, N, L, h], a
    cross-attention's cached keys), given as letters: "k" key, "v" value, "q" bias [D + D + D_v] added to the
    three (to the query only where key and value come as heads), "m" key_padding_mask, "b" attention_bias,
    "K" / "V" past_key / past_value [B, N, P, h] before the keys; outputs the result and, when asked, the
    present keys and values [B, N, T, h]."""

    def __init__(self, heads: int, unidirectional: bool, mask_filter_value: float, scale: float, given: str,
                 presents: int) -> None:
        super().__init__()
        self.heads, self.unidirectional, self.mask_filter_value = heads, unidirectional, mask_filter_value
        self.scale, self.given, self.presents = scale, given, presents

    def forward(self, query: torch.Tensor, *extra: torch.Tensor):  # noqa: D102
        given = dict(zip(self.given, extra))
        if "k" not in given or "v" not in given or query.dim() != 3:
            raise ValueError("MultiHeadAttention with packed query, key and value is not supported")
        q, k, v = query, given["k"], given["v"]
        if "q" in given:
            d = q.shape[-1]
            q = q + given["q"][:d]
            if k.dim() == 3:
                k, v = k + given["q"][d:2 * d], v + given["q"][2 * d:]
        q, k, v = (_heads(t, self.heads) for t in (q, k, v))
        if "K" in given:
            k, v = torch.cat([given["K"], k], 2), torch.cat([given["V"], v], 2)
        keep = _keep(given.get("m"), self.unidirectional, q.shape[0], q.shape[2], k.shape[2], query.device)
        out = _attend(q, k, v, keep, self.mask_filter_value, self.scale, given.get("b"))
        return (out, k, v)[:1 + self.presents] if self.presents else out


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
