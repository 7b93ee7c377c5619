"""ONNX shape inference, read once into plain dicts: every analysis of a graph asks here.

Inference is best effort: a graph it cannot type (an op it does not know, a custom domain) keeps the
shapes it could find, and whoever needs a missing one stops there with its own message.
"""

from __future__ import annotations

import logging

import onnx

logger = logging.getLogger(__name__)

Dims = tuple[int | str | None, ...]


def dim_value(dim: onnx.TensorShapeProto.Dimension) -> int | str | None:
    """A declared dim: its size, its symbol, or None when unknown.

    A negative size is unknown too: paddle2onnx and tf2onnx write ``dim_value: -1`` for a dynamic
    batch, which onnxruntime runs at any size.
    """
    if dim.HasField("dim_value"):
        return int(dim.dim_value) if dim.dim_value >= 0 else None
    return dim.dim_param or None


def inferred_types(model: onnx.ModelProto, data_prop: bool = False) -> dict[str, tuple[int, Dims | None]]:
    """(elem type, dims) of every typed tensor after ONNX shape inference (non-strict, best effort).

    A dim is its value, its symbol, or None when unknown; dims is None when the rank is unknown.
    ``data_prop`` also propagates constant shape values (Shape -> Gather -> Reshape chains).
    """
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=data_prop)
    except Exception as exc:  # noqa: BLE001 -- inference raises many types; the shapes found so far are kept
        logger.debug("shape inference failed (%s); tensors it did not reach have no shape", exc)
        inferred = model
    result = {}
    graph = inferred.graph
    for value in list(graph.value_info) + list(graph.input) + list(graph.output):
        ttype = value.type.tensor_type
        dims = None
        if ttype.HasField("shape"):
            dims = tuple(dim_value(d) for d in ttype.shape.dim)
        result[value.name] = (ttype.elem_type, dims)
    return result


def inferred_shapes(model: onnx.ModelProto) -> dict[str, tuple[int | None, ...]]:
    """Static shapes from ``inferred_types`` by tensor name; a symbolic or unknown dim is None."""
    return static_shapes(inferred_types(model))


def static_shapes(types: dict[str, tuple[int, Dims | None]]) -> dict[str, tuple[int | None, ...]]:
    """``inferred_shapes`` of types already inferred."""
    return {name: tuple(d if isinstance(d, int) else None for d in dims)
            for name, (_, dims) in types.items() if dims is not None}


def record_output_types(model: onnx.ModelProto, nodes: list[onnx.NodeProto],
                        types: dict[str, tuple[int, Dims | None]] | None = None) -> None:
    """Add the inferred type and dims of ``nodes``' outputs to the graph's value_info, before the nodes move to a
    private domain: shape inference cannot see through such a node, and the types found here carry on past it.

    ``types``: ``inferred_types(model)`` when the caller has it."""
    types = inferred_types(model) if types is None else types
    known = {v.name for v in model.graph.value_info}
    for node in nodes:
        for name in node.output:
            if name and name not in known and name in types:
                elem, dims = types[name]
                model.graph.value_info.append(onnx.helper.make_tensor_value_info(name, elem, dims and list(dims)))
                known.add(name)
