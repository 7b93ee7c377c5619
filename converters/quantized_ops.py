"""The rewrites of onnxruntime's integer operators into float operators, one per op type
(``REWRITES``), for ``converters.quantized.dequantize_model``.

A rewrite takes the rewriter (its constant table and fresh names), the node, the graph's producers and
readers and the set of nodes already removed; it returns the float nodes that replace the node, or
None where the node is left as it is (a weight that is not constant, a Softmax axis that means
something else before opset 13).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np
import onnx
from onnx import helper

from onnx_admm.converters.graphinfo import node_attr

class _Rewriter(Protocol):
    """What a rewrite asks of ``converters.quantized``'s rewriter."""

    def const(self, name: str) -> np.ndarray | None:
        """The value of a constant tensor (None: not a constant)."""

    def fresh(self, base: str) -> str:
        """A tensor or node name not yet used in the graph."""

    def add_init(self, base: str, value: np.ndarray) -> str:
        """A new float initializer; returns its name."""


def _dequantized(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, axis: int) -> np.ndarray:
    """``(q - zero_point) * scale`` in float32, with a per-channel scale / zero point along ``axis``."""
    shape = [1] * q.ndim
    scale = np.asarray(scale, dtype=np.float32).reshape(-1)
    zp = np.zeros(1, np.int64) if zero_point is None else np.asarray(zero_point).astype(np.int64).reshape(-1)
    if scale.size > 1 or zp.size > 1:
        shape[axis] = -1
    return ((q.astype(np.int64) - zp.reshape(shape)).astype(np.float32) * scale.reshape(shape)).astype(np.float32)


# ----------------------------------------------------------------------------------------------------
# Rewrites: (rewriter, node, producers, readers, removed ids) -> replacement nodes, or None to keep it
# ----------------------------------------------------------------------------------------------------

def _float_node(op_type: str, inputs: list[str], outputs: list[str], name: str, node: onnx.NodeProto | None,
                drop: tuple[str, ...] = ()) -> onnx.NodeProto:
    new = helper.make_node(op_type, inputs, outputs, name=name)
    if node is not None:
        new.attribute.extend(a for a in node.attribute if a.name not in drop)
    return new


def _integer_op(rw: _Rewriter, node, producers, readers, removed) -> list[onnx.NodeProto] | None:
    """ConvInteger / MatMulInteger of quantize_dynamic: DynamicQuantizeLinear(x) and a constant weight
    in, int32 -> Cast -> Mul(scale_x * scale_w) out; becomes Conv / MatMul of x and the float weight."""
    conv = node.op_type == "ConvInteger"
    a, b = node.input[0], node.input[1]
    a_zp = node.input[2] if len(node.input) > 2 else ""
    b_zp = node.input[3] if len(node.input) > 3 else ""
    casts = readers.get(node.output[0], [])
    if len(casts) != 1 or casts[0].op_type != "Cast":
        return None
    cast = casts[0]
    muls = readers.get(cast.output[0], [])
    if len(muls) != 1 or muls[0].op_type != "Mul":
        return None
    mul = muls[0]
    scales_name = mul.input[1] if mul.input[0] == cast.output[0] else mul.input[0]
    scales = producers.get(scales_name)
    operands = []
    for q, zp in ((a, a_zp), (b, b_zp)):
        dql = _dynamic_quantizer(q, producers)
        if dql is not None:
            operands.append(("dynamic", dql))
        elif rw.const(q) is not None:
            operands.append(("const", zp))
        else:
            return None
    if scales is None or scales.op_type != "Mul":
        return None
    dynamic_scales = [d.output[1] for kind, d in operands if kind == "dynamic"]
    others = [s for s in scales.input if s not in dynamic_scales]
    if len(others) != sum(kind == "const" for kind, _ in operands) or len(set(scales.input)) != 2:
        return None
    inputs = []
    for index, ((kind, info), q) in enumerate(zip(operands, (a, b))):
        if kind == "dynamic":
            inputs.append(info.input[0])
            continue
        if index == 0 or rw.const(others[0]) is None:
            return None  # a constant left operand (weight times activation) is not a quantizer pattern
        value, scale, zp = rw.const(q), rw.const(others[0]), rw.const(info)
        if conv:
            axis = 0
        elif value.ndim == 2:
            axis = 1
        else:
            return None
        inputs.append(rw.add_init(q, _dequantized(value, scale, zp, axis)))
    op = "Conv" if conv else "MatMul"
    removed.update({id(cast), id(mul)})
    return [_float_node(op, inputs, [mul.output[0]], node.name, node if conv else None)]


