"""Attention heads as channel groups: the Q/K/V projections of a multi-head attention lose whole heads.

A head is a block of ``head_dim`` output features of each of Q, K and V, the matching input columns of
the output projection, and every shape constant that holds the number of heads (``[.., H, L, head_dim]``),
or ``H * head_dim`` (``[.., 3, E]``, ``[L*N, E]``). Q, K and V come from one fused ``[E, 3E]`` in_proj (as
both torch exporters write ``nn.MultiheadAttention``: the rows ``q*E + h*head_dim + i`` of the three
thirds), from separate projections (hand-written ViT/BERT encoders: ``nn.Linear`` q, k and v, each
reshaped to ``[N, L, H, head_dim]``, explicit softmax or ``F.scaled_dot_product_attention``), from one
fused ``[E, 3E]`` qkv split by ``chunk``/``split``/``unbind`` (timm's ViT: ``[N, L, 3, H, head_dim]``
permuted and unbound, or ``chunk(3)`` before each tensor's ``view``), or from a q projection and a fused
``[E, 2E]`` kv reshaped to ``[N, L, 2, H, head_dim]`` and indexed, or split by ``chunk(2)``. A
``ChannelGroup`` with ``unit == "head"`` carries all of them: one member per projection
(``TensorSlice.inner`` = head_dim, ``outer`` = the blocks of its output: 3 for a fused qkv, 2 for kv, 1
for a separate one), so ``converters.shrink`` and the engine's filter
projection treat a head as they treat a filter (the members' heads ranked and kept together).

The walk starts at one projection; where the heads wait at an attention MatMul (or a sum) for an operand
that does not carry them (``Q @ K^T`` waits for K, ``A @ V`` for V), the projections that make that
operand join the group, each with its rows split into the same heads of the same head_dim, and the
walk starts again from every member. The channel walk of ``converters.channel_walk`` follows the heads,
with these rules added:

- Reshape (``converters.heads_reshape``): the heads are one digit of the row-major index, with
  ``head_dim * (dims after them)`` entries below; a reshape that keeps that digit inside one output axis
  keeps the heads (split from ``3E`` into ``[3, E]``, from ``E`` into ``[N*H, head_dim]`` or
  ``[H, head_dim]``, merged back into ``E``); the shape entry of that axis is edited (or is -1). The
  digit is found in the dims every probe measured, so the dims after the heads may follow the inputs (a
  dynamic sequence length). A shape computed at run time (read from the input's ``Shape``) is frozen to
  a constant from the measured dims: -1 at the one dim that follows the inputs' dynamic dims; with
  several (a dynamic batch and sequence length), 0 where the dim is the input's at the same index and
  -1 at the one left; where that cannot be written, a shape made by Concat stays computed with its
  constant head-count piece edited.
- Split and Slice (``converters.heads_split``): along another axis they keep the heads; along the
  heads' axis each piece must hold whole blocks of heads (``3E`` cut into Q, K and V), and its sizes or
  bounds are edited (frozen first where the TorchScript exporter computes them from the width). The
  Squeeze after an ``unbind`` removes another axis, which the channel walk's own rule follows.
- Gather on another axis (picking Q, K or V out of the fused tensor), Softmax over another axis, a
  MatMul of two tensors that hold the same heads on a batch axis (``Q @ K^T``, ``A @ V``), and Shape
  (whose values only feed shapes) keep them.
- An attention mask (``converters.heads_mask``): a computed operand of an elementwise op that
  broadcasts over the heads' axis (``[N, 1, 1, L]`` added to the scores) is the same for every head and
  passes; a mask from a graph input repeated once per head by an Expand or Tile with a constant count
  (the dynamo exporter's ``src_key_padding_mask``) starts a branch of the group at the repeat, its
  count edited per removed head like a shape entry (and the constant H of a Mul that computes ``N*H``
  for its reshape); a chain shared by several layers is first copied per layer (``converters.heads_chains``).

The dims are measured in onnxruntime (``probe_shapes``): once with every dynamic input dim at 2, then
once per dynamic dim (one symbol: one dim, so an input and its mask change together) with that dim
alone at 3, so that each measured dim can be traced to the input dims it follows. What the walk cannot
see (a shape computed from a tensor that does not carry the heads, a head count baked into an op it
does not model) the proof catches: the graph with the last head removed must compute, in onnxruntime,
what the original computes with that head's output-projection columns zeroed (max difference <= 1e-4
relative, at every probe's sizes and at 5, 7, ... for the dynamic dims, sizes no probe used; bool
inputs, masks, are fed True at random, and a row a mask pads wholly must be NaN in both). A projection
whose heads cannot be proven keeps the channel walk's reason. Handled: a dynamic batch, and a dynamic
batch with a dynamic sequence length (text encoders), with or without a key-padding mask input, for
the fused in_proj of ``nn.MultiheadAttention`` from the dynamo exporter (the TorchScript exporter bakes
the example's sequence length into its K and V views: that graph runs at no other length, and its
shapes cannot be measured) and for separate or fused projections from both. Not handled (left alone
with the reason): Q, K and V with different head counts or head_dims (multi-query and grouped-query
attention, a V wider than Q and K), a Split or Slice that cuts through a head or whose bounds follow
the inputs' dynamic dims, Split sizes held in an attribute (opset < 13), a computed shape with two dims
that follow the inputs, neither the input's at the same index, that is not a Concat with a constant
head-count piece, a mask repeated per head to a count computed at run time (an Expand of a computed
shape: the heads meet a branch from the graph input).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
import onnx

from onnx_admm.converters.channel_walk import ChannelWalk
from onnx_admm.converters.cut import cut, zeroed
from onnx_admm.converters.channels import ChannelGroup, ChannelLayout, NotPrunable, fed_at_run_time
from onnx_admm.converters.graphinfo import graph_inputs, node_attr, tensor_names
from onnx_admm.converters.heads_mask import copies_start, head_copies
from onnx_admm.converters.heads_reshape import reshape_step
from onnx_admm.converters.heads_split import slice_step, split_step
from onnx_admm.converters.optable import BROADCAST, LINEAR

logger = logging.getLogger(__name__)

__all__ = ["Probe", "feeds_attention", "head_group", "probe_shapes"]

# The relative tolerance of the proof (outputs differ only by float rounding when the split is right).
PROOF_TOLERANCE = 1e-4
# The size of every dynamic input dim in the first probe, and of the one dim each other probe changes.
PROBE_SIZES = (2, 3)
# The size of the first dynamic input dim in the proof's last feed (the next ones: 2 more each).
CHECK_SIZE = 5
# A dim of a probed tensor that differs between the probes.
DYNAMIC = "dynamic"
# The share of True entries in a fed bool input (a mask's padded positions).
PADDED = 0.3
# The longest integer tensor whose probed values are kept (shapes, split sizes and slice bounds are short).
MAX_KEPT_VALUES = 16


def head_group(a: Any, index: int, weight: str, probe: Probe) -> ChannelGroup:
    """The head group of the Q/K/V projection node ``index`` (weight ``weight``; ``feeds_attention``),
    proven in onnxruntime.

    Args:
        a: The graph facts of ``converters.groups``.
        index: The MatMul/Gemm node.
        weight: Its constant weight.
        probe: Measured dims of every tensor (``probe_shapes``).

    Raises:
        NotPrunable: no head split is found, or the proof fails; the message says which.
    """
    _, axis = _projection(a, index)
    features = a.value(weight).shape[axis]
    facts = _Probed(a, probe)
    taken = tensor_names(a.model)
    last: tuple[int, NotPrunable] | None = None  # the failure of the split followed furthest
    # 3 blocks: a fused Q/K/V; 1: one of Q, K, V; 2: a fused kv split by chunk, met before the q projection
    # that would bring it into the group. 2 comes after 1: a q projection's heads taken in pairs would pass
    # as a kv's two halves, and the finer split is wanted.
    for fused in (3, 1, 2):
        if features % fused:
            continue
        width = features // fused
        for heads in sorted((h for h in range(2, width + 1) if width % h == 0), reverse=True):
            walks: list[HeadWalk] = []  # each grown by more members than the one before
            try:
                walk = _coupled_walk(facts, index, heads, width // heads, taken, walks)
                if not walk.attention:
                    raise NotPrunable("no MatMul of two computed tensors reads the heads (not attention)")
                walk.check_sharing()
            except NotPrunable as exc:
                reached = max((len(w.reached) for w in walks), default=0)
                if last is None or reached > last[0]:
                    last = (reached, exc)
                continue
            group = walk.group()
            _prove(a.model, group, probe)
            return group
    raise NotPrunable(f"no attention heads found ({last[1] if last else 'no weight width splits'})")


def _coupled_walk(a: Any, index: int, heads: int, head_dim: int, names: set[str], walks: list[HeadWalk]) -> HeadWalk:
    """The walk of ``heads`` heads of ``head_dim`` from projection ``index``, grown by the projections
    that make the other operand of every attention MatMul (or sum) the heads wait at: Q, K and V from
    separate weights are one group, each member starting with its own blocks of rows. Each walk tried is
    appended to ``walks``.

    Raises:
        NotPrunable: a member's rows do not split into those heads, or the walk stops.
    """
    members, copies = [index], []  # projections; Expand/Tile nodes that repeat a mask once per head
    while True:
        walk = HeadWalk(a, _projection(a, index)[0], heads, names=names, head_dim=head_dim, members=sorted(members))
        walks.append(walk)
        walk.run([walk.start(i) for i in members] + [copies_start(walk, k) for k in copies])
        if not walk.blocked:
            return walk
        found, repeats = [], []
        for i, other in walk.blocked.items():
            try:
                found += [p for p in a.branch_producers(i, other) if p not in members and p not in found]
            except NotPrunable:
                # A branch from a graph input (a mask) may reach the heads as one copy per head.
                more = head_copies(walk, other)
                if not more:
                    raise
                repeats += [k for k in more if k not in copies and k not in repeats]
        if not found and not repeats:
            i, other = next(iter(walk.blocked.items()))
            raise NotPrunable(f"the heads meet {other!r} at {a.nodes[i].op_type} {a.labels[i]}, which no "
                              "projection with the same heads makes")
        members += found
        copies += repeats


def _projection(a: Any, index: int) -> tuple[str, int]:
    """(the constant weight, its output axis) of a MatMul/Gemm projection node ``index``.

    Raises:
        NotPrunable: the node is not a MatMul/Gemm with a constant 2-D weight on the right.
    """
    node, label = a.nodes[index], a.labels[index]
    weight = a.constant(node.input[1]) if node.op_type in ("MatMul", "Gemm") else None
    if weight is None:
        raise NotPrunable(f"{node.op_type} {label} is not a projection with a constant weight")
    rank = len(a.value(weight).shape)
    if rank != 2:
        raise NotPrunable(f"a weight of rank {rank} is not an attention projection")
    return weight, (0 if node.op_type == "Gemm" and node_attr(node, "transB", 0) else 1)


def feeds_attention(a: Any, index: int) -> bool:
    """Whether node ``index``'s output reaches a MatMul of two computed tensors as data, before any layer
    with a constant weight (which starts other units) or a Shape (whose values only size things)."""
    stack, seen = [a.nodes[index].output[0]], set()
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        for i in a.readers.get(name, []):
            node = a.nodes[i]
            computed = [x for x in node.input if x and a.constant(x) is None]
            if node.op_type == "MatMul" and len(computed) == 2:
                return True
            if node.op_type == "Shape" or (node.op_type in LINEAR and len(computed) < len(node.input)):
                continue
            stack.extend(out for out in node.output if out)
    return False


@dataclasses.dataclass
class Probe:
    """Dims of every tensor measured in onnxruntime at several sizes of the dynamic input dims (an int
    when every run agrees, ``DYNAMIC`` otherwise), each run's dims (``runs``), the values of the small
    integer tensors every run agrees on (shapes and bounds computed at run time), the feeds used, and
    ``checks``: feeds at sizes no probe used, on which the proof runs too."""

    dims: dict[str, tuple[int | str, ...]]
    feeds: list[dict[str, np.ndarray]]
    values: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    runs: list[dict[str, tuple[int, ...]]] = dataclasses.field(default_factory=list)
    checks: list[dict[str, np.ndarray]] = dataclasses.field(default_factory=list)


def probe_shapes(model: onnx.ModelProto) -> Probe:
    """Run ``model`` with every node output exposed: once with every dynamic input dim at
    ``PROBE_SIZES[0]``, then once per dynamic dim (dims of one symbol count as one) with that dim alone at
    ``PROBE_SIZES[1]``, so that each measured dim can be traced to the input dims it follows.

    Raises:
        NotPrunable: an input cannot be synthesized or onnxruntime fails.
    """
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    outputs = {o.name for o in probe.graph.output}
    names = [x for n in probe.graph.node for x in n.output if x and x not in outputs]
    probe.graph.output.extend(onnx.ValueInfoProto(name=x) for x in names)
    names = [o.name for o in probe.graph.output]
    symbols = _dynamic_dims(model)
    base = dict.fromkeys(symbols, PROBE_SIZES[0])
    sizes = [base] + [{**base, symbol: PROBE_SIZES[1]} for symbol in symbols]
    feeds = [_feed(model, size, seed) for seed, size in enumerate(sizes)]
    # Sizes no probe used, one per dynamic dim (5, 7, ...): the proof's last feed.
    checks = [_feed(model, {s: CHECK_SIZE + 2 * k for k, s in enumerate(symbols)}, len(feeds))]
    runs, small = [], []  # per run: every tensor's shape; the small integer tensors' values
    try:
        session = _session(probe)
        for feed in feeds:
            outs = session.run(names, feed)
            runs.append({x: tuple(np.shape(v)) for x, v in zip(names, outs)})
            small.append({x: np.asarray(v) for x, v in zip(names, outs) if _small_integers(v)})
    except Exception as exc:  # noqa: BLE001 -- onnxruntime raises its own types; the walk then stops
        raise NotPrunable(f"onnxruntime could not run the graph to measure its shapes ({exc})") from None
    dims = {}
    for name in names:
        shapes = [run[name] for run in runs]
        if len({len(s) for s in shapes}) == 1:
            dims[name] = tuple(x[0] if len(set(x)) == 1 else DYNAMIC for x in zip(*shapes))
    values = {x: v for x, v in small[0].items() if all(x in s and np.array_equal(v, s[x]) for s in small[1:])}
    return Probe(dims, feeds, values, runs, checks)


def _dynamic_dims(model: onnx.ModelProto) -> list[str | tuple[str, int]]:
    """The dynamic dims of the graph inputs, in order: a symbol names every dim it stands for (an input's
    batch and its mask's), an unnamed dim is (input, axis)."""
    found: list[str | tuple[str, int]] = []
    for spec in graph_inputs(model):
        for k, d in enumerate(spec.shape or ()):
            key = d if isinstance(d, str) else (spec.name, k)
            if not isinstance(d, int) and key not in found:
                found.append(key)
    return found


def _small_integers(value: Any) -> bool:
    """A tensor that may be a shape, split sizes or slice bounds (those are worth keeping the values of)."""
    value = np.asarray(value)
    return value.dtype.kind in "iu" and value.ndim <= 1 and value.size <= MAX_KEPT_VALUES


class _Probed:
    """The analysis facts with the measured dims in place of ONNX shape inference's."""

    def __init__(self, a: Any, probe: Probe) -> None:
        self._a, self._probe = a, probe

    def __getattr__(self, name: str) -> Any:
        return getattr(self._a, name)

    def shape(self, name: str) -> list[int | str] | None:
        src = self._a.constant(name)
        if src is not None:
            return list(self._a.value(src).shape)
        dims = self._probe.dims.get(name)
        return None if dims is None else list(dims)

    def measured(self, name: str) -> list[tuple[int, ...]] | None:
        """The dims of ``name`` in each probe run (a constant's in each), or None when not measured."""
        src = self._a.constant(name)
        if src is not None:
            return [tuple(self._a.value(src).shape)] * len(self._probe.runs)
        runs = [run.get(name) for run in self._probe.runs]
        return None if any(r is None for r in runs) else runs

    def known(self, name: str) -> np.ndarray | None:
        """The value of ``name``: a constant's, or a computed one the probes measured alike; else None."""
        src = self._a.constant(name)
        return self._a.value(src) if src is not None else self._probe.values.get(name)


@dataclasses.dataclass
class HeadWalk(ChannelWalk):
    """A channel walk whose units are heads (blocks of ``inner`` features), with the rules of attention."""

    head_dim: int = 1
    members: list[int] = dataclasses.field(default_factory=list)  # the projections' nodes, in graph order
    attention: bool = False

    def start(self, index: int) -> tuple[str, ChannelLayout]:
        """Slice projection ``index``'s weight (and Gemm bias) along its output axis, each head owning
        ``head_dim`` rows of each block of ``n * head_dim`` (3 blocks for a fused Q/K/V); its output
        holds the heads."""
        a = self.a
        node, label = a.nodes[index], a.labels[index]
        weight, axis = _projection(a, index)
        if weight in a.constant_inputs:
            raise fed_at_run_time(weight)
        features = a.value(weight).shape[axis]
        if features % (self.n * self.head_dim):
            raise NotPrunable(f"{weight!r} has {features} outputs, not blocks of {self.n} heads of "
                              f"{self.head_dim} (Q, K and V differ in head count or head_dim)")
        layout = ChannelLayout(0, self.head_dim, features // (self.n * self.head_dim))
        self.slice(weight, axis, "weight", layout, (label, 1))
        if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
            if a.constant(node.input[2]) is None:
                raise NotPrunable(f"Gemm {label} adds a computed C")
            self.broadcast_constant(node.input[2], layout.along(1), (label, 2), out_rank=2, role="bias")
        rank = len(a.shape(node.output[0]) or ())
        if not rank:
            raise NotPrunable(f"the shape of {node.output[0]!r} is unknown")
        return node.output[0], layout.along(rank - 1)

    def group(self) -> ChannelGroup:
        a = self.a
        weights = tuple(_projection(a, i)[0] for i in self.members)
        labels = tuple(a.labels[i] for i in self.members)
        return ChannelGroup(
            name=weights[0], node=labels[0], op_type=a.nodes[self.members[0]].op_type, n_channels=self.n,
            outputs=tuple(self.outputs), consumers=tuple(self.consumers), reshapes=tuple(self.reshapes),
            activations=tuple(self.reached), members=weights, member_nodes=labels, unit="head",
            frozen=tuple(self.frozen),
        )

    def _blocking_operand(self, i: int) -> str | None:
        node = self.a.nodes[i]
        if node.op_type == "MatMul" and all(self.a.constant(x) is None for x in node.input):
            return next((x for x in node.input if x not in self.reached), None)
        if node.op_type in BROADCAST:
            return next((x for x in node.input if x and x not in self.reached and self.a.constant(x) is None
                         and not self._head_free(i, x)), None)
        return super()._blocking_operand(i)

    def _head_free(self, i: int, name: str) -> bool:
        """Whether operand ``name`` of the elementwise node ``i`` broadcasts over the heads' axis (size 1
        there in every probe run, or no such axis): the same for every head, so nothing of it is cut (a
        scale made from shapes, a key-padding mask ``[N, 1, 1, L]`` added to the scores)."""
        node, a = self.a.nodes[i], self.a
        carried = next((x for x in node.input if x in self.reached), None)
        runs, rank = a.measured(name), len(a.shape(carried) or ()) if carried else 0
        if not rank or runs is None:
            return False
        axis = self.reached[carried].axis - rank  # counted from the end: broadcasting aligns the last axes
        return all(-axis > len(dims) or dims[axis] == 1 for dims in runs)

    def _step(self, i: int) -> list[tuple[str, ChannelLayout]]:
        a = self.a
        node, label = a.nodes[i], a.labels[i]
        op = node.op_type
        carried = [k for k, name in enumerate(node.input) if name in self.reached]
        if op == "Shape":
            return []  # its values feed shapes: frozen where a Reshape reads them, and the proof checks the rest
        if not carried:
            return super()._step(i)
        layout = self.reached[node.input[carried[0]]]
        rank = len(a.shape(node.input[carried[0]]) or ())
        if op == "Gather":
            if carried != [0] or a.constant(node.input[1]) is None:
                raise NotPrunable(f"Gather {label} picks the heads by computed indices")
            axis = node_attr(node, "axis", 0) % rank
            if axis == layout.axis:
                raise NotPrunable(f"Gather {label} picks entries along the heads' axis")
            picked = a.value(a.constant(node.input[1])).ndim
            return [(node.output[0], layout.along(layout.axis + (picked - 1 if axis < layout.axis else 0)))]
        if op in BROADCAST:  # computed operands broadcast over the heads (_head_free): the same for every head
            return self._broadcast(i, layout, frozenset(x for x in node.input if x and x not in self.reached
                                                         and a.constant(x) is None))
        if op in ("Split", "Slice"):
            return (split_step if op == "Split" else slice_step)(self, i, layout, rank)
        if op in ("Softmax", "LogSoftmax"):
            if node_attr(node, "axis", -1) % rank <= layout.axis:
                raise NotPrunable(f"{op} {label} normalises over the heads' axis")
            return [(node.output[0], layout)]
        if op == "MatMul" and all(a.constant(x) is None for x in node.input):
            layouts = {self.reached[x] for x in node.input}
            ranks = {len(a.shape(x) or ()) for x in node.input}
            if len(layouts) != 1 or len(ranks) != 1 or layout.axis >= rank - 2:
                raise NotPrunable(f"MatMul {label} does not hold the heads on the same batch axis of both operands")
            self.attention = True
            return [(node.output[0], layout)]
        return super()._step(i)

    def _reshape(self, i: int, name: str, layout: ChannelLayout) -> ChannelLayout:
        return reshape_step(self, i, name, layout)

    head_dim: int = 1
    members: list[int] = dataclasses.field(default_factory=list)  # the projections' nodes, in graph order
    attention: bool = False

def _prove(model: onnx.ModelProto, group: ChannelGroup, probe: Probe) -> None:
    """The graph without the last head must compute what the original computes with that head's output
    projection columns zeroed."""
    keep = np.ones(group.n_channels, dtype=bool)
    keep[-1] = False
    shrunk = cut(model, {group.name: keep}, [group]).model
    reference = zeroed(model, group, np.array([group.n_channels - 1]))
    try:
        got, want = _session(shrunk), _session(reference)
        for feed in probe.feeds + probe.checks:
            for x, y in zip(got.run(None, feed), want.run(None, feed)):
                x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
                # A row the mask pads wholly is NaN in both (softmax of -inf): it must be NaN alike.
                if x.shape != y.shape or not np.array_equal(np.isnan(x), np.isnan(y)):
                    diff = np.inf
                else:
                    x, y = np.nan_to_num(x, nan=0.0), np.nan_to_num(y, nan=0.0)
                    diff = float(np.abs(x - y).max(initial=0.0))
                if diff > PROOF_TOLERANCE * max(1.0, float(np.abs(y).max(initial=0.0))):
                    raise NotPrunable("removing a head changes what the graph computes beyond that head "
                                      "(a shape or count the walk does not see)")
    except NotPrunable:
        raise
    except Exception as exc:  # noqa: BLE001 -- onnxruntime rejects the shrunk graph: not a head split
        raise NotPrunable(f"the graph without a head does not run in onnxruntime ({str(exc).splitlines()[0]})") from None


def _feed(model: onnx.ModelProto, sizes: dict, seed: int) -> dict[str, np.ndarray]:
    """Inputs with each dynamic dim at its size in ``sizes`` (``_dynamic_dims``' keys): floats ~ N(0, 1),
    bools True at random (a key-padding mask pads some positions), integers zero (token ids in range)."""
    rng = np.random.default_rng(seed)
    feed = {}
    for spec in graph_inputs(model):
        if spec.shape is None:
            raise NotPrunable(f"input {spec.name!r} has no declared shape")
        shape = tuple(d if isinstance(d, int) else sizes[d if isinstance(d, str) else (spec.name, k)]
                      for k, d in enumerate(spec.shape))
        if np.issubdtype(spec.dtype, np.floating):
            feed[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        elif spec.dtype == np.bool_:
            feed[spec.name] = rng.random(shape) < PADDED
        else:
            feed[spec.name] = np.zeros(shape, dtype=spec.dtype)
    return feed


def _session(model: onnx.ModelProto):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 4
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
