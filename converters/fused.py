"""onnxruntime's fused transformer ops, spelled in standard ops for the import (``unfuse``).

onnxruntime's transformer optimizer (``onnxruntime.transformers.optimizer``, optimum's ORTOptimizer)
replaces a model's attention, layer norms, GELUs and embeddings with com.microsoft ops that onnx2torch
has no converter for: Attention, EmbedLayerNormalization, SkipLayerNormalization, BiasGelu, FastGelu ...
Their weights stay plain float initializers that the fused node reads. ``unfuse`` rewrites a copy of the
graph in which each such node becomes the standard ops it stands for, reading the same initializers and
writing the same output tensors. The import then trains the weights as MatMul, Gather and
LayerNormalization weights, and write-back, which goes by tensor name, puts the new values into the fused
graph the user gave, which keeps its speed. What has no standard spelling at every opset and no weight
(the attention's scores, mask and softmax; a mask's lengths; the positions 0..S-1; an RMS normalization)
becomes a node of the private domain ``FUSED_DOMAIN``, converted by ``converters.fused_ops``; the layer
norms and GELUs go to ``normalize.STASH_DOMAIN``, whose converters take any opset.

An InferenceSession's saved optimized model (``SessionOptions.optimized_model_filepath``) has FusedConv,
FusedGemm and FusedMatMul: a Conv or Gemm with its activation, a MatMul with transposes and a scale.

A node that asks for more than is spelled here (rotary embeddings, a shared past/present buffer, a layer
norm's mean or inverse deviation read by another node, a transposed constant operand of FusedMatMul) is
left as it is, and the import refuses it by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnx_admm.converters.dequantize import decoded_view
from onnx_admm.converters.graphinfo import Consumer, constant_sources, node_attr, node_label, tensor_names
from onnx_admm.converters.normalize import STASH_DOMAIN
from onnx_admm.converters.shapes import inferred_shapes

FUSED_DOMAIN = "onnx_admm_fused"  # no dots: onnx2torch prefixes module names with the domain
_MS = "com.microsoft"


@dataclass
class Unfused:
    """The unfused copy (or the model itself when nothing was fused) and what the rewrite did."""

    model: onnx.ModelProto
    lines: list[str] = field(default_factory=list)  # one per rewritten node: "Attention 'x' -> MatMul, Add, ..."
    # (view node label, input index) -> (fused node label, op type, input index), for each input of a new
    # node that the fused node read: a weight's readers in the view are named as write-back finds them.
    origin: dict[tuple[str, int], tuple[str, str, int]] = field(default_factory=dict)

    def consumer(self, view_consumer: Consumer) -> Consumer:
        """``view_consumer`` as the node of the fused graph it came from (itself when it was not rewritten)."""
        found = self.origin.get((view_consumer.node, view_consumer.input_index))
        return view_consumer if found is None else Consumer(*found)


class _Builder:
    """The nodes that replace one fused node, named after it."""

    def __init__(self, node: onnx.NodeProto, label: str, taken: set[str]) -> None:
        self.node, self.label, self.taken = node, label, taken
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.origin: dict[tuple[str, int], tuple[str, str, int]] = {}  # Unfused.origin's entries for these nodes

    def input(self, index: int) -> str:
        return self.node.input[index] if index < len(self.node.input) else ""

    def output(self, index: int) -> str:
        return self.node.output[index] if index < len(self.node.output) else ""

    def fresh(self, suffix: str) -> str:
        name, k = f"{self.label}/{suffix}", 1
        while name in self.taken:
            k += 1
            name = f"{self.label}/{suffix}{k}"
        self.taken.add(name)
        return name

    def const(self, suffix: str, value: float) -> str:
        name = self.fresh(suffix)
        self.initializers.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    def add(self, op_type: str, inputs: list[str], output: str | list[str] | None = None, domain: str = "",
            **attrs: object) -> str:
        """A node reading ``inputs`` into ``output`` (a fresh tensor when None; a list for several outputs);
        returns its (first) output."""
        outputs = output if isinstance(output, list) else [output or self.fresh(op_type.lower())]
        name = self.fresh(op_type)
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=name, domain=domain, **attrs))
        fused_inputs = list(self.node.input)
        for k, tensor in enumerate(inputs):
            if tensor and tensor in fused_inputs:
                self.origin[(name, k)] = (self.label, self.node.op_type, fused_inputs.index(tensor))
        return outputs[0]


def _gelu(b: _Builder, x: str, approximate: str) -> None:
    b.add("Gelu", [x], b.output(0), domain=STASH_DOMAIN, approximate=approximate)


def _biased(b: _Builder, x: str, bias_index: int) -> str:
    bias = b.input(bias_index)
    return b.add("Add", [x, bias]) if bias else x


def _rewrite_gelu(b: _Builder) -> bool:
    """Gelu(X) (erf), BiasGelu(A, B) = Gelu(A + B), FastGelu(X, bias) = the tanh approximation of X + bias."""
    op = b.node.op_type
    _gelu(b, _biased(b, b.input(0), 1), "tanh" if op == "FastGelu" else "none")
    return True


def _rewrite_quick_gelu(b: _Builder) -> bool:
    """QuickGelu(X) = X * Sigmoid(alpha * X)."""
    x = b.input(0)
    scaled = b.add("Mul", [x, b.const("alpha", float(node_attr(b.node, "alpha", 1.702)))])
    b.add("Mul", [x, b.add("Sigmoid", [scaled])], b.output(0))
    return True


def _norm_stats_unread(b: _Builder, readers: set[str]) -> bool:
    # Outputs 1 and 2 of the layer norms are the mean and the inverse deviation: not spelled here.
    return not any(b.output(k) in readers for k in (1, 2))


def _rewrite_skip_norm(b: _Builder, readers: set[str]) -> bool:
    """Skip(Simplified)LayerNormalization(input, skip, gamma[, beta][, bias]): the sum input + skip (+ bias),
    output 3 when read, normalized over the last axis (output 0)."""
    if not _norm_stats_unread(b, readers):
        return False
    simplified = b.node.op_type == "SkipSimplifiedLayerNormalization"
    bias_index = 3 if simplified else 4
    total = b.add("Add", [b.input(0), b.input(1)], None if b.input(bias_index) or not b.output(3) else b.output(3))
    if b.input(bias_index):
        total = b.add("Add", [total, b.input(bias_index)], b.output(3) or None)
    eps = float(node_attr(b.node, "epsilon", 1e-12))
    if simplified:
        _rms(b, total, b.input(2), eps)
    else:
        b.add("LayerNormalization", [total, b.input(2), *([b.input(3)] if b.input(3) else [])], b.output(0),
              domain=STASH_DOMAIN, axis=-1, epsilon=eps)
    return True


def _rms(b: _Builder, x: str, scale: str, eps: float) -> None:
    # The scale stays a Mul's operand, so it trains as the layer norms' scales do.
    b.add("Mul", [b.add("RmsNormalize", [x], domain=FUSED_DOMAIN, epsilon=eps), scale], b.output(0))


def _rewrite_simplified_norm(b: _Builder, readers: set[str]) -> bool:
    """SimplifiedLayerNormalization(X, scale) over the last axis (an RMS norm)."""
    if b.output(1) in readers or int(node_attr(b.node, "axis", -1)) != -1:
        return False
    _rms(b, b.input(0), b.input(1), float(node_attr(b.node, "epsilon", 1e-5)))
    return True


def _rewrite_embed_norm(b: _Builder, readers: set[str]) -> bool:
    """EmbedLayerNormalization(ids, segment ids, word, position and segment tables, gamma, beta, mask,
    position ids): the three Gathers summed (output 2), layer-normalized (output 0); output 1 counts each
    row's nonzero mask entries (zeros without a mask), as onnxruntime does."""
    ids = b.input(0)
    total = b.add("Add", [b.add("Gather", [b.input(2), ids]),
                          b.add("Gather", [b.input(3), b.input(8) or b.add("Positions", [ids], domain=FUSED_DOMAIN)])])
    if b.input(1) and b.input(4):
        total = b.add("Add", [total, b.add("Gather", [b.input(4), b.input(1)])])
    if b.output(2):
        total = b.add("Identity", [total], b.output(2))
    b.add("LayerNormalization", [total, b.input(5), b.input(6)], b.output(0), domain=STASH_DOMAIN, axis=-1,
          epsilon=float(node_attr(b.node, "epsilon", 1e-12)))
    if b.output(1) in readers:
        b.add("MaskIndex", [b.input(7) or ids], b.output(1), domain=FUSED_DOMAIN, counts=int(bool(b.input(7))))
    return True


