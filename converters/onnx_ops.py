"""Node converters onnx2torch 1.5 lacks, registered with its ``add_converter`` when this module is imported.

- ``LSTM``, ``GRU``, ``RNN``: ``converters.recurrent``.
- skl2onnx's ``Scaler``, ``Imputer``, ``Normalizer`` and ``Binarizer`` (ai.onnx.ml, stashed:
  ``normalize.ML_STASHED_OPS``): ``converters.ml_ops``.
- The private ops that spell onnxruntime's fused transformer ops (``converters.fused``): ``converters.fused_ops``.
- ``GlobalMaxPool`` (opset 1).
- ``OneHot`` (opsets 9 and 11: tf2onnx writes it for byte and token inputs), any ``axis``, negative
  indices counted from ``depth``, out-of-range indices giving the off value everywhere.
- ``Trilu`` (opset 14): both exporters write a transformer decoder's causal mask with it
  (``nn.Transformer`` with ``tgt_is_causal``); without it the import stopped there and the decoder was
  passed through untrained.
- Unary ops, ``Shrink``, ``ThresholdedRelu``, ``CastLike``, ``GridSample`` and more: ``converters.extra_ops``.
- Nodes no gradient crosses, moved to ``ort_nodes.ORT_DOMAIN``: ``converters.ort_nodes.OrtNode``.
- ``LessOrEqual`` / ``GreaterOrEqual`` 16 (``converters.onnx_versions``: the version 12 converter).
- Ops the normalize pass moves to ``normalize.STASH_DOMAIN``: those onnx's version converter cannot
  bring down to opset 17 (``Attention`` 23 and ``RMSNormalization`` 23, which the dynamo exporter writes at
  opset 23, ``Gelu`` 20, ``Mish`` 18, ``Split`` 18, ``Pad`` 18+, ``GlobalMaxPool`` 22,
  ``ConstantOfShape`` 20: onnx2torch's opset 9 converter, the same op; ``GridSample`` 20, ``ScatterElements`` 18),
  and those onnx2torch mishandles: ``Pad`` from opset 11 (reflect/edge on trailing dims only), ``Clip``
  with an empty or run-time bound, ``LayerNormalization`` whose input shape is unknown (sized from its
  scale here), ``AveragePool`` with pads that differ between the ends of an axis or SAME padding and
  ``ConvTranspose`` with such pads (``converters.padding``). Each is implemented at its newest semantics, which cover the older ones.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from onnx2torch.node_converters.layer_norm import OnnxLayerNorm
from onnx2torch.node_converters.registry import add_converter, get_converter
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OnnxMapping, OnnxToTorchModule, OperationConverterResult, onnx_mapping_from_node
from torch import nn

from onnx_admm.converters import onnx_versions, recurrent  # noqa: F401 - register converters when imported
from onnx_admm.converters.extra_ops import (  # and registers the other extra converters
    convert_grid_sample, convert_scatter_elements, simple_converter)
from onnx_admm.converters.ml_ops import convert_binarizer, convert_imputer, convert_normalizer, convert_scaler
from onnx_admm.converters.attention import OnnxAttention
from onnx_admm.converters.fused_ops import OnnxRmsNormalize  # registers the private ops' converters too
from onnx_admm.converters.normalize import ML_STASHED_OPS, STASH_DOMAIN, STASHED_OPS
from onnx_admm.converters.ort_nodes import ORT_DOMAIN, ORT_OP, OrtNode
from onnx_admm.converters.padding import convert_average_pool, convert_conv_transpose

class OnnxGlobalMaxPool(nn.Module, OnnxToTorchModule):
    """Max over every spatial axis (all axes after N, C), keeping them as size 1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return x.amax(dim=tuple(range(2, x.dim())), keepdim=True) if x.dim() > 2 else x


class OnnxGelu(nn.Module, OnnxToTorchModule):
    def __init__(self, approximate: str) -> None:
        super().__init__()
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return F.gelu(x, approximate=self.approximate)


class OnnxMish(nn.Module, OnnxToTorchModule):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return F.mish(x)