def _lstm(rw: _Rewriter, node, producers, readers, removed) -> list[onnx.NodeProto] | None:
    """com.microsoft.DynamicQuantizeLSTM: W [D, in, 4H] and R [D, H, 4H] int8 -> LSTM's [D, 4H, in/H] floats."""
    names = list(node.input) + [""] * (12 - len(node.input))
    x, w, r, bias, lens, h0, c0, p, w_s, w_zp, r_s, r_zp = names[:12]
    floats = []
    for q, s, zp in ((w, w_s, w_zp), (r, r_s, r_zp)):
        value, scale, zero = rw.const(q), rw.const(s), rw.const(zp)
        if value is None or scale is None:
            return None
        d, _, gates = value.shape
        scale = np.broadcast_to(np.asarray(scale, np.float32).reshape(d, -1), (d, gates))[:, None, :]
        zero = np.zeros((d, 1, 1), np.int64) if zero is None else np.broadcast_to(
            np.asarray(zero).astype(np.int64).reshape(d, -1), (d, gates))[:, None, :]
        value = ((value.astype(np.int64) - zero).astype(np.float32) * scale).transpose(0, 2, 1)
        floats.append(rw.add_init(q, value.astype(np.float32)))
    inputs = [x, floats[0], floats[1], bias, lens, h0, c0, p]
    while inputs and not inputs[-1]:
        inputs.pop()
    return [_float_node("LSTM", inputs, list(node.output), node.name, node)]


def _dynamic_matmul(rw: _Rewriter, node, producers, readers, removed) -> list[onnx.NodeProto] | None:
    """com.microsoft.DynamicQuantizeMatMul(A, B int8, scale, zero point, bias) -> MatMul (+ Add)."""
    names = list(node.input) + [""] * (5 - len(node.input))
    a, b, s, zp, bias = names[:5]
    value, scale = rw.const(b), rw.const(s)
    if value is None or scale is None or value.ndim != 2:
        return None
    return _matmul(rw, node, a, rw.add_init(b, _dequantized(value, scale, rw.const(zp), 1)), bias)


def _dynamic_quantizer(name: str, producers) -> onnx.NodeProto | None:
    """The DynamicQuantizeLinear whose integers ``name`` is (None: ``name`` is no such output)."""
    dql = producers.get(name)
    return dql if dql is not None and dql.op_type == "DynamicQuantizeLinear" and dql.output[0] == name else None


def _dynamic_input(name: str, producers) -> str | None:
    """The float tensor a DynamicQuantizeLinear quantized into ``name`` (None: ``name`` is no such output)."""
    dql = _dynamic_quantizer(name, producers)
    return None if dql is None else dql.input[0]


def _contrib(op_type: str, inputs: list[str], node: onnx.NodeProto) -> onnx.NodeProto:
    """The float com.microsoft op the quantized one stands for, with its name, outputs and attributes."""
    while inputs and not inputs[-1]:
        inputs.pop()
    new = helper.make_node(op_type, inputs, list(node.output), name=node.name, domain="com.microsoft")
    new.attribute.extend(node.attribute)
    return new


def _integer_to_float(rw: _Rewriter, node, producers, readers, removed) -> list[onnx.NodeProto] | None:
    """com.microsoft.MatMulIntegerToFloat (an InferenceSession's saved optimized graph of a quantize_dynamic
    model): A from a DynamicQuantizeLinear, B an integer constant with its scale and zero point, a bias ->
    MatMul of the float input and weight (+ Add)."""
    names = list(node.input) + [""] * (7 - len(node.input))
    a, b, _a_scale, b_scale, _a_zp, b_zp, bias = names[:7]
    source, value, scale = _dynamic_input(a, producers), rw.const(b), rw.const(b_scale)
    if source is None or value is None or scale is None or value.ndim != 2:
        return None
    return _matmul(rw, node, source, rw.add_init(b, _dequantized(value, scale, rw.const(b_zp), 1)), bias)