def _rewrite_attention(b: _Builder) -> bool:
    """Attention(input, weights, bias, mask_index, past, attention_bias): MatMul by the packed q/k/v weights
    [in, q + k + v], Add of their bias, then the heads' scaled dot products (``fused_ops.OnnxAttentionCore``)."""
    if any(node_attr(b.node, a, 0) for a in ("do_rotary", "past_present_share_buffer")) or b.input(6):
        return False
    qkv = b.add("MatMul", [b.input(0), b.input(1)])
    if b.input(2):
        qkv = b.add("Add", [qkv, b.input(2)])
    extra = [b.input(k) for k in (3, 4, 5)]
    attrs = {**_attention_attributes(b), "present": int(bool(b.output(1))),
             "given": "".join("mpb"[k] for k, t in enumerate(extra) if t)}
    sizes = [int(s) for s in node_attr(b.node, "qkv_hidden_sizes", [])]
    if sizes:
        attrs["qkv_hidden_sizes"] = sizes
    b.add("AttentionCore", [qkv, *[t for t in extra if t]], [b.output(0)] + ([b.output(1)] if b.output(1) else []),
          domain=FUSED_DOMAIN, **attrs)
    return True


def _attention_attributes(b: _Builder) -> dict[str, object]:
    """The attributes Attention and MultiHeadAttention share, with onnxruntime's defaults."""
    return {"num_heads": int(node_attr(b.node, "num_heads")), "unidirectional": int(node_attr(b.node, "unidirectional", 0)),
            "mask_filter_value": float(node_attr(b.node, "mask_filter_value", -10000.0)),
            "scale": float(node_attr(b.node, "scale", 0.0))}