class OnnxSplit18(nn.Module, OnnxToTorchModule):
    """Split with sizes as an input, or ``num_outputs`` chunks (the last one smaller when uneven)."""

    def __init__(self, axis: int, n_outputs: int) -> None:
        super().__init__()
        self.axis = axis
        self.n_outputs = n_outputs

    def forward(self, x: torch.Tensor, split: torch.Tensor | None = None):  # noqa: D102
        if split is not None:
            sizes = [int(s) for s in split.tolist()]
        else:
            size = x.shape[self.axis]
            chunk = -(-size // self.n_outputs)
            sizes = [min(chunk, size - k * chunk) for k in range(self.n_outputs)]
        parts = torch.split(x, sizes, dim=self.axis)
        return parts[0] if self.n_outputs == 1 else tuple(parts)


class OnnxPad18(nn.Module, OnnxToTorchModule):
    """Pad at any opset from 11 on: ``pads`` (and ``axes``, 18+) as inputs; constant, reflect, edge and
    wrap modes on any axis; negative pads crop."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        if mode not in ("constant", "reflect", "edge", "wrap"):
            raise NotImplementedError(f"Pad mode {mode!r} is not supported")
        self.mode = mode

    def forward(  # noqa: D102
        self,
        x: torch.Tensor,
        pads: torch.Tensor,
        constant_value: torch.Tensor | None = None,
        axes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        rank = x.dim()
        pad_list = [int(p) for p in pads.tolist()]
        axis_list = [int(a) % rank for a in axes.tolist()] if axes is not None else list(range(rank))
        n = len(axis_list)
        begins, ends = pad_list[:n], pad_list[n:]
        if self.mode == "constant":
            torch_pads: list[int] = [0] * (2 * rank)
            for axis, b, e in zip(axis_list, begins, ends):
                torch_pads[2 * (rank - 1 - axis)] = b
                torch_pads[2 * (rank - 1 - axis) + 1] = e
            value = float(constant_value) if constant_value is not None and constant_value.numel() else 0.0
            return F.pad(x, torch_pads, mode="constant", value=value)
        for axis, b, e in zip(axis_list, begins, ends):
            if b or e:
                x = x.index_select(axis, self._indices(x.shape[axis], b, e, x.device))
        return x

    def _indices(self, size: int, begin: int, end: int, device) -> torch.Tensor:
        idx = torch.arange(-begin, size + end, device=device)
        if self.mode == "edge":
            return idx.clamp(0, size - 1)
        if self.mode == "wrap":
            return idx.remainder(size)
        if size == 1:
            return torch.zeros_like(idx)
        period = 2 * (size - 1)  # reflect: ... 2 1 | 0 1 2 ... n-1 | n-2 ...
        idx = idx.remainder(period)
        return torch.where(idx >= size, period - idx, idx)


class OnnxClipAny(nn.Module, OnnxToTorchModule):
    """Clip whose bounds may be absent (empty input names) or computed at run time."""

    def forward(  # noqa: D102
        self, x: torch.Tensor, min: torch.Tensor | None = None, max: torch.Tensor | None = None  # noqa: A002
    ) -> torch.Tensor:
        if min is None and max is None:
            return x
        return torch.clamp(x, min, max)


def _layer_norm(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    """LayerNormalization sized from its scale, not from the inferred input shape (which may be unknown)."""
    axis = int(node.attributes.get("axis", -1))
    eps = float(node.attributes.get("epsilon", 1e-5))
    names = list(node.input_values[1:])
    if axis < 0 and all(n in graph.initializers for n in names if n):
        scale = graph.initializers[names[0]].to_torch()
        bias = graph.initializers[names[1]].to_torch() if len(names) > 1 and names[1] else None
        if scale.dim() == -axis:
            module = nn.LayerNorm(tuple(scale.shape), eps=eps, bias=bias is not None)
            with torch.no_grad():
                module.weight.copy_(scale)
                if bias is not None:
                    module.bias.copy_(bias)
            mapping = OnnxMapping(inputs=(node.input_values[0],), outputs=node.output_values)
            return OperationConverterResult(module, mapping)
    return OperationConverterResult(OnnxLayerNorm(axis=axis, epsilon=eps), onnx_mapping_from_node(node))


def _attention(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:  # noqa: ARG001
    a = node.attributes
    module = OnnxAttention(bool(a.get("is_causal", 0)), float(a.get("scale", 0.0)), int(a.get("q_num_heads", 0)),
                           int(a.get("kv_num_heads", 0)), len(node.output_values))
    return OperationConverterResult(module, onnx_mapping_from_node(node))


_STASH_CONVERTERS: dict[str, Callable[[OnnxNode, OnnxGraph], OperationConverterResult]] = {
    "GlobalMaxPool": simple_converter(lambda node: OnnxGlobalMaxPool()),
    "Gelu": simple_converter(lambda node: OnnxGelu(node.attributes.get("approximate", "none"))),
    "Mish": simple_converter(lambda node: OnnxMish()),
    "Split": simple_converter(lambda node: OnnxSplit18(int(node.attributes.get("axis", 0)), len(node.output_values))),
    "Pad": simple_converter(lambda node: OnnxPad18(node.attributes.get("mode", "constant"))),
    "Clip": simple_converter(lambda node: OnnxClipAny()),
    "LayerNormalization": _layer_norm,
    "RMSNormalization": simple_converter(lambda node: OnnxRmsNormalize(float(node.attributes.get("epsilon", 1e-5)),
                                                              int(node.attributes.get("axis", -1)))),
    "Attention": _attention,
    "AveragePool": convert_average_pool,
    "ConvTranspose": convert_conv_transpose,
    # The same op as opset 9's (20 adds element types): onnx's version converter has no way down for it.
    "ConstantOfShape": get_converter(domain="", operation_type="ConstantOfShape", version=9),
    "Binarizer": convert_binarizer,
    "Imputer": convert_imputer,
    "Normalizer": convert_normalizer,
    "Scaler": convert_scaler,
    "GridSample": convert_grid_sample,
    "ScatterElements": convert_scatter_elements,
}
if set(_STASH_CONVERTERS) != STASHED_OPS | ML_STASHED_OPS:
    raise ImportError(f"normalize.STASHED_OPS {sorted(STASHED_OPS | ML_STASHED_OPS)} and onnx_ops disagree: "
                      f"{sorted(_STASH_CONVERTERS)}")

for _op, _converter in _STASH_CONVERTERS.items():
    add_converter(operation_type=_op, version=1, domain=STASH_DOMAIN)(_converter)
add_converter(operation_type="GlobalMaxPool", version=1)(_STASH_CONVERTERS["GlobalMaxPool"])
add_converter(operation_type=ORT_OP, version=1, domain=ORT_DOMAIN)(simple_converter(lambda node: OrtNode(node.proto)))



class OnnxOneHot(nn.Module, OnnxToTorchModule):
    """OneHot(indices, depth, values=[off, on]) along ``axis``; the result has the dtype of ``values``."""

    def __init__(self, axis: int) -> None:
        super().__init__()
        self.axis = axis

    def forward(self, indices: torch.Tensor, depth: torch.Tensor, values: torch.Tensor) -> torch.Tensor:  # noqa: D102
        n = int(depth.reshape(-1)[0])
        idx = indices.long()
        idx = torch.where(idx < 0, idx + n, idx)
        valid = (idx >= 0) & (idx < n)
        hot = F.one_hot(idx.clamp(0, n - 1), n) & valid.unsqueeze(-1).long()
        off, on = values.reshape(-1)[0], values.reshape(-1)[1]
        out = torch.where(hot.bool(), on, off)
        axis = self.axis if self.axis >= 0 else out.dim() + self.axis
        return out if axis == out.dim() - 1 else out.movedim(-1, axis)


for _version in (9, 11):
    add_converter(operation_type="OneHot", version=_version)(
        simple_converter(lambda node: OnnxOneHot(int(node.attributes.get("axis", -1)))))


class OnnxTrilu(nn.Module, OnnxToTorchModule):
    """Trilu(x, k): the upper (``upper=1``) or lower triangle of the last two dims, from diagonal ``k``."""

    def __init__(self, upper: bool) -> None:
        super().__init__()
        self.upper = upper

    def forward(self, x: torch.Tensor, k: torch.Tensor | None = None) -> torch.Tensor:  # noqa: D102
        diagonal = 0 if k is None else int(k.reshape(-1)[0])
        return torch.triu(x, diagonal) if self.upper else torch.tril(x, diagonal)


add_converter(operation_type="Trilu", version=14)(
    simple_converter(lambda node: OnnxTrilu(bool(node.attributes.get("upper", 1)))))
