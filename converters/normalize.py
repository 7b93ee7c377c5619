"""Normalize a COPY of a model so onnx2torch 1.5 can import what real exporters write.

Each pass is a small function ``pass(model) -> bool`` that rewrites the model in place and says
whether it changed anything (the onnx-ir pass shape). ``normalize`` runs them in order on a deep copy;
the caller's model is never touched, because write-back needs the original graph byte for byte.

Measured on torch 2.14 exports: opset 20 → 17 plus the cleanups below made LeNet-5,
ResNet-18, MobileNetV2, VGG-11 and a transformer layer import and match onnxruntime.

onnx's version converter has no way down for some ops (Gelu 20, Mish 18, Split 18, Pad 18+, ConstantOfShape 20,
GlobalMaxPool 22, GridSample 20, ScatterElements 18: "No Adapter ...") and one failure stops the whole conversion.
Before converting, ``stash_ops`` moves such nodes to the private domain ``STASH_DOMAIN``, where the converter
leaves them alone and ``converters.onnx_ops`` registers onnx2torch converters for them at their newest semantics.
Nodes onnx2torch mishandles go there too: Pad from opset 11 (it pads reflect/edge only on trailing
dims), Clip with an empty or computed bound (it wants constants), LayerNormalization whose input
shape inference cannot tell (it sizes the layer from that shape).
``unbake_batch`` (``converters.batch_axis``) frees a batch size baked into fixed-shape exports;
``annotate_unknown_ranks`` (``converters.ranks``) gives rank-dependent nodes the input rank shape
inference could not.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import onnx
from onnx import defs, helper, numpy_helper, version_converter

from onnx_admm.converters.batch_axis import unbake_batch
from onnx_admm.converters.dequantize import computed_from_constants, fold_weight_decoders
from onnx_admm.converters.errors import UserError, first_line
from onnx_admm.converters.evaluate import evaluate
from onnx_admm.converters.graphinfo import (constant_node_value, constant_sources, identity_aliases, live_nodes,
                                            node_attr, node_label, sparse_to_dense)
from onnx_admm.converters.optable import RECURRENT_CONSTANT_INPUTS
from onnx_admm.converters.ort_nodes import run_in_onnxruntime
from onnx_admm.converters.ranks import annotate_unknown_ranks
from onnx_admm.converters.shapes import inferred_shapes, inferred_types, record_output_types, static_shapes

logger = logging.getLogger(__name__)

# onnx2torch registers most converters up to opset 13-17.
TARGET_OPSET = 17
# Below this, some ops onnx2torch has only at later versions: such a model is raised to UPGRADE_OPSET for import.
OLDEST_CONVERTED, UPGRADE_OPSET = 11, 13

Pass = Callable[[onnx.ModelProto], bool]

# Nodes onnx2torch (after down-conversion) cannot take are moved to this domain; converters.onnx_ops
# registers a converter for every op in STASHED_OPS there.
STASH_DOMAIN = "onnx_admm_stash"  # no dots: onnx2torch prefixes module names with the domain
STASHED_OPS = frozenset({"Attention", "AveragePool", "Clip", "ConstantOfShape", "ConvTranspose", "Gelu",
                         "GlobalMaxPool", "GridSample", "LayerNormalization", "Mish", "Pad", "RMSNormalization",
                         "ScatterElements", "Split"})
# skl2onnx's preprocessing ops of the ai.onnx.ml domain, always stashed: onnx2torch cannot name a module after a
# domain with dots in it (converters.ml_ops).
ML_STASHED_OPS = frozenset({"Binarizer", "Imputer", "Normalizer", "Scaler"})

# Ops whose ``auto_pad = SAME_UPPER / SAME_LOWER`` onnx2torch refuses ("not implemented"): Keras-era
# converters (tf2onnx where a shape is unknown, keras2onnx, tflite and CoreML converters) write it.
# ``explicit_auto_pad`` spells it out as ``pads`` (ConvTranspose's SAME, another output size, separately).
AUTO_PAD_OPS = frozenset({"AveragePool", "Conv", "LpPool", "MaxPool"})


def _default_opset(model: onnx.ModelProto) -> int:
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            return opset.version
    return 0


def name_nodes(model: onnx.ModelProto) -> bool:
    """Give nameless nodes the label ``graphinfo.node_label`` computes on the original graph.

    onnx2torch names modules after nodes, so this keeps module -> original node lookups exact.
    Must run first, while node positions still match the original.
    """
    changed = False
    for index, node in enumerate(model.graph.node):
        if not node.name:
            node.name = node_label(node, index)
            changed = True
    return changed


def clear_negative_dims(model: onnx.ModelProto) -> bool:
    """Declared dims of -1 (paddle2onnx's and tf2onnx's dynamic batch) become unknown dims.

    Shape inference, the batch rules and onnx2torch would otherwise read -1 as a size.
    """
    graph = model.graph
    changed = False
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_value") and dim.dim_value < 0:
                dim.Clear()
                changed = True
    return changed


def dropout_to_identity(model: onnx.ModelProto) -> bool:
    """Dropout is the identity at inference (onnx2torch has no converter for it before opset 10): make
    it an Identity under the same name, unless a node or the graph reads its mask output."""
    read = {name for node in model.graph.node for name in node.input} | {o.name for o in model.graph.output}
    changed = False
    for node in model.graph.node:
        if node.op_type == "Dropout" and node.domain in ("", "ai.onnx") and (len(node.output) < 2 or not node.output[1] or node.output[1] not in read):
            replacement = helper.make_node("Identity", [node.input[0]], [node.output[0]], name=node.name)
            node.CopyFrom(replacement)
            changed = True
    return changed


def initializer_inputs_to_constants(model: onnx.ModelProto) -> bool:
    """Graph inputs that have an initializer (every weight before IR 4, and ``keep_initializers_as_inputs``
    exports) stop being inputs: their initializer is their value. onnx2torch made such an input a placeholder
    wherever a node reads it at run time (a Reshape's shape), and a later pass that folds the initializer
    away (a Reshape of a weight) left an input nobody feeds. The data cannot feed them either
    (``graphinfo.graph_inputs``), so the default is the value. IR 4 is the first where that is valid."""
    graph = model.graph
    inits = {t.name for t in graph.initializer} | {t.values.name for t in graph.sparse_initializer}
    kept = [v for v in graph.input if v.name not in inits]
    if len(kept) == len(graph.input):
        return False
    del graph.input[:]
    graph.input.extend(kept)
    model.ir_version = max(model.ir_version, 4)
    return True


def densify_sparse_initializers(model: onnx.ModelProto) -> bool:
    """onnx2torch cannot read graph.sparse_initializer: turn each into a dense initializer."""
    graph = model.graph
    if not graph.sparse_initializer:
        return False
    for sparse in graph.sparse_initializer:
        graph.initializer.append(numpy_helper.from_array(sparse_to_dense(sparse), sparse.values.name))
    del graph.sparse_initializer[:]
    return True


def constants_to_initializers(model: onnx.ModelProto) -> bool:
    """Constant nodes become initializers of the same name (onnx2torch's Conv needs initializers;
    paddle2onnx stores every weight as a Constant node)."""
    graph = model.graph
    keep, changed = [], False
    outputs = {o.name for o in graph.output}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output[0] not in outputs:
            value = constant_node_value(node)
            if value is not None:
                graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
                changed = True
                continue
        keep.append(node)
    if changed:
        del graph.node[:]
        graph.node.extend(keep)
    return changed


def bypass_identity_of_constants(model: onnx.ModelProto) -> bool:
    """Point consumers of Identity(initializer) straight at the initializer and drop the Identity.

    Exporters share one tensor between layers that way; onnx2torch would otherwise see a computed
    value where it needs a constant weight.
    """
    graph = model.graph
    inits = {t.name for t in graph.initializer}
    aliases = {k: v for k, v in identity_aliases(model).items() if v in inits}
    if not aliases:
        return False
    outputs = {o.name for o in graph.output}
    keep = []
    for node in graph.node:
        if node.op_type == "Identity" and node.output[0] in aliases and node.output[0] not in outputs:
            continue
        for i, name in enumerate(node.input):
            if name in aliases:
                node.input[i] = aliases[name]
        keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)
    return True




def fold_recurrent_weights(model: onnx.ModelProto) -> bool:
    """A recurrent op's W / R / B computed from constants (an LSTMCell exported where constant folding did not
    reach, inside an If branch: Unsqueeze of a Concat of gate Slices) becomes an initializer of that name.

    The folded tensor is not one of the original's, so it does not train; the rest of the model does.
    """
    graph = model.graph
    sources = constant_sources(model)
    producers = {out: i for i, node in enumerate(graph.node) for out in node.output if out}
    wanted = []
    for node in graph.node:
        for index in RECURRENT_CONSTANT_INPUTS.get(node.op_type, ()):
            name = node.input[index] if index < len(node.input) else ""
            if (name and name not in sources and name in producers
                    and computed_from_constants(name, graph, sources, producers, moves=None) is not None):
                wanted.append(name)
    if not wanted:
        return False
    wanted = list(dict.fromkeys(wanted))
    for name, value in zip(wanted, next(evaluate(model, wanted, [{}]))):
        graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    # Without their producers; what only fed them goes too.
    keep = live_nodes([n for n in graph.node if not (set(n.output) & set(wanted))], {o.name for o in graph.output})
    del graph.node[:]
    graph.node.extend(keep)
    logger.info("recurrent weights computed from constants, imported as constants (they do not train): %s",
                ", ".join(wanted))
    return True


def convert_opset(model: onnx.ModelProto) -> bool:
    """Convert the default-domain opset down to 17 with onnx's version converter, or up to 13 from below 11."""
    version = _default_opset(model)
    if 0 < version < OLDEST_CONVERTED:
        return _upconvert_opset(model, version)
    if version <= TARGET_OPSET:
        return False
    try:
        converted = version_converter.convert_version(model, TARGET_OPSET)
    except Exception as exc:  # the converter raises bare RuntimeErrors / C++ errors
        raise UserError(
            f"cannot convert the model from opset {version} to {TARGET_OPSET} for import: {first_line(exc)}; "
            f"re-export the model with opset_version={TARGET_OPSET}"
        ) from None
    model.CopyFrom(converted)
    return True


