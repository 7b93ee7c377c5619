"""Fold If nodes whose condition the user's data fixes, so the weights their branches read can train.

onnx2torch has no If converter, and TorchScript-scripted exports keep Python control flow as If nodes: a
voice-activity model written ``if sr == 16000: self._model(x) else: self._model_8k(x)`` exports as one
If whose two branches hold (or read from the outer graph) every weight of two whole networks. Such a model
trains only as the branch the data takes.

``fold_branches`` finds each If whose branches read a weight, evaluates its condition in onnxruntime on
the samples, and, when every sample takes the same branch, replaces the If by that branch's nodes in a
COPY (the graph the importer converts): the branch's own initializers and float Constant tensors move to
the top graph under the same names, its outputs become the If's outputs through Identity nodes (or directly,
where the branch names them as the If does: optimum's merged decoders, whose two branches read the same outer
weights, so both run with the trained ones). An If
inside a taken branch is folded the same way. ``Folding.restore`` puts each If back into a graph written
from that copy: the inlined nodes go, the If node returns with both branches, and a branch's own
definition of a tensor the written top graph now defines (a lifted weight) is dropped so the branch reads
the written one by outer scope. The branch not taken keeps its weights as they were.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from onnx_admm.converters.errors import UserError
from onnx_admm.converters.evaluate import evaluate
from onnx_admm.converters.graphinfo import (constant_node_value, fresh_name, if_branch, live_nodes, node_label,
                                            subgraph_reads, subgraphs, tensor_names)

logger = logging.getLogger(__name__)

# Samples whose conditions are evaluated: the training data's first ones (a condition that changes later
# would change within a batch too, which the first batches show).
FOLD_SAMPLES = 1024

_FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
                          onnx.TensorProto.BFLOAT16})


@dataclass
class Folded:
    """One If replaced by its taken branch: the node as it was, which branch, and what replaced it."""

    node: onnx.NodeProto
    taken: bool
    inserted: list[str]  # labels of the nodes that replaced it (branch nodes and output Identity nodes)
    value_info: list[str]  # value_info names the branch brought to the top graph


@dataclass
class Folding:
    """The If nodes folded into a copy of ``original``, in folding order (an inner If after its outer one)."""

    original: onnx.ModelProto
    folded: list[Folded] = field(default_factory=list)

    def describe(self) -> list[str]:
        return [f"{f.node.name or f.node.output[0]}: the {'then' if f.taken else 'else'} branch" for f in self.folded]

    def restore(self, written: onnx.ModelProto) -> onnx.ModelProto:
        """``written`` (a graph written from the folded copy) with every folded If put back, in place."""
        graph = written.graph
        for record in reversed(self.folded):
            nodes = list(graph.node)
            labels = [node_label(n, i) for i, n in enumerate(nodes)]
            inserted = set(record.inserted)
            # Write-back may have replaced some (a recurrent weight computed from constants is stored as the
            # trained tensor, ``dequantize._computed_weights``); the branch's copies are dropped below.
            positions = [i for i, label in enumerate(labels) if label in inserted]
            if not positions:
                raise RuntimeError(f"the written graph lost the nodes of the folded If {record.node.name!r}")
            kept = [n for i, n in enumerate(nodes) if i not in set(positions)]
            node = onnx.NodeProto()
            node.CopyFrom(record.node)
            kept.insert(positions[0], node)  # where the branch began; _topological moves it if it must
            del graph.node[:]
            graph.node.extend(_topological(kept, {i.name for i in graph.input} | {t.name for t in graph.initializer}))
            names = set(record.value_info)
            infos = [v for v in graph.value_info if v.name not in names]
            del graph.value_info[:]
            graph.value_info.extend(infos)
        defined = {t.name for t in graph.initializer} | {t.values.name for t in graph.sparse_initializer}
        defined |= {out for n in graph.node for out in n.output}
        for node in graph.node:
            for sub in subgraphs(node):
                # Not the If's own outputs: optimum's merged decoders name each branch's outputs as the If's.
                _drop_definitions(sub, defined - set(node.output))
        return written


def weighted_ifs(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The top graph's If nodes whose branches read a weight: a float tensor of rank >= 2, their own or the
    top graph's."""
    top = {t.name: t for t in model.graph.initializer}
    found = []
    for node in model.graph.node:
        if node.op_type != "If":
            continue
        reads = subgraph_reads(node)
        if (any(name in top and _is_weight(top[name]) for name in reads)
                or any(_holds_weight(g) for g in subgraphs(node))):
            found.append(node)
    return found


def fold_branches(model: onnx.ModelProto,
                  feeds: Iterable[Mapping[str, np.ndarray]]) -> tuple[onnx.ModelProto, Folding | None]:
    """A copy of ``model`` with every If that reads weights replaced by the branch the samples take, and
    with it every other If the samples all take one way (a shape check before the weights would stop the
    import); an If without weights whose condition changes between samples stays.

    Returns ``model`` itself and None when it has no If that reads weights.

    Raises:
        UserError: the samples take both branches of an If that reads weights (the message names it).
    """
    if not weighted_ifs(model):
        return model, None
    feeds = [dict(feed) for feed in feeds]
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    folding = Folding(model)
    while True:
        ifs = [node for node in folded.graph.node if node.op_type == "If"]
        weighted = {node.output[0] for node in weighted_ifs(folded)}
        taken = _conditions(folded, ifs, feeds)
        for node in ifs:
            if taken[node.output[0]] is None and node.output[0] in weighted:
                raise UserError(f"the samples take both branches of If {node.name or node.output[0]!r} (its condition "
                                f"{node.input[0]!r} changes between them), and only one branch can train; compress "
                                "with data that takes one branch (for a model that chooses by an input such as a "
                                "sample rate, one value of it per run)")
        fixed = [node for node in ifs if taken[node.output[0]] is not None]
        if not fixed:
            break
        for node in fixed:
            folding.folded.append(_inline(folded, node, taken[node.output[0]]))
    for line in folding.describe():
        logger.info("If %s (every sample takes it; the other branch keeps its weights)", line)
    return folded, folding


