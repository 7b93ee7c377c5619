"""Raising a model's default-domain opset, verified.

An encoding may need a newer opset than the model has (int4 DequantizeLinear: 21, int2: 25). The
raise takes the node rewrites ``onnx.version_converter`` makes (e.g. ReduceMean ``axes`` from attribute
to input at opset 18) but keeps every other byte of the original (node metadata, graph I/O,
initializers: the converter drops metadata and adds value_info). It is kept only if verified in two
separate steps: the raised model passes onnx.checker (``convert_opset``), and it gives the same outputs
as the original in onnxruntime on synthesized inputs (``check_same_outputs``). Measured on the 13 test
models and the digits sample: a plain opset-number bump to 21 and to 25 fails onnx.checker on the
TorchScript transformer (ReduceMean axes), the converter path passes on all 14 with identical
onnxruntime outputs (max diff 6e-8). Neither is a semantic oracle on its own: on GroupNormalization
18 -> 21 the converter changes nothing, onnx.checker passes, and onnxruntime fails at run time --
hence the onnxruntime comparison.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, version_converter

from onnx_admm.converters.errors import first_line
from onnx_admm.converters.graphinfo import fresh_name
from onnx_admm.converters.inputs import synthesize_inputs
from onnx_admm.converters.normalize import densify_sparse_initializers


class OpsetError(Exception):
    """The model's opset cannot be raised (or the raise cannot be verified); the message says why."""


def default_opset(model: onnx.ModelProto) -> int:
    """The model's default-domain opset (0 when it imports none)."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _without_metadata(node: onnx.NodeProto) -> bytes:
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    del copy.metadata_props[:]
    return copy.SerializeToString()


def raise_opset(model: onnx.ModelProto, target: int, node_names: set[str]) -> tuple[onnx.ModelProto, str]:
    """``model`` at default-domain opset ``target``, verified; raises OpsetError when it cannot be.

    Every node ``onnx.version_converter`` leaves unchanged (metadata aside) stays byte-identical; the nodes it
    rewrites keep their name and metadata; nodes it adds get fresh names. Graph I/O, initializers, value_info
    and model metadata are the original's (the converter drops metadata and adds inferred value_info).
    """
    current = default_opset(model)
    # The converter does not know sparse initializers ("input ... is undefined"): show it dense copies.
    dense = onnx.ModelProto()
    dense.CopyFrom(model)
    densify_sparse_initializers(dense)
    try:
        converted = version_converter.convert_version(dense, target)
    except Exception as exc:  # the converter raises bare RuntimeErrors / C++ errors
        raise OpsetError(
            f"onnx.version_converter cannot convert opset {current} to {target}: {first_line(exc)}"
        ) from None
    raised = onnx.ModelProto()
    raised.CopyFrom(model)
    by_name = {n.name: n for n in model.graph.node}
    nodes, rewritten, added = [], [], []
    for node in converted.graph.node:
        original = by_name.get(node.name) if node.name else None
        if original is not None and _without_metadata(original) == _without_metadata(node):
            nodes.append(original)
            continue
        new = onnx.NodeProto()
        new.CopyFrom(node)
        if original is not None:
            del new.metadata_props[:]
            new.metadata_props.extend(original.metadata_props)
            rewritten.append(node.name)
        else:
            new.name = fresh_name(f"opset{target}_{node.op_type}", node_names)
            node_names.add(new.name)
            added.append(new.name)
        nodes.append(new)
    del raised.graph.node[:]
    raised.graph.node.extend(nodes)
    existing = {t.name for t in dense.graph.initializer}
    raised.graph.initializer.extend(t for t in converted.graph.initializer if t.name not in existing)
    for opset in raised.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = target
    # int4 tensors need IR version 10, int2 13: the IR version that goes with the new opset.
    needed_ir = helper.find_min_ir_version_for(list(raised.opset_import), ignore_unknown=True)
    raised.ir_version = max(raised.ir_version, needed_ir)
    try:
        onnx.checker.check_model(raised)
    except Exception as exc:
        raise OpsetError(f"the model at opset {target} fails onnx.checker: {first_line(exc)}") from None
    check_same_outputs(model, raised, target)
    if rewritten or added:
        how = f"rewrote {rewritten} and added {added} as onnx.version_converter does"
    else:
        how = "only the opset number changed (onnx.version_converter rewrites no node)"
    return raised, f"opset {current} -> {target}: {how}; outputs checked identical in onnxruntime"


# How close the raised model's outputs must be to the original's: same kernels give identical outputs; a
# rewritten node (e.g. ReduceMean's axes moved to an input) may differ by rounding.
_RTOL, _ATOL = 1e-5, 1e-6


def check_same_outputs(model: onnx.ModelProto, raised: onnx.ModelProto, target: int) -> None:
    try:
        feeds = synthesize_inputs(model, batch=2, seed=0)
        expected = _run(model, feeds)
    except Exception as exc:
        raise OpsetError(f"cannot verify a raise to opset {target} in onnxruntime: {first_line(exc)}") from None
    try:
        got = _run(raised, feeds)
    except Exception as exc:
        raise OpsetError(f"onnxruntime fails on the model at opset {target}: {first_line(exc)}") from None
    for output, a, b in zip(model.graph.output, expected, got):
        a, b = np.asarray(a), np.asarray(b)
        same = a.shape == b.shape and (
            np.allclose(a, b, rtol=_RTOL, atol=_ATOL, equal_nan=True) if a.dtype.kind in "fc" else np.array_equal(a, b)
        )
        if not same:
            raise OpsetError(f"output {output.name!r} differs in onnxruntime at opset {target}")


def _run(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> list[object]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 4  # a failing candidate model is expected here, not an error to print
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, dict(feeds))
