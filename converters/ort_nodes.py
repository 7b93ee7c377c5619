"""Nodes that need no gradient and have no torch converter run in onnxruntime inside the imported module.

A torch audio model computes its spectrogram with ``torch.stft`` (an ``STFT`` node), and a scikit-learn
``ColumnTransformer`` selects and one-hot encodes its columns with ``ai.onnx.ml`` ops (``ArrayFeatureExtractor``,
``OneHotEncoder``): onnx2torch has no converter for either, and every trainable weight sits after them, so such
models did not import at all. No gradient has to pass through these nodes: nothing they read depends on a
trainable weight (``graphinfo.weight_dependent``), or their output depends only on a shape (``Size``). So the
normalize pass ``run_in_onnxruntime`` moves them to ``ORT_DOMAIN`` (the original op, domain and opset kept in
reserved attributes), and their converter (registered by ``converters.onnx_ops``) builds ``OrtNode``: a module that
runs that one node in an onnxruntime session, on the CPU, with the tensors it is given. The rest of the model
trains in torch as before; write-back is by tensor name on the original graph, which keeps the node as it was.

A node whose inputs depend on a weight and whose float output feeds the network is not moved: training the
weights before it needs its gradient, so the import stops and names it, as before. Nor are nodes with
subgraphs (their bodies read outer tensors) or string tensors (torch holds none).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import defs, helper
from onnx2torch.node_converters.registry import get_converter
from onnx2torch.utils.common import OnnxToTorchModule
from torch import nn

from onnx_admm.converters.errors import UserError, ort_message
from onnx_admm.converters.graphinfo import SHAPE_ONLY, subgraphs, weight_dependent
from onnx_admm.converters.shapes import inferred_types, record_output_types

logger = logging.getLogger(__name__)

ORT_DOMAIN = "onnx_admm_ort"  # no dots: onnx2torch prefixes module names with the domain
ORT_OP = "Run"
# The moved node's own op, domain and opset, and its model's IR version; its other attributes stay as they were.
_OP, _DOMAIN, _OPSET, _IR = "onnx_admm_op_type", "onnx_admm_domain", "onnx_admm_opset", "onnx_admm_ir_version"
_RESERVED = (_OP, _DOMAIN, _OPSET, _IR)
_STANDARD_DOMAINS = ("", "ai.onnx", "ai.onnx.ml")


def run_in_onnxruntime(model: onnx.ModelProto, converted_opset: int) -> bool:
    """Move the nodes onnx2torch cannot convert and no gradient passes through to ``ORT_DOMAIN`` (module doc).

    Args:
        model: the normalized copy, before its opset is converted.
        converted_opset: the default-domain opset it will be imported at (a converter is looked up there).
    """
    opsets = {("" if o.domain == "ai.onnx" else o.domain): o.version for o in model.opset_import}
    candidates = [node for node in model.graph.node
                  if node.domain in _STANDARD_DOMAINS and not subgraphs(node)
                  and not _has_converter(node, opsets, converted_opset)]
    if not candidates:
        return False
    dependent = weight_dependent(model)
    types = inferred_types(model)
    moved = []
    for node in candidates:
        outputs = [name for name in node.output if name]
        if node.op_type not in SHAPE_ONLY and any(name in dependent for name in node.input):
            continue
        if any(types.get(name, (None,))[0] == onnx.TensorProto.STRING for name in [*outputs, *node.input]):
            continue  # torch holds no strings
        domain = "" if node.domain == "ai.onnx" else node.domain
        node.attribute.extend([helper.make_attribute(_OP, node.op_type), helper.make_attribute(_DOMAIN, domain),
                               helper.make_attribute(_OPSET, opsets.get(domain, 1)),
                               helper.make_attribute(_IR, model.ir_version)])
        node.op_type, node.domain = ORT_OP, ORT_DOMAIN
        moved.append(node)
    record_output_types(model, moved, types)
    if moved:
        model.opset_import.append(helper.make_opsetid(ORT_DOMAIN, 1))
        logger.info("%d node(s) without a torch converter run in onnxruntime, with no gradient through them: %s",
                    len(moved), ", ".join(sorted({_attribute(n, _OP) for n in moved})))
    return bool(moved)


def in_onnxruntime(model: onnx.ModelProto) -> list[str]:
    """One line per node moved to ``ORT_DOMAIN`` in a normalized model: its name, op, domain and opset."""
    lines = []
    for node in model.graph.node:
        if node.domain == ORT_DOMAIN and node.op_type == ORT_OP:
            domain = _attribute(node, _DOMAIN)
            lines.append(f"node {node.name!r}: {domain + '.' if domain else ''}{_attribute(node, _OP)} "
                         f"(opset {_attribute(node, _OPSET)})")
    return lines


def _has_converter(node: onnx.NodeProto, opsets: dict[str, int], converted_opset: int) -> bool:
    domain = "" if node.domain == "ai.onnx" else node.domain
    version = min(opsets.get(domain, converted_opset), converted_opset) if domain == "" else opsets.get(domain, 1)
    if not defs.has(node.op_type, domain):
        return True  # not a standard op: onnxruntime may not run it either, and the import says so
    try:
        get_converter(domain=domain, operation_type=node.op_type, version=version)
    except NotImplementedError:
        return False
    return True


def _attribute(node: onnx.NodeProto, name: str):
    value = helper.get_attribute_value(next(a for a in node.attribute if a.name == name))
    return value.decode() if isinstance(value, bytes) else value


class OrtNode(nn.Module, OnnxToTorchModule):
    """One ONNX node run by onnxruntime on the CPU, its outputs returned on the device of its first input.

    The session is built at the first call from the inputs' element types and ranks (and again if they change);
    copies and pickles drop it, so a teacher copy or a worker process builds its own.
    """

    def __init__(self, node: onnx.NodeProto) -> None:
        super().__init__()
        self.op_type = _attribute(node, _OP)
        self.domain = _attribute(node, _DOMAIN)
        self.opset = int(_attribute(node, _OPSET))
        self.ir_version = int(_attribute(node, _IR))
        original = onnx.NodeProto()
        original.CopyFrom(node)
        del original.attribute[:]
        original.attribute.extend(a for a in node.attribute if a.name not in _RESERVED)
        original.op_type, original.domain = self.op_type, self.domain
        self.node_bytes = original.SerializeToString()
        self.node_name = node.name
        self.input_names = list(node.input)
        self.output_names = list(node.output)
        self._sessions: dict[tuple, ort.InferenceSession] = {}

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_sessions"] = {}
        return state

    def _session(self, arrays: list[np.ndarray | None]) -> ort.InferenceSession:
        key = tuple((a.dtype.str, a.ndim) if a is not None else None for a in arrays)
        session = self._sessions.get(key)
        if session is None:
            node = onnx.NodeProto.FromString(self.node_bytes)
            inputs, seen = [], set()
            for name, array in zip(self.input_names, arrays):
                if name and name not in seen:
                    seen.add(name)
                    elem = helper.np_dtype_to_tensor_dtype(array.dtype)
                    inputs.append(helper.make_tensor_value_info(name, elem, [f"d{k}" for k in range(array.ndim)]))
            outputs = [onnx.ValueInfoProto(name=name) for name in node.output if name]
            graph = helper.make_graph([node], f"{self.op_type}_in_onnxruntime", inputs, outputs)
            imports = [helper.make_opsetid(self.domain, self.opset)]
            if self.domain:
                imports.append(helper.make_opsetid("", 17))
            model = helper.make_model(graph, opset_imports=imports, ir_version=self.ir_version)
            options = ort.SessionOptions()
            options.intra_op_num_threads = max(1, torch.get_num_threads())
            options.inter_op_num_threads = 1
            options.log_severity_level = 4  # its errors become ours (forward), not a second line on stderr
            session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
            self._sessions[key] = session
        return session

    def forward(self, *inputs: torch.Tensor | None):  # noqa: D102
        arrays = [None if x is None else x.detach().cpu().numpy() for x in inputs]
        feeds = {name: array for name, array in zip(self.input_names, arrays) if name and array is not None}
        try:
            results = iter(self._session(arrays).run(None, feeds))
        except Exception as exc:  # onnxruntime raises its own pybind types
            raise UserError(f"node {self.node_name!r} ({self.op_type}, run in onnxruntime) failed on the data: "
                            f"{ort_message(exc)}; give inputs the model accepts (a category it knows, a token id in "
                            "range)") from None
        device = next((x.device for x in inputs if x is not None), torch.device("cpu"))
        # onnx2torch picks a multi-output node's outputs by their index among the node's outputs, unnamed ones too.
        tensors = tuple(torch.from_numpy(np.ascontiguousarray(next(results))).to(device) if name else None
                        for name in self.output_names)
        return tensors[0] if len(tensors) == 1 else tensors

