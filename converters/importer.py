"""Import an ONNX model into a trainable torch module through onnx2torch, with a weight map.

onnx2torch turns Conv/Gemm/norm nodes into torch layers holding Parameters, but leaves every other
constant (MatMul weights of transformers, Gather tables, Add biases) as a *buffer*. We promote the
float ones to Parameters and record, for every Parameter, the ONNX tensor it came from, its role and
the layout transform between them, so write-back can put trained values exactly where they lived.

Module names are ONNX node names ('.' replaced by '/'), which is how a torch module is traced back to
its node and its node's inputs to initializer names (verified by value in the tests).

Graphs with parts onnx2torch cannot convert (skl2onnx's ai.onnx.ml ArrayFeatureExtractor / ZipMap
after the probabilities) import the largest convertible part: the float tensors that convertible
nodes compute from trainable weights and that feed either a graph output or an unconvertible node.
The module is built from that sub-model and returns those tensors (``ImportedModel.output_names``);
the graph outputs computed from them by the rest of the graph are ``passed_through``: write-back is by
tensor name on the ORIGINAL graph, so they keep working with the trained weights.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import numpy as np
import onnx
import torch
from onnx import helper
from onnx2torch import convert
from onnx2torch.onnx_graph import OnnxGraph
from torch import fx, nn

from onnx_admm.converters import onnx_ops, recurrent  # noqa: F401 - onnx_ops registers the extra onnx2torch converters
from onnx_admm.converters.batch_axis import baked_batch, fixed_batch
from onnx_admm.converters.errors import UserError
from onnx_admm.converters.optable import CHANNEL_AXES, SCALE_AXES, TRAINABLE_CONSUMERS
from onnx_admm.converters.graphinfo import (
    Consumer,
    GraphView,
    TensorSource,
    compressible_weights,
    constant_sources,
    dim_value,
    graph_inputs,
    resolve,
    tensor_shape_and_type,
)
from onnx_admm.converters.dequantize import decoded_view
from onnx_admm.converters.branches import Folding
from onnx_admm.converters.convertible import LOOP_FIX, LOOP_MARK, trainable_part, unsupported_nodes
from onnx_admm.converters.normalize import normalize
from onnx_admm.converters.fused import unfuse
from onnx_admm.converters.fx_params import current_value, freeze_unmapped, tie
from onnx_admm.converters.quantized import dequantize_model, integer_weight_bits
from onnx_admm.converters.scores import ScoreOutput, find_score_output, score_of_a_cut
from onnx_admm.converters.shapes import inferred_types
from onnx_admm.converters.encoders import QuantSpec
from onnx_admm.converters.writeback import TensorUpdate

logger = logging.getLogger(__name__)

# Layers onnx2torch builds with their own Parameters: (parameter attribute, ONNX input index, role).
_MODULE_PARAMS: dict[type, tuple[tuple[str, int, str], ...]] = {}
for _cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear):
    _MODULE_PARAMS[_cls] = (("weight", 1, "weight"), ("bias", 2, "bias"))
for _cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.InstanceNorm1d, nn.InstanceNorm2d,
             nn.InstanceNorm3d, nn.GroupNorm):
    _MODULE_PARAMS[_cls] = (("weight", 1, "scale"), ("bias", 2, "shift"))
# LSTM/GRU/RNN hold W, R, B (and P) in ONNX layout: identity Layout.
_MODULE_PARAMS[recurrent.OnnxRecurrent] = recurrent.RECURRENT_PARAMS


@dataclass(frozen=True)
class Layout:
    """How a torch parameter relates to its ONNX tensor: ``torch = (onnx.T if transpose else onnx) * scale``.

    Gemm becomes nn.Linear with B transposed when transB=0 and alpha (beta for C) folded in.
    """

    transpose: bool = False
    scale: float = 1.0

    def to_onnx(self, value: np.ndarray) -> np.ndarray:
        if self.scale != 1.0:
            value = value / self.scale
        return np.ascontiguousarray(value.T) if self.transpose else value

    def quant_spec(self, bits: int, scale: np.ndarray, axis: int | None, ndim: int) -> QuantSpec:
        """How levels made on the torch parameter (``scale`` along its ``axis``) lie on the ONNX tensor."""
        if axis is not None and self.transpose:
            axis = ndim - 1 - axis
        return QuantSpec(bits=bits, scale=np.asarray(scale, np.float32) / np.float32(self.scale), axis=axis)


@dataclass
class WeightEntry:
    """One trainable Parameter and the ONNX tensor it writes back to."""

    param: str  # qualified name in ImportedModel.module.named_parameters()
    onnx_name: str
    location: str  # initializer | constant | sparse_initializer | decoded (in the ORIGINAL model)
    role: str  # weight | bias | scale | shift | param
    op_type: str  # op type of the (first) consumer
    onnx_shape: tuple[int, ...]
    onnx_dtype: np.dtype
    consumers: tuple[Consumer, ...]
    layout: Layout = field(default_factory=Layout)
    compressible: bool = False
    # False when this tensor also feeds consumers in another role: write-back gives this entry its own
    # copy of the tensor and rewires ``consumers`` to it.
    owns_tensor: bool = True

    @property
    def channel_axes(self) -> tuple[int | None, int | None]:
        """The torch parameter's (output-channel, input-channel) axes (``CHANNEL_AXES``); (None, None) without."""
        return CHANNEL_AXES.get(self.op_type, (None, None))

    @property
    def scale_axis(self) -> int | None:
        """The axis per-channel quantization scales run along (``SCALE_AXES``, else the output channels')."""
        return SCALE_AXES.get(self.op_type, self.channel_axes[0])


