"""Import an ONNX model into a trainable torch module through onnx2torch, with a weight map.

onnx2torch turns Conv/Gemm/norm nodes into torch layers holding Parameters, but leaves every other
constant (MatMul weights of transformers, Gather tables, Add biases) as a *buffer*. We promote the
float ones to Parameters and record, for every Parameter, the ONNX tensor it came from, its role and
the layout transform between them, so write-back can put trained values exactly where they lived.

Module names are ONNX node names ('.' replaced by '/'), which is how a torch module is traced back to
its node and its node's inputs to initializer names (verified by value in the tests).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
from onnx2torch import convert
from onnx2torch.node_converters import get_converter
from onnx2torch.onnx_graph import OnnxGraph
from torch import fx, nn

from converters.errors import UserError
from converters.graphinfo import (
    Consumer,
    ScoreOutput,
    _tensor_shape_and_type,
    compressible_weights,
    constant_sources,
    find_score_output,
    graph_inputs,
    identity_aliases,
    node_label,
    resolve,
)
from converters.normalize import normalize
from converters.writeback import TensorUpdate

logger = logging.getLogger(__name__)

# Ops whose float constant inputs are trainable (DESIGN §6 "trainable set"). Constants feeding any
# other op (Reshape shapes, Clip bounds, Resize scales, Pow exponents ...) stay fixed buffers.
_TRAINABLE_CONSUMERS = {
    "Conv", "ConvTranspose", "Gemm", "MatMul", "Gather", "Add", "Sub", "Mul", "PRelu",
    "BatchNormalization", "LayerNormalization", "InstanceNormalization", "GroupNormalization",
}  # fmt: skip

# Layers onnx2torch builds with their own Parameters: (parameter attribute, ONNX input index, role).
_MODULE_PARAMS: dict[type, tuple[tuple[str, int, str], ...]] = {}
for _cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear):
    _MODULE_PARAMS[_cls] = (("weight", 1, "weight"), ("bias", 2, "bias"))
for _cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.InstanceNorm1d, nn.InstanceNorm2d,
             nn.InstanceNorm3d, nn.GroupNorm):
    _MODULE_PARAMS[_cls] = (("weight", 1, "scale"), ("bias", 2, "shift"))


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


@dataclass
class WeightEntry:
    """One trainable Parameter and the ONNX tensor it writes back to."""

    param: str  # qualified name in ImportedModel.module.named_parameters()
    onnx_name: str
    location: str  # initializer | constant | sparse_initializer (in the ORIGINAL model)
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


class OnnxModule(nn.Module):
    """The converted GraphModule, called with the graph inputs in order, returning every graph output
    in order as a tuple (onnx2torch returns one value per *producing node*, deduplicated)."""

    def __init__(self, graph_module: fx.GraphModule, output_picks: list[tuple[int, int | None]], single: bool):
        super().__init__()
        self.graph_module = graph_module
        self._picks = output_picks
        self._single = single

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        raw = self.graph_module(*inputs)
        raw = (raw,) if self._single else tuple(raw)
        return tuple(raw[i] if j is None else raw[i][j] for i, j in self._picks)


@dataclass
class ImportedModel:
    """A model imported for training, plus what write-back and the loss need to know."""

    module: OnnxModule
    weights: list[WeightEntry]
    input_names: list[str]
    output_names: list[str]
    score: ScoreOutput | None
    original: onnx.ModelProto
    normalized: onnx.ModelProto

    def parameter(self, entry: WeightEntry) -> nn.Parameter:
        return self.module.get_parameter(entry.param)

    def compressible(self) -> list[WeightEntry]:
        return [e for e in self.weights if e.compressible]

    def onnx_values(self, entries: list[WeightEntry] | None = None) -> dict[str, np.ndarray]:
        """Current values in ONNX layout and dtype, keyed by ``WeightEntry.param``."""
        values = {}
        for entry in self.weights if entries is None else entries:
            tensor = self.parameter(entry).detach().cpu().numpy()
            values[entry.param] = entry.layout.to_onnx(tensor).astype(entry.onnx_dtype, copy=False)
        return values

    def updates(self, entries: list[WeightEntry] | None = None) -> list[TensorUpdate]:
        """Write-back requests for the current values of ``entries`` (default: every weight)."""
        values = self.onnx_values(entries)
        return [
            TensorUpdate(e.onnx_name, values[e.param],
                         () if e.owns_tensor else tuple((c.node, c.input_index) for c in e.consumers))
            for e in (self.weights if entries is None else entries)
        ]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run the torch module on numpy feeds (keyed by graph input name) without gradients."""
        device = next(iter(self.module.parameters()), torch.empty(0)).device
        args = [torch.from_numpy(np.ascontiguousarray(feeds[name])).to(device) for name in self.input_names]
        with torch.no_grad():
            return [o.detach().cpu().numpy() for o in self.module(*args)]