def _gathered(rw: _Rewriter, node, producers, readers, removed) -> list[onnx.NodeProto] | None:
    """DequantizeLinear(Gather(integer table, ids)) with one scale (an InferenceSession's saved graph of a
    quantize_dynamic model moves an embedding's DequantizeLinear after its Gather) -> Gather of the float table.
    Every other DequantizeLinear is left to the passes that know it (None)."""
    gather = producers.get(node.input[0])
    if gather is None or gather.op_type != "Gather" or len(readers.get(gather.output[0], [])) != 1:
        return None
    table, scale = rw.const(gather.input[0]), rw.const(node.input[1])
    zero_point = rw.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if table is None or scale is None or np.size(scale) != 1 or table.dtype.kind not in "iu":
        return None
    removed.add(id(gather))
    floats = rw.add_init(gather.input[0], _dequantized(table, scale, zero_point, 0))
    return [_float_node("Gather", [floats, gather.input[1]], list(node.output), node.name, gather)]


def _qattention(rw: _Rewriter, node, producers, readers, removed) -> list[onnx.NodeProto] | None:
    """com.microsoft.QAttention (quantize_dynamic of a model onnxruntime's optimizer fused): the input from a
    DynamicQuantizeLinear, the packed q/k/v weights int8 with a scale and zero point (per tensor or per
    column) -> com.microsoft.Attention of the float input and weights (``converters.fused`` imports it)."""
    names = list(node.input) + [""] * (9 - len(node.input))
    x, w, bias, _x_scale, w_scale, mask, _x_zp, w_zp, past = names[:9]
    source, value, scale = _dynamic_input(x, producers), rw.const(w), rw.const(w_scale)
    if source is None or value is None or scale is None or value.ndim != 2:
        return None
    weight = rw.add_init(w, _dequantized(value, scale, rw.const(w_zp), 1))
    return [_contrib("Attention", [source, weight, bias, mask, past], node)]


def _qembed_norm(rw: _Rewriter, node, producers, readers, removed) -> list[onnx.NodeProto] | None:
    """com.microsoft.QEmbedLayerNormalization: word, position and segment tables, gamma and beta as integers
    with one scale and zero point each -> com.microsoft.EmbedLayerNormalization of their float values."""
    names = list(node.input) + [""] * (18 - len(node.input))
    floats = []
    for k in range(5):
        q, scale = names[2 + k], rw.const(names[8 + k])
        value = rw.const(q) if q else None
        if q and (value is None or scale is None):
            return None
        floats.append(rw.add_init(q, _dequantized(value, scale, rw.const(names[13 + k]), 0)) if q else "")
    word, position, segment, gamma, beta = floats
    return [_contrib("EmbedLayerNormalization", [names[0], names[1], word, position, segment, gamma, beta, names[7]],
                     node)]


def _matmul(rw: _Rewriter, node: onnx.NodeProto, a: str, weight: str, bias: str) -> list[onnx.NodeProto]:
    """MatMul(a, weight) under the node's name and outputs, then Add(bias) where there is one."""
    if not bias:
        return [_float_node("MatMul", [a, weight], list(node.output), node.name, None)]
    product = rw.fresh(f"{node.output[0]}_matmul")
    return [_float_node("MatMul", [a, weight], [product], node.name, None),
            _float_node("Add", [product, bias], list(node.output), rw.fresh(f"{node.name}/bias"), None)]


def _unpacked(packed: np.ndarray, bits: int) -> np.ndarray:
    """The codes of ``bits``-bit values packed low-first into the bytes of ``packed``: one axis ``8 / bits``
    times longer at the end."""
    per = 8 // bits
    mask = (1 << bits) - 1
    codes = np.stack([(packed >> (bits * i)) & mask for i in range(per)], axis=-1)
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * per).astype(np.int64)