def onnxruntime_nodes(model: onnx.ModelProto) -> bool:
    """Nodes without a torch converter that need no gradient run in onnxruntime (``converters.ort_nodes``)."""
    version = _default_opset(model)
    return run_in_onnxruntime(model, UPGRADE_OPSET if 0 < version < OLDEST_CONVERTED else min(version, TARGET_OPSET))


def _upconvert_opset(model: onnx.ModelProto, version: int) -> bool:
    """An opset-7..10 model raised to 13 for import: onnx2torch converts ``Slice``, ``ArgMax``, ``Dropout``,
    ``IsNaN``, ``NonZero`` (and at 7-8 ``Gemm``, ``BatchNormalization``, ``Flatten``, ``Cast``) only at their
    later versions, so the import stopped at the first of them. Weights keep their names (write-back goes into
    the original graph); where the converter has no adapter the model is imported as it is."""
    try:
        converted = version_converter.convert_version(model, UPGRADE_OPSET)
    except Exception as exc:  # the converter raises bare RuntimeErrors / C++ errors
        logger.info("opset %d kept for import (the version converter cannot raise it to %d: %s)", version,
                    UPGRADE_OPSET, first_line(exc))
        return False
    model.CopyFrom(converted)
    return True


def same_pads(size: int | None, kernel: int, stride: int, dilation: int, upper: bool) -> tuple[int, int] | None:
    """ONNX's SAME padding of one spatial axis: the output is ceil(size / stride), the total padding split
    evenly with the odd one at the end (SAME_UPPER) or the beginning (SAME_LOWER). With stride 1 the
    total is (kernel - 1) * dilation whatever the size, so an unknown size is fine; else None."""
    if size is None and stride != 1:
        return None
    reach = (kernel - 1) * dilation + 1
    total = reach - 1 if stride == 1 else max((-(-size // stride) - 1) * stride + reach - size, 0)
    small, large = total // 2, total - total // 2
    return (small, large) if upper else (large, small)


def _transpose_pads(mode: str, sizes: list, kernel, strides, dilations, output_padding, output_shape):
    """ConvTranspose's pads for SAME (the output is size x stride) or a given ``output_shape``, as the ONNX
    spec derives them: total = stride (size - 1) + output_padding + reach - output, the odd one at the
    beginning unless SAME_UPPER. None when an output_shape meets an unknown size, or the output is larger
    than no padding gives."""
    n = len(kernel)
    if output_shape is None and mode not in ("SAME_UPPER", "SAME_LOWER"):  # VALID
        return [0] * n, [0] * n
    begins, ends = [], []
    for i in range(n):
        reach = output_padding[i] + (kernel[i] - 1) * dilations[i] + 1
        if output_shape is not None:
            if sizes[i] is None:
                return None
            total = strides[i] * (sizes[i] - 1) + reach - list(output_shape)[-n:][i]
        else:  # SAME: the output is size x stride, so the total does not depend on the size
            total = reach - strides[i]
        if total < 0:
            return None
        small, large = total // 2, total - total // 2
        begin, end = (small, large) if mode == "SAME_UPPER" else (large, small)
        begins.append(begin)
        ends.append(end)
    return begins, ends


def explicit_auto_pad(model: onnx.ModelProto) -> bool:
    """Conv, ConvTranspose and pooling nodes with ``auto_pad`` SAME_UPPER / SAME_LOWER / VALID (and
    ConvTranspose with ``output_shape``, which onnx2torch ignores) get the ``pads`` it means. SAME needs the
    input's spatial sizes from shape inference unless every stride is 1 (a ConvTranspose's SAME never does;
    its output_shape always does); a node whose sizes are unknown is left as it is, for the converters
    (``converters.padding``) to handle or refuse."""
    def wanted(node: onnx.NodeProto) -> bool:
        if node.domain not in ("", "ai.onnx"):
            return False
        automatic = node_attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")
        if node.op_type == "ConvTranspose":
            return automatic or node_attr(node, "output_shape") is not None
        return automatic and node.op_type in AUTO_PAD_OPS

    nodes = [n for n in model.graph.node if wanted(n)]
    if not nodes:
        return False
    inits = {t.name: tuple(t.dims) for t in model.graph.initializer}
    cache: list[dict] = []
    changed = False
    for node in nodes:
        mode = node_attr(node, "auto_pad", b"NOTSET")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        kernel = node_attr(node, "kernel_shape")
        if kernel is None and node.op_type.startswith("Conv") and len(inits.get(node.input[1], ())) > 2:
            kernel = inits[node.input[1]][2:]
        if kernel is None:
            continue
        n = len(kernel)
        strides = node_attr(node, "strides") or [1] * n
        dilations = node_attr(node, "dilations") or [1] * n
        if not cache and (node_attr(node, "output_shape") is not None or any(s != 1 for s in strides)):
            cache.append(inferred_shapes(model))
        shape = cache[0].get(node.input[0]) if cache else None
        sizes = list(shape[2:]) if shape is not None and len(shape) == n + 2 else [None] * n
        if node.op_type == "ConvTranspose":
            found = _transpose_pads(mode, sizes, kernel, strides, dilations,
                                    node_attr(node, "output_padding") or [0] * n, node_attr(node, "output_shape"))
            if found is None:
                continue
            begins, ends = found
        elif mode == "VALID":
            begins, ends = [0] * n, [0] * n
        else:
            pairs = [same_pads(sizes[i], kernel[i], strides[i], dilations[i], mode == "SAME_UPPER") for i in range(n)]
            if any(p is None for p in pairs):
                continue
            begins, ends = [p[0] for p in pairs], [p[1] for p in pairs]
        for attr in [a for a in node.attribute if a.name in ("auto_pad", "pads", "output_shape")]:
            node.attribute.remove(attr)
        node.attribute.append(helper.make_attribute("pads", begins + ends))
        changed = True
    return changed


def _needs_stash(node: onnx.NodeProto, opset: int, initializers: set[str], shapes: Callable[[], dict]) -> bool:
    if node.domain == "ai.onnx.ml":
        return node.op_type in ML_STASHED_OPS
    if node.domain not in ("", "ai.onnx") or node.op_type not in STASHED_OPS:
        return False
    if node.op_type in ("AveragePool", "ConvTranspose"):
        # onnx2torch refuses their pads where they differ between the two ends of an axis, and SAME padding
        # (left by explicit_auto_pad where the sizes are unknown: our AveragePool pads at run time); it ignores
        # a ConvTranspose's output_shape, which ours refuses by name.
        pads = list(node_attr(node, "pads") or [])
        return (pads[:len(pads) // 2] != pads[len(pads) // 2:]
                or node_attr(node, "auto_pad", b"NOTSET") in (b"SAME_UPPER", b"SAME_LOWER")
                or node_attr(node, "output_shape") is not None)
    if node.op_type == "LayerNormalization":
        # onnx2torch sizes its LayerNorm from the input's inferred shape (0 for an unknown dim). Below opset 17
        # it is onnxruntime's own op of the default domain (its optimizer writes it), the same computation.
        if opset < 17:
            return True
        axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
        shape = shapes().get(node.input[0])
        return shape is None or any(d is None for d in shape[axis:])
    if node.op_type == "Attention" and (node_attr(node, "softcap", 0.0) or len([o for o in node.output if o]) > 3
                                        or any(node.input[6:])):
        return False  # a softcap, the scores output and padded key lengths are not converted: the import says so
    if node.op_type == "Pad":
        # onnx2torch's Pad 11/13 pads reflect/edge only on the trailing spatial dims; ours pads any axis.
        return opset >= 11
    if node.op_type == "Clip":
        # onnx2torch reads Clip bounds as constants and cannot skip an empty min before a given max.
        bounds = list(node.input[1:])
        return opset >= 11 and any((not name and any(bounds[k + 1:])) or (name and name not in initializers)
                                   for k, name in enumerate(bounds))
    try:
        since = defs.get_schema(node.op_type, opset, "").since_version
    except defs.SchemaError:
        return False
    return since > TARGET_OPSET


def stash_ops(model: onnx.ModelProto) -> bool:
    """Move nodes the version converter or onnx2torch cannot take to ``STASH_DOMAIN`` (module doc)."""
    opset = _default_opset(model)
    initializers = {t.name for t in model.graph.initializer}
    cache: dict[str, dict] = {}  # shape inference once, for the LayerNorm rule and the types stashed nodes keep

    def types() -> dict:
        if "types" not in cache:
            cache["types"] = inferred_types(model)
        return cache["types"]

    def shapes() -> dict:
        if "shapes" not in cache:
            cache["shapes"] = static_shapes(types())
        return cache["shapes"]

    stashed = [node for node in model.graph.node if _needs_stash(node, opset, initializers, shapes)]
    if stashed:
        record_output_types(model, stashed, types())
    for node in stashed:
        node.domain = STASH_DOMAIN
    if stashed and not any(o.domain == STASH_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(STASH_DOMAIN, 1))
    return bool(stashed)


def expand_resize_axes(model: onnx.ModelProto) -> bool:
    """Resize 18+ with an ``axes`` attribute: spell scales/sizes out for every axis and drop ``axes``
    (the version converter refuses ``axes``; onnx2torch's Resize takes full-rank scales)."""
    nodes = [n for n in model.graph.node if n.op_type == "Resize" and any(a.name == "axes" for a in n.attribute)]
    if not nodes:
        return False
    inits = {t.name: t for t in model.graph.initializer}
    shapes = inferred_shapes(model)
    changed = False
    for node in nodes:
        shape = shapes.get(node.input[0])
        axes_attr = next(a for a in node.attribute if a.name == "axes")
        index = 3 if len(node.input) > 3 and node.input[3] else 2
        if shape is None or index >= len(node.input) or node.input[index] not in inits:
            continue  # left for the converter to report
        rank = len(shape)
        axes = [a % rank for a in axes_attr.ints]
        given = numpy_helper.to_array(inits[node.input[index]])
        if index == 3:
            if any(d is None for d in shape):
                continue
            full = np.asarray(shape, dtype=given.dtype)
        else:
            full = np.ones(rank, dtype=given.dtype)
        full[axes] = given
        name = f"{node.input[index]}__{node.name}__full"
        model.graph.initializer.append(numpy_helper.from_array(full, name))
        node.input[index] = name
        node.attribute.remove(axes_attr)
        changed = True
    return changed


def drop_trailing_empty_inputs(model: onnx.ModelProto) -> bool:
    """``Clip(x, min, '')`` -> ``Clip(x, min)``: an omitted optional input may be left off the end, and
    onnx2torch's converters look an empty name up (Clip: "Dynamic value of min/max", F.normalize's export)."""
    changed = False
    for node in model.graph.node:
        while node.input and not node.input[-1]:
            del node.input[-1]
            changed = True
    return changed


def drop_noop_with_empty_axes(model: onnx.ModelProto) -> bool:
    """The down-converter leaves ``noop_with_empty_axes`` on Reduce* nodes where opset 17 rejects it."""
    changed = False
    for node in model.graph.node:
        if node.op_type.startswith("Reduce") and node.op_type != "ReduceSum":
            attrs = [a for a in node.attribute if a.name == "noop_with_empty_axes"]
            for attr in attrs:
                if attr.i != 0:
                    raise UserError(
                        f"node {node.name!r} ({node.op_type}) uses noop_with_empty_axes=1, which opset "
                        f"{TARGET_OPSET} cannot express; re-export the model with opset_version={TARGET_OPSET}"
                    )
                node.attribute.remove(attr)
                changed = True
    return changed


def drop_reshape_allowzero(model: onnx.ModelProto) -> bool:
    """``allowzero=1`` only matters when the shape holds a 0; onnx2torch rejects the attribute.

    It goes where the shape is a constant without a 0, or a Concat whose constant pieces hold none: its
    computed pieces are dims read at run time (the dynamo exporter's shapes with a dynamic sequence
    length), 0 only for an empty tensor, which the imported model is never run on.
    """
    inits = {t.name: t for t in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}

    def no_zero(name: str) -> bool:
        return name in inits and 0 not in numpy_helper.to_array(inits[name]).tolist()

    changed = False
    for node in model.graph.node:
        if node.op_type != "Reshape" or len(node.input) < 2:
            continue
        shape, concat = node.input[1], producers.get(node.input[1])
        if concat is not None and concat.op_type == "Concat":
            safe = all(no_zero(x) for x in concat.input if x in inits)
        else:
            safe = no_zero(shape)
        for attr in [a for a in node.attribute if a.name == "allowzero" and a.i == 1]:
            if safe:
                node.attribute.remove(attr)
                changed = True
    return changed


PASSES: list[Pass] = [
    name_nodes,
    # First: the folds below may remove an initializer, which must not leave a graph input in its place.
    initializer_inputs_to_constants,
    clear_negative_dims,
    drop_trailing_empty_inputs,
    dropout_to_identity,
    # A compressed model's DequantizeLinear / Cast+Gather weights become float initializers again, so it
    # can be compressed further (int4/int2 do not exist at the opset we convert down to).
    fold_weight_decoders,
    densify_sparse_initializers,
    constants_to_initializers,
    bypass_identity_of_constants,
    fold_recurrent_weights,
    # Before the down-conversion: shape inference and the batch rules work at the exporter's opset.
    unbake_batch,
    expand_resize_axes,
    explicit_auto_pad,
    stash_ops,
    onnxruntime_nodes,
    convert_opset,
    # The converter can add Constant nodes and Identity chains of its own: run the cleanups after it.
    constants_to_initializers,
    bypass_identity_of_constants,
    drop_noop_with_empty_axes,
    drop_reshape_allowzero,
    # Last: onnx2torch reads these ranks from the graph it converts (opset 17, cleaned up).
    annotate_unknown_ranks,
]


def normalize(model: onnx.ModelProto, passes: list[Pass] | None = None) -> onnx.ModelProto:
    """Return a normalized deep copy of ``model``; external data must already be loaded."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for p in PASSES if passes is None else passes:
        if p(copy):
            logger.debug("normalize: %s changed the model", p.__name__)
    return copy