def unsupported_nodes(normalized: onnx.ModelProto) -> list[str]:
    """One line per node onnx2torch has no converter for: node name, op type, domain and opset."""
    opsets = {o.domain: o.version for o in normalized.opset_import}
    problems = []
    for node in normalized.graph.node:
        domain = "" if node.domain == "ai.onnx" else node.domain
        version = opsets.get(domain, opsets.get("ai.onnx", 0))
        try:
            get_converter(domain=domain, operation_type=node.op_type, version=version)
        except NotImplementedError:
            where = f"{domain}." if domain else ""
            problems.append(f"node {node.name!r}: {where}{node.op_type} (opset {version}) has no converter")
    return problems


def _convert(normalized: onnx.ModelProto) -> fx.GraphModule:
    problems = unsupported_nodes(normalized)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UserError(
            f"cannot import the model: {problems[0]}{more}; run `onnx-admm inspect` for the full list, "
            "or re-export without that op"
        )
    try:
        return convert(normalized, attach_onnx_mapping=True)
    except (KeyError, NotImplementedError, ValueError, RuntimeError, AttributeError, TypeError) as exc:
        raise UserError(f"cannot import the model through onnx2torch: {type(exc).__name__}: {exc}".splitlines()[0]) from None


def _call_inputs(node: fx.Node) -> list[object]:
    """The fx args of a call_module node in ONNX input order (onnx2torch moves inputs after a skipped
    optional input into kwargs, in forward-signature order)."""
    return list(node.args) + list(node.kwargs.values())


def import_model(original: onnx.ModelProto, output: str | None = None) -> ImportedModel:
    """Import ``original`` (external data loaded) into a trainable :class:`OnnxModule` with a weight map.

    Args:
        original: the user's model; it is not modified.
        output: name of the score output, overriding DESIGN §6 detection.

    Raises:
        UserError: when the model cannot be imported (the message names the node and the op).
    """
    normalized = normalize(original)
    gm = _convert(normalized)
    onnx_nodes = OnnxGraph(normalized.graph).nodes
    sources = constant_sources(original)
    compressible_names = {w.name for w in compressible_weights(original)}
    orig_consumers = _consumers_of_constants(original)

    # Every use of a constant tensor by a converted op: (owner module, attribute, role, layout, input index)
    uses: dict[str, list[tuple[nn.Module, str, str, Layout, str, int]]] = defaultdict(list)
    for fx_node in gm.graph.nodes:
        if fx_node.op != "call_module":
            continue
        module = gm.get_submodule(fx_node.target)
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
    for onnx_name, tensor_uses in uses.items():
        if onnx_name not in sources:
            logger.debug("skipping %s: not a constant of the original model", onnx_name)
            continue
        if not all(op in _TRAINABLE_CONSUMERS for *_, op, _i in tensor_uses):
            continue
        value = _current_value(gm, tensor_uses[0])
        if not value.is_floating_point() or (value.numel() <= 1 and tensor_uses[0][2] == "param"):
            continue  # scalars such as attention scales and epsilons are not parameters
        groups: dict[tuple, list] = defaultdict(list)
        for use in tensor_uses:
            groups[(use[2], use[3])].append(use)
        for group_index, ((role, layout), group) in enumerate(groups.items()):
            torch_shape = tuple(_current_value(gm, group[0]).shape)
            param = _tie(gm, params_container, group)
            consumers = tuple(c for c in orig_consumers.get(onnx_name, ()) if (c.op_type, c.input_index) in
                              {(op, i) for *_, op, i in group})
            weights.append(WeightEntry(
                param=param,
                onnx_name=onnx_name,
                location=sources[onnx_name].location,
                role=role,
                op_type=group[0][4],
                onnx_shape=tuple(layout.to_onnx(np.empty(torch_shape)).shape),
                onnx_dtype=_onnx_dtype(original, sources[onnx_name]),
                consumers=consumers,
                layout=layout,
                compressible=role == "weight" and onnx_name in compressible_names,
                owns_tensor=group_index == 0,
            ))
    gm.recompile()
    _freeze_unmapped(gm, {w.param for w in weights})

    names = [spec.name for spec in graph_inputs(original)]
    output_names = [o.name for o in original.graph.output]
    module = OnnxModule(gm, *_output_picks(normalized, onnx_nodes))
    for w in weights:
        w.param = "graph_module." + w.param
    module.eval()
    return ImportedModel(module, weights, names, output_names, find_score_output(original, output), original,
                         normalized)