# MultiHeadAttention's inputs after the query, as the letters OnnxMultiHeadCore knows them by.
_MHA_INPUTS = {1: "k", 2: "v", 3: "q", 4: "m", 5: "b", 6: "K", 7: "V"}


def _rewrite_multi_head(b: _Builder, readers: set[str]) -> bool:
    """MultiHeadAttention(query, key, value, bias, key_padding_mask, attention_bias, past_key, past_value): one
    private node (no weights); packed forms (no key or value), a past length, a beam's cache indices and
    the scores output are not spelled."""
    if not (b.input(1) and b.input(2)) or b.input(8) or b.input(9) or b.output(3) in readers:
        return False
    present = [b.output(1) or b.fresh("present_key"), b.output(2) or b.fresh("present_value")]
    inputs = [b.input(0)] + [b.input(k) for k in _MHA_INPUTS if b.input(k)]
    attrs = {**_attention_attributes(b), "given": "".join(letter for k, letter in _MHA_INPUTS.items() if b.input(k)),
             "presents": 2 if b.output(1) or b.output(2) else 0}
    b.add("MultiHeadCore", inputs, [b.output(0)] + (present if attrs["presents"] else []), domain=FUSED_DOMAIN,
          **attrs)
    return True


# onnxruntime's FusedConv / FusedGemm activations: name -> (op, attribute names of its parameters, in order).
_ACTIVATIONS = {"Relu": ("Relu", ()), "Tanh": ("Tanh", ()), "Sigmoid": ("Sigmoid", ()),
                "LeakyRelu": ("LeakyRelu", ("alpha",)), "HardSigmoid": ("HardSigmoid", ("alpha", "beta"))}


def _activation(b: _Builder, x: str, params: list[float]) -> bool:
    """The node's ``activation`` of ``x`` into output 0 (Clip's bounds as constants of a Clip that takes them
    at any opset); False for one not spelled here."""
    name = node_attr(b.node, "activation", b"")
    name = name.decode() if isinstance(name, bytes) else str(name)
    if name == "Clip" and len(params) == 2:
        b.add("Clip", [x, b.const("min", params[0]), b.const("max", params[1])], b.output(0), domain=STASH_DOMAIN)
        return True
    if name not in _ACTIVATIONS:
        return False
    op, names = _ACTIVATIONS[name]
    b.add(op, [x], b.output(0), **dict(zip(names, params)))
    return True


def _rewrite_fused_conv(b: _Builder) -> bool:
    """FusedConv(X, W, B, Z) = activation(Conv(X, W, B) + Z), from an InferenceSession's saved model."""
    params = [float(p) for p in node_attr(b.node, "activation_params", [])]
    out = b.add("Conv", list(b.node.input[:3]), **_attributes_but_activation(b.node))
    if b.input(3):
        out = b.add("Add", [out, b.input(3)])
    return _activation(b, out, params)


def _rewrite_fused_gemm(b: _Builder) -> bool:
    """FusedGemm(A, B, C) = activation(Gemm(A, B, C)); activation_alpha / _beta are its parameters."""
    params = [float(node_attr(b.node, f"activation_{p}")) for p in ("alpha", "beta")
              if node_attr(b.node, f"activation_{p}") is not None]
    return _activation(b, b.add("Gemm", list(b.node.input), **_attributes_but_activation(b.node)), params)


def _attributes_but_activation(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute if not a.name.startswith("activation")}


