"""Models from the "hard" exporters (issue 3): recurrent torch models, scikit-learn through skl2onnx,
fixed-batch dynamo exports, single ONNX nodes at chosen opsets. Builders only; fixtures live in the
test modules (tests/test_exporters.py, tests/test_ops.py).

- ``RecurrentClassifier``: a 2-layer bidirectional LSTM or GRU (batch_first) with a Linear head on the
  last step. Both torch exporters write each layer as one ONNX LSTM/GRU node (W, R, B initializers,
  zero initial states computed from the input's run-time shape); GRU with ``linear_before_reset=1``.
- ``export_torch``: either torch exporter, with or without a dynamic batch axis (without: the dynamo
  exporter bakes the example batch into the graph).
- ``sklearn_mlp``: an MLPClassifier trained on scikit-learn's digits, converted by skl2onnx (opset 21,
  ai.onnx.ml ArrayFeatureExtractor for the label, ZipMap for the probabilities unless disabled).
- ``recurrent_node``: one LSTM/GRU/RNN node with every option exposed, and feeds for it.
- ``op_model``: a one-input graph in ONNX text at a given opset, with named float initializers.
- ``ort_quantized``: a float model quantized by onnxruntime.quantization in one of the forms it writes
  (``QUANT_FORMATS``: dynamic, dynamic per channel, QDQ per channel, QOperator), calibrated on given feeds.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

# ----------------------------------------------------------------------------------------------
# torch models
# ----------------------------------------------------------------------------------------------

SEQ, FEATURES, HIDDEN, CLASSES = 7, 10, 12, 5


class RecurrentClassifier(nn.Module):
    """2-layer bidirectional LSTM or GRU over [N, 7, 10], Linear head on the last step's 24 features."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        cls = {"lstm": nn.LSTM, "gru": nn.GRU}[kind]
        self.rnn = cls(FEATURES, HIDDEN, num_layers=2, bidirectional=True, batch_first=True)
        self.fc = nn.Linear(2 * HIDDEN, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.rnn(x)
        return self.fc(y[:, -1])


def recurrent_classifier(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return RecurrentClassifier(kind).eval()


def export_torch(module: nn.Module, example: torch.Tensor, path: Path, exporter: str, dynamic: bool = True,
                 sequence: bool = False) -> Path:
    """Export ``module`` with input ``input`` and output ``logits``.

    Args:
        exporter: ``"torchscript"`` (opset 17) or ``"dynamo"`` (its default opset, weights in ``path.data``).
        dynamic: declare the batch axis dynamic; without it the export batch is baked in.
        sequence: declare axis 1 of the input (a text encoder's sequence length, ``L``) dynamic too.
    """
    path = Path(path)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        warnings.simplefilter("ignore")  # the legacy exporter's DeprecationWarning, tracer warnings
        if exporter == "torchscript":
            axes = {"input": {0: "N", **({1: "L"} if sequence else {})}, "logits": {0: "N"}} if dynamic else None
            torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=17,
                              input_names=["input"], output_names=["logits"], dynamic_axes=axes)
        else:
            dims = {0: torch.export.Dim("N"), **({1: torch.export.Dim("L")} if sequence else {})}
            shapes = (dims,) if dynamic else None
            torch.onnx.export(module, (example,), str(path), dynamo=True, input_names=["input"],
                              output_names=["logits"], dynamic_shapes=shapes)
    return path


# ----------------------------------------------------------------------------------------------
# scikit-learn
# ----------------------------------------------------------------------------------------------


def digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as float32 in [0, 1] and int64 labels."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return (x / 16.0).astype(np.float32), y.astype(np.int64)


def sklearn_mlp(path: Path, zipmap: bool) -> tuple[Path, np.ndarray, np.ndarray]:
    """An MLPClassifier (64-16-10) trained briefly on digits, written by skl2onnx; returns (path, X, classes)."""
    import skl2onnx
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    x, y = digits()
    classifier = MLPClassifier(hidden_layer_sizes=(16,), max_iter=40, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        classifier.fit(x, y)
    options = None if zipmap else {id(classifier): {"zipmap": False}}
    model = skl2onnx.to_onnx(classifier, x[:1], options=options)
    onnx.save(model, str(path))
    return Path(path), x, classifier.classes_


# ----------------------------------------------------------------------------------------------
# single nodes
# ----------------------------------------------------------------------------------------------

_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def recurrent_node(
    op: str,
    direction: str = "forward",
    layout: int = 0,
    opset: int = 17,
    initial_state: bool = False,
    sequence_lens: list[int] | None = None,
    peepholes: bool = False,
    bias: bool = True,
    outputs: int = 3,
    batch: int = 3,
    **attributes,
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """One LSTM/GRU/RNN node (hidden 5, input 4, 6 steps) with random weights, and feeds for ``batch``.

    ``attributes`` go to the node as they are (clip, linear_before_reset, activations ...).
    """
    hidden, features, steps = 5, 4, 6
    gates, dirs = _GATES[op], 2 if direction == "bidirectional" else 1
    rng = np.random.default_rng(0)

    def tensor(name, shape):
        return numpy_helper.from_array(rng.normal(0.0, 0.5, shape).astype(np.float32), name)

    initializers = [tensor("W", (dirs, gates * hidden, features)), tensor("R", (dirs, gates * hidden, hidden))]
    if bias:
        initializers.append(tensor("B", (dirs, 2 * gates * hidden)))
    x_shape = [steps, "N", features] if layout == 0 else ["N", steps, features]
    state_shape = [dirs, "N", hidden] if layout == 0 else ["N", dirs, hidden]
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape)]
    names = ["X", "W", "R", "B" if bias else "", "sequence_lens" if sequence_lens is not None else ""]
    if sequence_lens is not None:
        inputs.append(helper.make_tensor_value_info("sequence_lens", TensorProto.INT32, ["N"]))
    if initial_state:
        names.append("initial_h")
        inputs.append(helper.make_tensor_value_info("initial_h", TensorProto.FLOAT, state_shape))
        if op == "LSTM":
            names.append("initial_c")
            inputs.append(helper.make_tensor_value_info("initial_c", TensorProto.FLOAT, state_shape))
    if peepholes:
        names += [""] * (7 - len(names)) + ["P"]
        initializers.append(tensor("P", (dirs, 3 * hidden)))
    while names[-1] == "":
        names.pop()
    if opset >= 14:
        attributes["layout"] = layout
    out_names = ["Y", "Y_h", "Y_c"][: min(outputs, 3 if op == "LSTM" else 2)]
    node = helper.make_node(op, names, out_names, hidden_size=hidden, direction=direction, **attributes)
    graph = helper.make_graph([node], op.lower(), inputs,
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in out_names],
                              initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    feeds = {"X": rng.normal(size=(steps, batch, features) if layout == 0 else (batch, steps, features))
             .astype(np.float32)}
    if sequence_lens is not None:
        feeds["sequence_lens"] = np.asarray(sequence_lens, np.int32)
    if initial_state:
        shape = (dirs, batch, hidden) if layout == 0 else (batch, dirs, hidden)
        feeds["initial_h"] = rng.normal(size=shape).astype(np.float32)
        if op == "LSTM":
            feeds["initial_c"] = rng.normal(size=shape).astype(np.float32)
    return model, feeds


def op_model(signature: str, body: str, opset: int, initializers: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
    """``<ir_version: 10, opset_import: ["" : opset]> g signature { body }`` plus the initializers."""
    model = onnx.parser.parse_model(f'<ir_version: 10, opset_import: ["" : {opset}]>\ng {signature} {{\n{body}\n}}')
    for name, value in (initializers or {}).items():
        model.graph.initializer.append(numpy_helper.from_array(value, name))
    onnx.checker.check_model(model, full_check=True)
    return model


# ----------------------------------------------------------------------------------------------
# onnxruntime.quantization
# ----------------------------------------------------------------------------------------------

QUANT_FORMATS = ("dynamic", "dynamic_per_channel", "qdq", "qoperator")


def ort_quantized(source: Path, path: Path, form: str, calibration: list[dict[str, np.ndarray]]) -> Path:
    """``source`` quantized by onnxruntime's quantizer as ``form`` (one of ``QUANT_FORMATS``) into ``path``.

    Static forms are calibrated on ``calibration`` (feeds keyed by input name); QDQ is per channel.
    """
    import logging

    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_dynamic, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter(calibration)

        def get_next(self):
            return next(self.feeds, None)

    # The quantizer logs a warning per tensor it cannot type and suggests pre-processing: noise here.
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)
    try:
        if form.startswith("dynamic"):
            quantize_dynamic(str(source), str(path), per_channel=form == "dynamic_per_channel")
        else:
            fmt = QuantFormat.QDQ if form == "qdq" else QuantFormat.QOperator
            quantize_static(str(source), str(path), Reader(), quant_format=fmt, per_channel=form == "qdq")
    finally:
        logging.getLogger().setLevel(level)
    return Path(path)


# ----------------------------------------------------------------------------------------------
# score outputs other than [N, C] (issue 11): sequences, seq-first sequences, argmax ids, maps
# ----------------------------------------------------------------------------------------------

TAGGER_FEATURES, TAGGER_CLASSES = 8, 5


def sequence_tagger(layout: str = "NTC", ids: bool = False, seed: int = 0) -> onnx.ModelProto:
    """Per-position classifier: x -> MatMul 8x64 + Add -> Relu -> MatMul 64x5 + Add -> scores.

    x is [N, T, 8]; ``layout`` "NTC" writes logits[N, T, 5], "TNC" transposes them seq-first to
    [T, N, 5] (as CRNN exports do). With ``ids`` the only graph output is ArgMax over the classes
    (int64 ids[N, T] / [T, N]), so the float logits are an inner tensor. Weights are scaled so the top
    class is confident and depends on the input.
    """
    rng = np.random.default_rng(seed)
    dims = ["N", "T"] if layout == "NTC" else ["T", "N"]
    inits = [numpy_helper.from_array(a.astype(np.float32), name) for name, a in (
        ("W1", rng.normal(0, 0.6, (TAGGER_FEATURES, 64))), ("b1", rng.normal(0, 0.1, 64)),
        ("W2", rng.normal(0, 0.4, (64, TAGGER_CLASSES))), ("b2", rng.normal(0, 0.1, TAGGER_CLASSES)))]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"), helper.make_node("Add", ["h", "b1"], ["hb"], name="b1"),
             helper.make_node("Relu", ["hb"], ["r"], name="relu"), helper.make_node("MatMul", ["r", "W2"], ["s"], name="fc2"),
             helper.make_node("Add", ["s", "b2"], ["logits" if layout == "NTC" else "ntc"], name="b2")]
    if layout != "NTC":
        nodes.append(helper.make_node("Transpose", ["ntc"], ["logits"], name="seq_first", perm=[1, 0, 2]))
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, dims + [TAGGER_CLASSES])]
    if ids:
        nodes.append(helper.make_node("ArgMax", ["logits"], ["ids"], name="argmax", axis=2, keepdims=0))
        outputs = [helper.make_tensor_value_info("ids", TensorProto.INT64, dims)]
    graph = helper.make_graph(nodes, "tagger", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "T", TAGGER_FEATURES])],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def segmenter(seed: int = 0) -> onnx.ModelProto:
    """Dense map: x[N, 3, H, W] -> Conv 3x3 (48) -> Relu -> Conv 1x1 (1) -> Sigmoid -> mask[N, 1, H, W]."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(a.astype(np.float32), name) for name, a in (
        ("W1", rng.normal(0, 0.5, (48, 3, 3, 3))), ("b1", rng.normal(0, 0.1, 48)),
        ("W2", rng.normal(0, 0.8, (1, 48, 1, 1))), ("b2", np.array([-1.0])))]
    nodes = [helper.make_node("Conv", ["x", "W1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "W2", "b2"], ["c2"], name="conv2"),
             helper.make_node("Sigmoid", ["c2"], ["mask"], name="sigmoid")]
    graph = helper.make_graph(nodes, "segmenter", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
                              [helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["N", 1, "H", "W"])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