def _linear_layout(node: onnx.NodeProto, index: int) -> Layout:
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if index == 1:
        return Layout(transpose=not attrs.get("transB", 0), scale=float(attrs.get("alpha", 1.0)))
    return Layout(scale=float(attrs.get("beta", 1.0)))


def _current_value(gm: fx.GraphModule, use: tuple) -> torch.Tensor:
    owner, attr = use[0], use[1]
    if isinstance(owner, fx.Node):
        return gm.get_buffer(owner.target)
    return getattr(owner, attr)


def _tie(gm: fx.GraphModule, container: nn.Module, group: list) -> str:
    """Make every use in ``group`` read one Parameter; return its qualified name."""
    first = group[0]
    if isinstance(first[0], fx.Node):
        data = gm.get_buffer(first[0].target).detach().clone()
        param = nn.Parameter(data)
        key = f"p{len(container._parameters)}"
        container.register_parameter(key, param)
        qualified = f"onnx_params.{key}"
    else:
        param = getattr(first[0], first[1])
        qualified = f"{_module_name(gm, first[0])}.{first[1]}"
    for owner, attr, *_ in group:
        if isinstance(owner, fx.Node):
            owner.target = qualified
        elif getattr(owner, attr) is not param:
            setattr(owner, attr, param)
    return qualified


def _module_name(gm: fx.GraphModule, module: nn.Module) -> str:
    for name, candidate in gm.named_modules():
        if candidate is module:
            return name
    raise RuntimeError("module not found in graph module")


def _freeze_unmapped(gm: fx.GraphModule, mapped: set[str]) -> None:
    """Parameters we cannot write back must not train: the ONNX model would not see the change."""
    for name, param in gm.named_parameters():
        if name not in mapped:
            logger.debug("freezing %s: no ONNX tensor to write it back to", name)
            param.requires_grad_(False)
    # Promoted buffers are dead now; drop them so memory holds one copy.
    live = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    container = getattr(gm, "initializers", None)
    for name in list(container._buffers) if container is not None else []:
        if f"initializers.{name}" not in live:
            del container._buffers[name]


def _consumers_of_constants(model: onnx.ModelProto) -> dict[str, list[Consumer]]:
    aliases = identity_aliases(model)
    result: dict[str, list[Consumer]] = defaultdict(list)
    for index, node in enumerate(model.graph.node):
        if node.op_type == "Identity":
            continue
        for i, name in enumerate(node.input):
            if name:
                result[resolve(name, aliases)].append(Consumer(node_label(node, index), node.op_type, i))
    return result


def _onnx_dtype(model: onnx.ModelProto, source) -> np.dtype:
    _, elem_type = _tensor_shape_and_type(model, source)
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