def _is_weight(tensor: onnx.TensorProto) -> bool:
    return tensor.data_type in _FLOAT_TYPES and len(tensor.dims) >= 2


def _holds_weight(graph: onnx.GraphProto) -> bool:
    if any(_is_weight(t) for t in graph.initializer):
        return True
    for node in graph.node:
        if node.op_type == "Constant":
            value = constant_node_value(node)
            if value is not None and value.dtype.kind == "f" and value.ndim >= 2:
                return True
        if any(_holds_weight(sub) for sub in subgraphs(node)):
            return True
    return False


def _conditions(model: onnx.ModelProto, ifs: list[onnx.NodeProto], feeds: list[dict]) -> dict[str, bool | None]:
    """Each If's condition (keyed by the If's first output) on every sample feed: the one value it takes, or
    None where it changes."""
    conds = [node.input[0] for node in ifs]
    constants = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    wanted = [c for c in dict.fromkeys(conds) if c not in constants]
    seen: dict[str, set[bool]] = {c: set() for c in conds}
    for c in conds:
        if c in constants:
            seen[c].add(bool(np.asarray(constants[c]).reshape(-1)[0]))
    if wanted:
        if not feeds:
            raise UserError(f"If {ifs[0].name!r} chooses its branch from the inputs and there are no samples to "
                            "choose by; pass data")
        for values in evaluate(model, wanted, feeds):
            for c, value in zip(wanted, values):
                seen[c].update(bool(v) for v in np.asarray(value).reshape(-1)[:1])
    return {node.output[0]: (next(iter(seen[c])) if len(seen[c]) == 1 else None) for node, c in zip(ifs, conds)}


def _inline(model: onnx.ModelProto, node: onnx.NodeProto, taken: bool) -> Folded:
    """Replace ``node`` (an If of the top graph) by its ``taken`` branch, in place."""
    graph = model.graph
    branch = if_branch(node, taken)
    nodes = list(graph.node)
    index = next(i for i, n in enumerate(nodes) if n is node or (n.output == node.output and n.op_type == "If"))
    record = onnx.NodeProto()
    record.CopyFrom(nodes[index])
    taken_labels = {node_label(n, i) for i, n in enumerate(nodes)}
    names = tensor_names(model)
    new_nodes = []
    for inner in branch.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(inner)
        if copy.op_type == "Constant":
            value = constant_node_value(copy)
            if value is not None and value.dtype.kind == "f" and value.ndim >= 2:
                graph.initializer.append(onnx.numpy_helper.from_array(value, copy.output[0]))
                continue
        copy.name = fresh_name(copy.name or f"{record.name or 'If'}/{copy.op_type}", taken_labels)
        taken_labels.add(copy.name)
        new_nodes.append(copy)
    graph.initializer.extend(branch.initializer)
    graph.sparse_initializer.extend(branch.sparse_initializer)
    for inner_out, out in zip(branch.output, record.output):
        # optimum's merged decoders name each branch's outputs as the If's: the inlined node already makes it.
        if out and inner_out.name != out:
            name = fresh_name(f"{record.name or 'If'}/output_{out}", taken_labels | names)
            taken_labels.add(name)
            new_nodes.append(helper.make_node("Identity", [inner_out.name], [out], name=name))
    top_infos = {v.name for v in graph.value_info}
    brought = [v for v in list(branch.value_info) + list(branch.output) if v.name not in top_infos]
    brought = list({v.name: v for v in brought}.values())
    graph.value_info.extend(brought)
    del graph.node[:]
    graph.node.extend(nodes[:index] + new_nodes + nodes[index + 1:])
    return Folded(record, taken, [n.name for n in new_nodes], [v.name for v in brought])


def _drop_definitions(graph: onnx.GraphProto, defined: set[str]) -> None:
    """Drop the subgraph's own initializers and the nodes that compute names the outer graph defines (lifted
    when its If was folded, written back since: a Constant, or the nodes of a recurrent weight computed from
    constants), so the subgraph reads the outer ones; what only fed a dropped node goes with it."""
    initializers = [t for t in graph.initializer if t.name not in defined]
    if len(initializers) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(initializers)
    dropped = [n for n in graph.node if n.output and all(out in defined for out in n.output if out)]
    if dropped:
        nodes = [n for n in graph.node if n not in dropped]
        if any(n.op_type != "Constant" for n in dropped):  # a computation: its inputs' producers may be dead now
            nodes = live_nodes(nodes, {o.name for o in graph.output})
        del graph.node[:]
        graph.node.extend(nodes)
    for node in graph.node:
        for sub in subgraphs(node):
            _drop_definitions(sub, defined)


def _topological(nodes: list[onnx.NodeProto], available: set[str]) -> list[onnx.NodeProto]:
    """``nodes`` in an order where each follows what it reads (its inputs and its subgraphs' outer reads),
    keeping the given order wherever it already holds."""
    produced = {out for n in nodes for out in n.output if out}
    ready = set(available)
    pending = list(nodes)
    ordered: list[onnx.NodeProto] = []
    while pending:
        for i, node in enumerate(pending):
            needs = ({n for n in node.input if n} | subgraph_reads(node)) & produced
            if needs <= ready:
                ordered.append(pending.pop(i))
                ready.update(o for o in node.output if o)
                break
        else:
            raise RuntimeError("the restored graph has a cycle")
    return ordered