def _nbits(rw: _Rewriter, node, producers, readers, removed) -> list[onnx.NodeProto] | None:
    """com.microsoft.MatMulNBits (onnxruntime's blockwise weight-only quantizer, ``MatMulNBitsQuantizer``):
    Y = A @ W^T (+ bias), W [N, K] from the codes of B [N, k_blocks, blob] packed low-first along K, one scale
    and zero point (packed uint8, or floats; 2 ** (bits - 1) when absent) per block -> MatMul (+ Add)."""
    names = list(node.input) + [""] * (6 - len(node.input))
    a, b, s, zp, g_idx, bias = names[:6]
    packed, scales = rw.const(b), rw.const(s)
    k, n = node_attr(node, "K"), node_attr(node, "N")
    bits, block = node_attr(node, "bits", 4), node_attr(node, "block_size")
    if (packed is None or scales is None or g_idx or bits not in (2, 4, 8) or None in (k, n, block)
            or packed.ndim != 3 or packed.shape[0] != n or packed.shape[2] * 8 // bits != block):
        return None  # a deprecated g_idx, prepacked or computed weights: left as it is (and refused by name)
    blocks = packed.shape[1]
    codes = _unpacked(packed, bits).reshape(n, blocks, block)
    if not zp:
        zero = np.full((n, blocks), 1 << (bits - 1), np.float32)
    elif (points := rw.const(zp)) is None:
        return None
    elif points.dtype == np.uint8:  # packed like the codes, each row padded to whole bytes
        zero = _unpacked(points.reshape(n, -1), bits)[:, :blocks].astype(np.float32)
    else:
        zero = points.astype(np.float32).reshape(n, blocks)
    scale = scales.astype(np.float32).reshape(n, blocks)
    weight = ((codes - zero[..., None]) * scale[..., None]).reshape(n, blocks * block)[:, :k]
    return _matmul(rw, node, a, rw.add_init(b, np.ascontiguousarray(weight.T).astype(np.float32)), bias)


def _gather_blocks(rw: _Rewriter, node, producers, readers, removed) -> list[onnx.NodeProto] | None:
    """com.microsoft.GatherBlockQuantized (the same quantizer's embedding tables): int4 data with one scale (and
    zero point) per block of ``block_size`` along ``quantize_axis`` -> Gather of the float table along
    ``gather_axis``. Packed uint8 data is left as it is (and refused by name): its default zero point is not
    checked here."""
    names = list(node.input) + [""] * (4 - len(node.input))
    data, indices, s, zp = names[:4]
    table, scales = rw.const(data), rw.const(s)
    if table is None or scales is None or str(table.dtype) != "int4" or table.ndim != scales.ndim:
        return None
    axis, block = node_attr(node, "quantize_axis", 1) % table.ndim, node_attr(node, "block_size", 128)
    zero = rw.const(zp) if zp else np.zeros(scales.shape, np.int64)
    if zero is None:
        return None
    # Each scale and zero point repeated over its block, the last block cut to the table's length.
    scale, zero = (np.repeat(np.asarray(v).astype(np.float32), block, axis=axis).take(
        np.arange(table.shape[axis]), axis=axis) for v in (scales, zero))
    floats = rw.add_init(data, ((table.astype(np.float32) - zero) * scale).astype(np.float32))
    return [helper.make_node("Gather", [floats, indices], list(node.output), name=node.name,
                             axis=node_attr(node, "gather_axis", 0))]


def _static(op_type: str, quantized: Callable[[onnx.NodeProto], list[tuple[str, str, str]]],
            output_qparams: Callable[[onnx.NodeProto], tuple[str, str]],
            extra: Callable[[_Rewriter, onnx.NodeProto], list[str] | None] | None = None,
            drop: tuple[str, ...] = ("channels_last",)):
    """A rewrite of a QLinear* operator: DequantizeLinear of each quantized (tensor, scale, zero point),
    the float ``op_type`` (constant operands folded to floats), QuantizeLinear of the output."""

    def rewrite(rw: _Rewriter, node, producers, readers, removed):
        if node_attr(node, "channels_last", 0):
            return None
        nodes, inputs = [], []
        for k, (q, s, zp) in enumerate(quantized(node)):
            if rw.const(q) is not None and rw.const(s) is not None:
                axis = 1 if op_type == "MatMul" else 0
                inputs.append(rw.add_init(q, _dequantized(rw.const(q), rw.const(s), rw.const(zp), axis)))
                continue
            name = rw.fresh(f"{q}_dequantized")
            nodes.append(helper.make_node("DequantizeLinear", [q, s] + ([zp] if zp else []), [name],
                                          name=rw.fresh(f"{node.name}/dequantize_{k}")))
            inputs.append(name)
        more = extra(rw, node) if extra else []
        if more is None:
            return None
        y_s, y_zp = output_qparams(node)
        out = node.output[0]
        if y_s:
            result = rw.fresh(f"{out}_float")
            nodes.append(_float_node(op_type, inputs + more, [result], node.name, node, drop))
            nodes.append(helper.make_node("QuantizeLinear", [result, y_s] + ([y_zp] if y_zp else []), [out],
                                          name=rw.fresh(f"{node.name}/quantize")))
        else:
            nodes.append(_float_node(op_type, inputs + more, [out], node.name, node, drop))
        return nodes

    return rewrite


def _at(node: onnx.NodeProto, *indices: int) -> tuple[str, ...]:
    return tuple(node.input[i] if i < len(node.input) else "" for i in indices)


def _bias(index: int, a_scale: int, b_scale: int):
    """The int32 bias input at ``index`` as floats: the quantizer stores ``bias / (a_scale * b_scale)``
    with zero point 0 (``b_scale`` per output channel)."""

    def extra(rw: _Rewriter, node: onnx.NodeProto) -> list[str] | None:
        (name,) = _at(node, index)
        if not name:
            return []
        value, sa, sb = rw.const(name), rw.const(node.input[a_scale]), rw.const(node.input[b_scale])
        if value is None or sa is None or sb is None:
            return None
        scale = np.asarray(sa, np.float32).reshape(-1) * np.asarray(sb, np.float32).reshape(-1)
        if scale.size > 1 and value.ndim == 2:
            scale = scale.reshape(1, -1)  # a QGemm bias [M, N] scaled per column
        return [rw.add_init(name, (value.astype(np.float32) * scale).astype(np.float32))]

    return extra


def _concat_inputs(node: onnx.NodeProto) -> list[tuple[str, str, str]]:
    rest = list(node.input[2:])
    return [tuple(rest[i:i + 3]) for i in range(0, len(rest), 3)]


def _unary(op_type: str, drop: tuple[str, ...] = ("channels_last",)):
    return _static(op_type, lambda n: [_at(n, 0, 1, 2)], lambda n: _at(n, 3, 4), drop=drop)


def _binary(op_type: str):
    return _static(op_type, lambda n: [_at(n, 0, 1, 2), _at(n, 3, 4, 5)], lambda n: _at(n, 6, 7))


def _softmax(rw: _Rewriter, node, producers, readers, removed):
    # Before opset 13 Softmax flattened the trailing dims: only the last axis means the same in both.
    if int(node_attr(node, "opset", 13)) < 13 and int(node_attr(node, "axis", -1)) != -1:
        return None
    return _static("Softmax", lambda n: [_at(n, 0, 1, 2)], lambda n: _at(n, 3, 4),
                   drop=("channels_last", "opset"))(rw, node, producers, readers, removed)


def _gemm(rw: _Rewriter, node, producers, readers, removed):
    """com.microsoft.QGemm: A quantized, B a quantized constant (per channel along N), C int32 -> Gemm."""
    b, s, zp = _at(node, 3, 4, 5)
    if rw.const(b) is None or rw.const(s) is None:
        return None
    axis = 0 if node_attr(node, "transB", 0) else 1
    weight = rw.add_init(b, _dequantized(rw.const(b), rw.const(s), rw.const(zp), axis))
    bias = _bias(6, 1, 4)

    def extra(rw2: _Rewriter, n: onnx.NodeProto) -> list[str] | None:
        c = bias(rw2, n)
        return None if c is None else [weight] + c

    return _static("Gemm", lambda n: [_at(n, 0, 1, 2)], lambda n: _at(n, 7, 8), extra=extra)(
        rw, node, producers, readers, removed)


REWRITES: dict[str, Callable] = {
    "ConvInteger": _integer_op,
    "MatMulInteger": _integer_op,
    "DynamicQuantizeLSTM": _lstm,
    "DynamicQuantizeMatMul": _dynamic_matmul,
    "MatMulNBits": _nbits,
    "MatMulIntegerToFloat": _integer_to_float,
    "DequantizeLinear": _gathered,
    "QAttention": _qattention,
    "QEmbedLayerNormalization": _qembed_norm,
    "GatherBlockQuantized": _gather_blocks,
    "QLinearConv": _static("Conv", lambda n: [_at(n, 0, 1, 2), _at(n, 3, 4, 5)], lambda n: _at(n, 6, 7),
                           extra=_bias(8, 1, 4)),
    "QLinearMatMul": _static("MatMul", lambda n: [_at(n, 0, 1, 2), _at(n, 3, 4, 5)], lambda n: _at(n, 6, 7)),
    "QGemm": _gemm,
    "QLinearAdd": _binary("Add"),
    "QLinearMul": _binary("Mul"),
    "QLinearSoftmax": _softmax,
    "QLinearSigmoid": _unary("Sigmoid"),
    "QLinearLeakyRelu": _unary("LeakyRelu"),
    "QLinearGlobalAveragePool": _unary("GlobalAveragePool"),
    "QLinearAveragePool": _unary("AveragePool"),
    "QLinearConcat": _static("Concat", _concat_inputs, lambda n: _at(n, 0, 1)),
}
