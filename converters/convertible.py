"""Which part of a graph onnx2torch can convert: the nodes it has no converter for, and the largest
convertible sub-model that computes float tensors from trainable weights (``converters.importer``'s
module doc says how the rest of the graph passes through)."""

from __future__ import annotations

import onnx
from onnx import defs, helper
from onnx2torch.node_converters import get_converter

from onnx_admm.converters import onnx_ops  # noqa: F401 - registers the extra onnx2torch converters
from onnx_admm.converters.errors import STRING_INPUT_FIX, UserError
from onnx_admm.converters.graphinfo import FLOAT_TYPES, subgraph_reads, weight_dependent
from onnx_admm.converters.shapes import inferred_types


def unsupported_nodes(normalized: onnx.ModelProto) -> list[str]:
    """One line per node onnx2torch has no converter for: node name, op type, domain and opset."""
    opsets = {o.domain: o.version for o in normalized.opset_import}
    problems = []
    for node in normalized.graph.node:
        if not _has_converter(node, opsets):
            domain, version = _domain_version(node, opsets)
            where = f"{domain}." if domain else ""
            problems.append(f"node {node.name!r}: {where}{node.op_type} (opset {version}) has no converter")
    return problems


def _domain_version(node: onnx.NodeProto, opsets: dict[str, int]) -> tuple[str, int]:
    domain = "" if node.domain == "ai.onnx" else node.domain
    return domain, opsets.get(domain, opsets.get("ai.onnx", 0))


def _has_converter(node: onnx.NodeProto, opsets: dict[str, int]) -> bool:
    domain, version = _domain_version(node, opsets)
    try:
        get_converter(domain=domain, operation_type=node.op_type, version=version)
    except NotImplementedError:
        return False
    return True


def trainable_part(normalized: onnx.ModelProto, problems: list[str]) -> tuple[onnx.ModelProto, list[str]]:
    """The sub-model onnx2torch converts and the tensors it outputs (module doc).

    Args:
        normalized: the normalized copy.
        problems: ``unsupported_nodes(normalized)``.

    Returns the normalized model itself and its graph outputs when every node converts.

    Raises:
        UserError: an unconverted op is not a standard ONNX op (onnxruntime could not run the part
            passed through), or no float tensor that depends on a trainable weight can be computed.
    """
    graph = normalized.graph
    if not problems:
        return normalized, [o.name for o in graph.output]
    opsets = {o.domain: o.version for o in normalized.opset_import}
    bad = [node for node in graph.node if not _has_converter(node, opsets)]
    invalid = [n for n in bad if n.domain in ("", "ai.onnx") and not defs.has(n.op_type)]
    if invalid:
        # tf2onnx writes ComplexAbs and Log1p (tf.abs of a complex STFT, tf.math.log1p) as if they were ONNX ops.
        raise UserError(f"cannot import the model: node {invalid[0].name!r}: {invalid[0].op_type} is not an ONNX "
                        f"operator, so the file is not valid ONNX (onnxruntime refuses to load it too); re-export "
                        "the model without it")
    if any(not defs.has(n.op_type, _domain_version(n, opsets)[0]) for n in bad):
        _raise_unsupported(problems, "")
    bad_ids = {id(n) for n in bad}  # by identity: protobuf == compares whole messages
    inits = {t.name: t for t in graph.initializer}
    available = {v.name for v in graph.input} | set(inits) | {""}
    converted: list[onnx.NodeProto] = []
    for node in graph.node:
        if id(node) not in bad_ids and all(name in available for name in node.input):
            converted.append(node)
            available.update(node.output)
    producer = {out: node for node in converted for out in node.output}
    converted_ids = {id(n) for n in converted}
    # A Loop/If/Scan body reads outer tensors by name, not as inputs of its node (tf2onnx's Keras GRU reads the
    # sequence the layer before computed): those are read by the rest too.
    read_by_rest = {name for node in graph.node if id(node) not in converted_ids
                    for name in [*node.input, *subgraph_reads(node)]}
    candidates = [o.name for o in graph.output if o.name in producer]
    candidates += [out for node in converted for out in node.output if out in read_by_rest and out not in candidates]
    types = inferred_types(normalized)
    dependent = weight_dependent(normalized)
    trained = [name for name in candidates if types.get(name, (0,))[0] in FLOAT_TYPES and name in dependent]
    if not trained:
        strings = [v.name for v in graph.input if v.type.tensor_type.elem_type == onnx.TensorProto.STRING]
        if strings:
            raise UserError(f"cannot import the model: input {strings[0]!r} is a string tensor, and torch holds no "
                            f"strings; {STRING_INPUT_FIX}")
        _raise_unsupported(problems, ", and no float tensor that depends on a trainable weight can be computed "
                                     "without it")
    return _sub_model(normalized, trained, producer, types), trained


# tf2onnx writes a Keras GRU, SimpleRNN or ConvLSTM2D (and an LSTM it cannot fuse) as a Loop over the time steps;
# unrolled (Keras: unroll=True) the same layer exports as plain ops, which import and train.
LOOP_MARK = ": Loop (opset"
LOOP_FIX = ("export a recurrent layer unrolled (Keras: unroll=True) or as ONNX's LSTM / GRU / RNN op instead of a "
            "Loop")

# com.microsoft ops that onnxruntime's quantizers write (the others come from its optimizer's fusions).
_MS_QUANTIZED = ("Quant", "NBits", "Bnb4", "FpQ4", "QAttention", "QOrdered", "QLinear", "QGemm", "QEmbed")


def _raise_unsupported(problems: list[str], why: str) -> None:
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    contrib = [p for p in problems if "com.microsoft." in p]
    if any(marker in p for p in contrib for marker in _MS_QUANTIZED):
        fix = "compress the float model before onnxruntime's quantizer ran (--bits then stores integer weights)"
    elif contrib:
        # onnxruntime's transformer optimizer fuses a model's attention, layer norms and GELUs into com.microsoft
        # ops (optimum's ORTOptimizer too): the unfused export it started from imports.
        fix = "compress the model as exported, before onnxruntime's optimizer fused it (then optimize the result)"
    elif LOOP_MARK in problems[0]:
        fix = LOOP_FIX
    else:
        fix = "re-export without that op"
    raise UserError(
        f"cannot import the model: {problems[0]}{more}{why}; run `onnx-admm inspect` for the full list, or {fix}"
    )


def _sub_model(model: onnx.ModelProto, outputs: list[str], producer: dict, types: dict) -> onnx.ModelProto:
    """The nodes computing ``outputs`` (in graph order), the inputs and initializers they read."""
    needed: set[int] = set()
    stack = list(outputs)
    while stack:
        node = producer.get(stack.pop())
        if node is not None and id(node) not in needed:
            needed.add(id(node))
            stack.extend(node.input)
    nodes = [n for n in model.graph.node if id(n) in needed]
    read = {name for n in nodes for name in n.input}
    graph = helper.make_graph(
        nodes,
        model.graph.name,
        [v for v in model.graph.input if v.name in read],
        [onnx.ValueInfoProto(name=name) for name in outputs],
        [t for t in model.graph.initializer if t.name in read],
    )
    for value, name in zip(graph.output, outputs):
        elem_type, dims = types[name]
        value.CopyFrom(helper.make_tensor_value_info(name, elem_type, list(dims) if dims is not None else None))
    sub = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    sub.metadata_props.extend(model.metadata_props)
    return sub
