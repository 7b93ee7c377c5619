"""Evaluate tensors of a graph in onnxruntime, running only the part of the graph that computes them.

onnxruntime runs every node of a graph it is given, whatever outputs are asked for: an If whose condition is
wanted would run both its branch and everything else. ``sliced`` cuts the graph down to what computes the
wanted tensors (outer-scope reads of subgraphs included); ``evaluate`` runs that slice on feeds.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import numpy as np
import onnx
from onnx import helper

from onnx_admm.converters.graphinfo import subgraph_reads


def sliced(model: onnx.ModelProto, outputs: list[str]) -> onnx.ModelProto:
    """The part of ``model`` that computes ``outputs`` (its only outputs, their types left to inference), with
    the inputs and initializers it reads."""
    nodes = list(model.graph.node)
    producers = {out: i for i, node in enumerate(nodes) for out in node.output if out}
    needed, stack, keep = set(), list(outputs), set()
    while stack:
        name = stack.pop()
        if name in needed:
            continue
        needed.add(name)
        index = producers.get(name)
        if index is not None and index not in keep:
            keep.add(index)
            stack.extend(n for n in nodes[index].input if n)
            stack.extend(subgraph_reads(nodes[index]))
    graph = helper.make_graph(
        [node for i, node in enumerate(nodes) if i in keep], "slice",
        [i for i in model.graph.input if i.name in needed],
        [helper.make_empty_tensor_value_info(name) for name in outputs],
        [t for t in model.graph.initializer if t.name in needed],
        sparse_initializer=[t for t in model.graph.sparse_initializer if t.values.name in needed])
    return helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)


def evaluate(model: onnx.ModelProto, names: list[str],
             feeds: Iterable[Mapping[str, np.ndarray]]) -> Iterator[list[np.ndarray]]:
    """The values of ``names`` for each feed (keyed by graph input name; inputs the slice does not read are
    dropped), one list per feed."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(sliced(model, names).SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}
    for feed in feeds:
        yield session.run(names, {k: v for k, v in feed.items() if k in wanted})