class OnnxModule(nn.Module):
    """The converted GraphModule, called with the graph inputs in order, returning every graph output
    in order as a tuple (onnx2torch returns one value per *producing node*, deduplicated).

    A graph that runs only at a fixed batch b (``converters.batch_axis.fixed_batch``) is called in
    chunks of b along the first axis of its batched inputs, and the outputs are concatenated along
    their batch axes: any number of samples goes through, each graph run sees b, and a backward pass
    over the whole batch sums the gradients of the chunks (gradient accumulation). A last chunk short
    of b is padded with copies of its last sample, whose outputs are dropped.
    """

    def __init__(self, graph_module: fx.GraphModule, output_picks: list[tuple[int, int | None]], single: bool,
                 fixed_batch: int | None = None, batched_inputs: tuple[int, ...] = (),
                 output_axes: tuple[int | None, ...] = ()):
        super().__init__()
        self.graph_module = graph_module
        self._picks = output_picks
        self._single = single
        self.fixed_batch = fixed_batch
        self._batched = batched_inputs
        self._axes = output_axes

    def _once(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        raw = self.graph_module(*inputs)
        raw = (raw,) if self._single else tuple(raw)
        return tuple(raw[i] if j is None else raw[i][j] for i, j in self._picks)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        b = self.fixed_batch
        n = inputs[self._batched[0]].shape[0] if b is not None and self._batched else b
        if n == b:
            return self._once(inputs)
        # An output without a batch axis mixes the samples of its chunk: a padded chunk would change it,
        # so a last chunk short of b is left out instead (the teacher's outputs are cut the same way).
        per_sample = all(axis is not None for axis in self._axes)
        pieces = []
        for start in range(0, n, b):
            short = max(0, start + b - n)
            if short and not per_sample:
                break
            chunk = list(inputs)
            for i in self._batched:
                part = inputs[i][start:start + b]
                chunk[i] = torch.cat([part, part[-1:].expand(short, *part.shape[1:])]) if short else part
            outs = self._once(tuple(chunk))
            pieces.append([o.narrow(axis, 0, b - short) if short else o for o, axis in zip(outs, self._axes)])
        return tuple(join_chunks([p[k] for p in pieces], axis, torch) for k, axis in enumerate(self._axes))


def join_chunks(parts: list, axis: int | None, lib=np):
    """Outputs of consecutive chunks as one: joined on their batch axis, or, without one, stacked on a
    new first axis when 0-d and concatenated on the first otherwise (``lib``: numpy or torch)."""
    if axis is None and parts[0].ndim == 0:
        return lib.stack(parts)
    join = lib.concatenate if lib is np else lib.cat
    return join(parts, **{"axis" if lib is np else "dim": axis or 0})


@dataclass
class ImportedModel:
    """A model imported for training, plus what write-back and the loss need to know."""

    module: OnnxModule
    weights: list[WeightEntry]
    input_names: list[str]
    # The tensors the module returns, in order: the graph outputs, or, when parts of the graph cannot be
    # converted, the float tensors it trains on (graph outputs or inputs of the unconverted part).
    output_names: list[str]
    # The loss's tensor; index into output_names (an inner tensor, ``scores.find_score_output``, is
    # returned by the module after the graph outputs).
    score: ScoreOutput | None
    # The graph write-back writes into: the user's model, or for a model quantized by onnxruntime its
    # float form (``converters.quantized``), whose replacements ``dequantized`` lists.
    original: onnx.ModelProto
    # What onnx2torch converted: the normalized copy, or its trainable sub-model, its initializers above 1 kB
    # emptied once converted (the module holds them).
    normalized: onnx.ModelProto
    # Graph outputs the module does not compute; the original graph computes them from output_names
    # with the nodes listed in not_converted (one line each: node, op, opset), kept as they are.
    passed_through: list[str] = field(default_factory=list)
    not_converted: list[str] = field(default_factory=list)
    # The batch size a fixed-shape export baked in (the module runs at any batch), and the batch axis of
    # each input and output_names tensor; None / {} when the model's batch was dynamic.
    baked_batch: int | None = None
    batch_axes: dict[str, int | None] = field(default_factory=dict)
    # The batch a graph whose batch axis cannot be followed keeps (the module runs in chunks of it), and
    # the node that stopped the proof; batch_axes then holds the inputs' and outputs' batch axes (None:
    # an output with no dim of that size).
    fixed_batch: int | None = None
    fixed_batch_reason: str | None = None
    # onnxruntime-quantized nodes replaced by their float form (one line each).
    dequantized: list[str] = field(default_factory=list)
    # If nodes folded to the branch the data takes (``converters.branches``): ``original`` is the folded
    # copy, and write-back puts the If nodes back (``Folding.restore``).
    folding: Folding | None = None
    # Recurrent weights the graph computes from its constants (an LSTMCell's gate Slices inside an If
    # branch): imported as constants, so they neither train nor compress.
    computed_recurrent: list[str] = field(default_factory=list)
    # The narrowest integer width the user's file stored a weight in (``quantized.integer_weight_bits``).
    integer_bits: int | None = None
    # onnxruntime's fused nodes imported as the standard ops they stand for (``converters.fused``; one line each).
    unfused: list[str] = field(default_factory=list)

    @property
    def ort_batch(self) -> int | None:
        """The only batch size onnxruntime runs the original graph at (None: any)."""
        return self.baked_batch or self.fixed_batch

    def parameter(self, entry: WeightEntry) -> nn.Parameter:
        return self.module.get_parameter(entry.param)

    def compressible(self) -> list[WeightEntry]:
        return [e for e in self.weights if e.compressible]

    def held(self) -> set[str]:
        """The ONNX names of the weights this module holds as its own tensors (a filter-pruned group's
        consumers must be among them to be masked)."""
        return {e.onnx_name for e in self.weights if e.owns_tensor}

    def onnx_values(self, entries: list[WeightEntry] | None = None,
                    values: Mapping[str, torch.Tensor] | None = None) -> dict[str, np.ndarray]:
        """Values in ONNX layout and dtype, keyed by ``WeightEntry.param``: the module's current ones, or
        ``values`` (torch layout, keyed by parameter name) without touching the module."""
        out = {}
        for entry in self.weights if entries is None else entries:
            tensor = (values[entry.param] if values is not None else self.parameter(entry)).detach().cpu().numpy()
            out[entry.param] = entry.layout.to_onnx(tensor).astype(entry.onnx_dtype, copy=False)
        return out

    def updates(self, entries: list[WeightEntry] | None = None,
                quant: Mapping[str, QuantSpec] | None = None,
                values: Mapping[str, torch.Tensor] | None = None) -> list[TensorUpdate]:
        """Write-back requests for ``entries`` (default: every weight): the module's current values, or
        ``values`` (torch layout, keyed by parameter name).

        ``quant`` maps a parameter name to how its values were quantized (ONNX layout), so the quantized
        encoders may store integers for it.
        """
        values = self.onnx_values(entries, values)
        quant = quant or {}
        return [
            TensorUpdate(e.onnx_name, values[e.param],
                         () if e.owns_tensor else tuple((c.node, c.input_index) for c in e.consumers),
                         quant=quant.get(e.param))
            for e in (self.weights if entries is None else entries)
        ]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run the torch module on numpy feeds (keyed by graph input name) without gradients."""
        device = next(iter(self.module.parameters()), torch.empty(0)).device
        args = [torch.from_numpy(np.ascontiguousarray(feeds[name])).to(device) for name in self.input_names]
        with torch.no_grad():
            return [o.detach().cpu().numpy() for o in self.module(*args)]


def _weight_module(module: nn.Module) -> nn.Module:
    """The module holding a node's weights: a Conv whose pads differ between the two ends of an axis
    (tf2onnx's SAME with stride 2) is Sequential(pad, conv) in onnx2torch, such a ConvTranspose
    Sequential(conv, crop) (``converters.padding``)."""
    if isinstance(module, nn.Sequential):
        held = [child for child in module if type(child) in _MODULE_PARAMS]
        if len(held) == 1:
            return held[0]
    return module


def _convert(normalized: onnx.ModelProto) -> fx.GraphModule:
    try:
        return convert(normalized, attach_onnx_mapping=True)
    except (KeyError, NotImplementedError, ValueError, RuntimeError, AttributeError, TypeError) as exc:
        raise UserError(f"cannot import the model through onnx2torch: {type(exc).__name__}: {exc}".splitlines()[0]) from None


def _call_inputs(node: fx.Node) -> list[object]:
    """The fx args of a call_module node in ONNX input order (onnx2torch moves inputs after a skipped
    optional input into kwargs, in forward-signature order)."""
    return list(node.args) + list(node.kwargs.values())


def import_model(original: onnx.ModelProto, output: str | None = None, folding: Folding | None = None) -> ImportedModel:
    """Import ``original`` (external data loaded) into a trainable :class:`OnnxModule` with a weight map.

    Args:
        original: the user's model; it is not modified. A model quantized by onnxruntime's quantizer is
            imported (and written back) as its float form.
        output: name of the score output, overriding the detection of ``scores.find_score_output``.
        folding: the If nodes ``original`` had folded to their branches (``converters.branches``), put back
            on write-back.

    Raises:
        UserError: when the model cannot be imported (the message names the node and the op).
    """
    integer_bits = integer_weight_bits(original)
    original, dequantized = dequantize_model(original)
    # onnxruntime's fused ops are imported as the standard ops they stand for; write-back goes into the fused
    # graph, by tensor name (converters.fused).
    unfused = unfuse(original)
    if unfused.lines:
        logger.info("onnxruntime's fused ops imported as standard ops: %s", "; ".join(unfused.lines))
    normalized = normalize(unfused.model)
    inner = find_score_output(original, output)
    inner = inner if inner is not None and inner.internal else None
    if inner is not None:
        _expose(normalized, inner.name)
    not_converted = unsupported_nodes(normalized)
    normalized, trained = trainable_part(normalized, not_converted)
    gm = _convert(normalized)
    onnx_nodes = OnnxGraph(normalized.graph).nodes
    # Weights of an already-compressed model are decoder outputs (DequantizeLinear, codebook Gather):
    # read everything about them from a view where they are plain constants.
    view, decoded = decoded_view(unfused.model)
    view_sources = constant_sources(view)
    sources = {**view_sources, **{name: TensorSource(name, "decoded") for name in decoded}}
    compressible_names = {w.name for w in compressible_weights(view)}
    orig_consumers = _consumers_of_constants(view)

    # Every use of a constant tensor by a converted op: (owner module, attribute, role, layout, input index)
    uses: dict[str, list[tuple[nn.Module, str, str, Layout, str, int]]] = defaultdict(list)
    for fx_node in gm.graph.nodes:
        if fx_node.op != "call_module":
            continue
        module = _weight_module(gm.get_submodule(fx_node.target))
        onnx_node = onnx_nodes[fx_node.target].proto
        spec = _MODULE_PARAMS.get(type(module))
        if spec is not None:
            for attr, index, role in spec:
                if getattr(module, attr, None) is None or index >= len(onnx_node.input):
                    continue
                layout = _linear_layout(onnx_node, index) if isinstance(module, nn.Linear) else Layout()
                uses[onnx_node.input[index]].append((module, attr, role, layout, onnx_node.op_type, index))
            continue
        inputs = [name for name in module.onnx_mapping.inputs if name]
        for name, arg in zip(inputs, _call_inputs(fx_node)):
            if isinstance(arg, fx.Node) and arg.op == "get_attr" and arg.target.startswith("initializers."):
                role = "weight" if name in compressible_names else "param"
                index = list(onnx_node.input).index(name)
                uses[name].append((arg, "", role, Layout(), onnx_node.op_type, index))

    params_container = nn.Module()
    gm.add_module("onnx_params", params_container)
    weights: list[WeightEntry] = []
    computed: list[str] = []
    for onnx_name, tensor_uses in uses.items():
        if onnx_name not in sources:
            logger.debug("skipping %s: not a constant of the original model", onnx_name)
            if any(isinstance(use[0], recurrent.OnnxRecurrent) for use in tensor_uses):
                computed.append(onnx_name)  # normalize.fold_recurrent_weights made it a constant
            continue
        if not all(op in TRAINABLE_CONSUMERS for *_, op, _i in tensor_uses):
            continue
        value = current_value(gm, tensor_uses[0])
        if not value.is_floating_point() or (value.numel() <= 1 and tensor_uses[0][2] == "param"):
            continue  # scalars such as attention scales and epsilons are not parameters
        groups: dict[tuple, list] = defaultdict(list)
        for use in tensor_uses:
            groups[(use[2], use[3])].append(use)
        for group_index, ((role, layout), group) in enumerate(groups.items()):
            torch_shape = tuple(current_value(gm, group[0]).shape)
            param = tie(gm, params_container, group)
            consumers = tuple(unfused.consumer(c) for c in orig_consumers.get(onnx_name, ())
                              if (c.op_type, c.input_index) in {(op, i) for *_, op, i in group})
            weights.append(WeightEntry(
                param=param,
                onnx_name=onnx_name,
                location=sources[onnx_name].location,
                role=role,
                op_type=group[0][4],
                onnx_shape=tuple(layout.to_onnx(np.empty(torch_shape)).shape),
                onnx_dtype=_onnx_dtype(view, view_sources[onnx_name]),
                consumers=consumers,
                layout=layout,
                compressible=role == "weight" and onnx_name in compressible_names,
                owns_tensor=group_index == 0,
            ))
    gm.recompile()
    freeze_unmapped(gm, {w.param for w in weights})

    specs = graph_inputs(normalized)  # the converted graph's placeholders, in order
    names = [spec.name for spec in specs]
    fixed, fixed_reason = fixed_batch(normalized)
    fixed_axes = _fixed_batch_axes(normalized, specs, trained, fixed) if fixed is not None else {}
    module = OnnxModule(gm, *_output_picks(normalized, onnx_nodes), fixed_batch=fixed,
                        batched_inputs=tuple(i for i, n in enumerate(names) if n in fixed_axes),
                        output_axes=tuple(fixed_axes.get(n) for n in trained))
    for w in weights:
        w.param = "graph_module." + w.param
    module.eval()
    passed = [o.name for o in original.graph.output if o.name not in trained]
    untouched = sorted(compressible_names - {w.onnx_name for w in weights}) if passed else []
    if untouched:
        cut = not_converted[0] if not_converted else "no converter"
        listed = ", ".join(untouched[:5]) + (", ..." if len(untouched) > 5 else "")
        fix = f"; to compress them, {LOOP_FIX}" if LOOP_MARK in cut else ""
        logger.warning("%d compressible weight(s) lie past the part of the graph onnx-admm converts and stay as they "
                       "are: %s (%s)%s", len(untouched), listed, cut, fix)
    if inner is not None:
        if inner.name not in trained:
            raise UserError(f"score tensor {inner.name!r} is computed by a part of the graph onnx-admm cannot convert "
                            f"({not_converted[0] if not_converted else 'no trainable weight feeds it'}); name another "
                            "with [train] output")
        score = replace(inner, index=trained.index(inner.name))
    elif not passed or output is not None:
        score = find_score_output(normalized if passed else original, output)
    else:
        score = score_of_a_cut(original, normalized, trained)
    batch, axes = baked_batch(normalized)
    axes = {name: axes[name] for name in names + trained if name in axes} or fixed_axes
    normalized = _without_weight_values(normalized)
    return ImportedModel(module, weights, names, trained, score, original, normalized, passed,
                         not_converted if passed else [], batch, axes, fixed, fixed_reason, dequantized, folding,
                         computed, integer_bits, unfused.lines)


def _without_weight_values(normalized: onnx.ModelProto) -> onnx.ModelProto:
    """The converted copy with its initializers above 1 kB emptied (name, type and dims stay): the module holds
    those weights now, and the copy, kept for its graph's outputs and small constants, held a second copy of
    every weight through the run. A message of its own: protobuf frees an emptied field's memory only with the
    message that held it (AlexNet: 437 MB fewer once imported)."""
    for t in normalized.graph.initializer:
        if t.ByteSize() > 1024:
            t.CopyFrom(onnx.TensorProto(name=t.name, data_type=t.data_type, dims=t.dims))
    light = onnx.ModelProto()
    light.CopyFrom(normalized)
    return light


def _expose(normalized: onnx.ModelProto, name: str) -> None:
    """Make the inner tensor ``name`` an extra graph output of the normalized copy, so the module returns it."""
    if not any(name in node.output for node in normalized.graph.node):
        raise UserError(f"score tensor {name!r} is not computed by any node of the imported graph; name a graph "
                        "output or another inner tensor with [train] output")
    elem, dims = inferred_types(normalized).get(name, (onnx.TensorProto.FLOAT, None))
    normalized.graph.output.append(helper.make_tensor_value_info(name, elem, list(dims) if dims is not None else None))


def _fixed_batch_axes(normalized: onnx.ModelProto, specs, outputs: list[str], b: int) -> dict[str, int | None]:
    """Batch axes of a graph that keeps its fixed batch b: 0 on every input whose first dim is b; on each
    output the first dim of size b in its inferred (else declared) shape — a seq-first [T, 1, C] output
    has it at 1 — or None when no dim is b (the graph merged the samples)."""
    axes = {s.name: 0 for s in specs if s.shape and s.shape[0] == b}
    types = inferred_types(normalized)
    declared = {v.name: v for v in normalized.graph.output}
    for name in outputs:
        dims = types.get(name, (0, None))[1]
        if dims is None and name in declared:
            dims = tuple(dim_value(d) for d in declared[name].type.tensor_type.shape.dim)
        axes[name] = next((k for k, d in enumerate(dims or ()) if d == b), None)
    return axes


def _linear_layout(node: onnx.NodeProto, index: int) -> Layout:
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if index == 1:
        return Layout(transpose=not attrs.get("transB", 0), scale=float(attrs.get("alpha", 1.0)))
    return Layout(scale=float(attrs.get("beta", 1.0)))


def _consumers_of_constants(model: onnx.ModelProto) -> dict[str, list[Consumer]]:
    """The nodes reading each tensor through Identity chains (Identity nodes themselves left out), in graph order."""
    view = GraphView(model)
    reads: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for name, readers in view.readers.items():
        reads[resolve(name, view.aliases)] += [(i, k) for i, k in readers
                                               if k >= 0 and view.nodes[i].op_type != "Identity"]
    return {name: [Consumer(view.labels[i], view.nodes[i].op_type, k) for i, k in sorted(pairs)]
            for name, pairs in reads.items() if pairs}


def _onnx_dtype(model: onnx.ModelProto, source) -> np.dtype:
    _, elem_type = tensor_shape_and_type(model, source)
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))


def _output_picks(normalized: onnx.ModelProto, onnx_nodes) -> tuple[list[tuple[int, int | None]], bool]:
    producer = {}
    for unique_name, node in onnx_nodes.items():
        for out in node.output_values:
            producer[out] = (unique_name, node)
    order: list[str] = []
    picks = []
    for value in normalized.graph.output:
        if value.name not in producer:
            raise UserError(f"graph output {value.name!r} is not computed by any node; onnx-admm cannot train it")
        unique_name, node = producer[value.name]
        if unique_name not in order:
            order.append(unique_name)
        j = node.output_values.index(value.name) if len(node.output_values) > 1 else None
        picks.append((order.index(unique_name), j))
    return picks, len(order) == 1