def _rewrite_fused_matmul(b: _Builder, ranks: Callable[[str], int | None], constants: set[str]) -> bool:
    """FusedMatMul(A, B) = alpha * MatMul(A or its last two axes swapped (transA), B or swapped (transB)).

    A swapped constant is not spelled: the import would take its Transpose for a decoder the fused graph lacks.
    """
    if node_attr(b.node, "transBatchA", 0) or node_attr(b.node, "transBatchB", 0):
        return False
    operands = []
    for k, flag in ((0, "transA"), (1, "transB")):
        name = b.input(k)
        if node_attr(b.node, flag, 0):
            rank = ranks(name)
            if rank is None or rank < 2 or name in constants:
                return False
            name = b.add("Transpose", [name], perm=[*range(rank - 2), rank - 1, rank - 2])
        operands.append(name)
    alpha = float(node_attr(b.node, "alpha", 1.0))
    if alpha == 1.0:
        b.add("MatMul", operands, b.output(0))
    else:
        b.add("Mul", [b.add("MatMul", operands), b.const("alpha", alpha)], b.output(0))
    return True


_REWRITES: dict[str, Callable[..., bool]] = {
    "Gelu": _rewrite_gelu, "BiasGelu": _rewrite_gelu, "FastGelu": _rewrite_gelu, "QuickGelu": _rewrite_quick_gelu,
    "SkipLayerNormalization": _rewrite_skip_norm, "SkipSimplifiedLayerNormalization": _rewrite_skip_norm,
    "SimplifiedLayerNormalization": _rewrite_simplified_norm,
    "EmbedLayerNormalization": _rewrite_embed_norm, "Attention": _rewrite_attention,
    "MultiHeadAttention": _rewrite_multi_head,
    "FusedConv": _rewrite_fused_conv, "FusedGemm": _rewrite_fused_gemm, "FusedMatMul": _rewrite_fused_matmul,
}  # fmt: skip
_NEEDS_READERS = {"SkipLayerNormalization", "SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization",
                  "EmbedLayerNormalization", "MultiHeadAttention"}
# onnxruntime registers SimplifiedLayerNormalization in the default domain, the others in com.microsoft.
_DOMAINS = {"SimplifiedLayerNormalization": ("", "ai.onnx", _MS)}


def _fused(node: onnx.NodeProto) -> bool:
    return node.op_type in _REWRITES and node.domain in _DOMAINS.get(node.op_type, (_MS,))


def unfuse(model: onnx.ModelProto) -> Unfused:
    """A copy of ``model`` with onnxruntime's fused ops spelled in standard ops (module doc); ``model`` itself
    when it has none. Nameless nodes of the copy get their labels as names, so every label stays the same."""
    if not any(_fused(n) for n in model.graph.node):
        return Unfused(model)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    for i, node in enumerate(graph.node):
        node.name = node_label(node, i)
    unfused = Unfused(copy)
    taken = tensor_names(copy) | {n.name for n in graph.node}
    readers = ({name for n in graph.node for name in n.input} | {o.name for o in graph.output}) - {""}
    ranks, constants = _ranks(model), set(constant_sources(model))
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if not _fused(node):
            nodes.append(node)
            continue
        builder = _Builder(node, node.name, taken)
        rewrite = _REWRITES[node.op_type]
        if node.op_type in _NEEDS_READERS:
            done = rewrite(builder, readers)
        elif node.op_type == "FusedMatMul":
            done = rewrite(builder, ranks, constants)
        else:
            done = rewrite(builder)
        if not done:
            nodes.append(node)
            continue
        nodes.extend(builder.nodes)
        graph.initializer.extend(builder.initializers)
        unfused.origin.update(builder.origin)
        unfused.lines.append(f"{node.op_type} {node.name!r} -> {', '.join(n.op_type for n in builder.nodes)}")
    del graph.node[:]
    graph.node.extend(nodes)
    for domain in (STASH_DOMAIN, FUSED_DOMAIN):
        if not any(o.domain == domain for o in copy.opset_import):
            copy.opset_import.append(helper.make_opsetid(domain, 1))
    return unfused


def _ranks(model: onnx.ModelProto) -> Callable[[str], int | None]:
    """A tensor's rank: an initializer's, else from shape inference (run once, when first asked)."""
    known = {t.name: len(t.dims) for t in model.graph.initializer}
    inferred: list[dict] = []

    def rank(name: str) -> int | None:
        if name in known:
            return known[name]
        if not inferred:
            inferred.append(inferred_shapes(model))
        shape = inferred[0].get(name)
        return None if shape is None else len(shape)

    return rank


def weights_view(model: onnx.ModelProto) -> tuple[onnx.ModelProto, set[str]]:
    """``dequantize.decoded_view`` of the unfused model: every weight a float constant that a standard op
    reads, for the code that counts and lists weights (storage, inspect, the report)."""
    return decoded_view(unfuse(model).model)
