"""The ONNX test models every test uses: small torch models exported both ways, and hand-written graphs.

Why these models: each one exercises a path the product must handle on real exports.

- ``lenet5``: Caffe LeNet-5 (20-50-500-10) — Conv and Gemm weights, the paper's headline model.
- ``resnet_block``: BatchNormalization *kept* in the graph (TorchScript, training=PRESERVE, no constant
  folding) with random BN statistics, and a residual Add.
- ``mobilenet_block``: depthwise (groups = C) and pointwise convs with ReLU6 (Clip); exported in eval
  mode, so both exporters fold BN into the convs, the usual real-world case.
- ``transformer``: one ``nn.TransformerEncoderLayer``; in both exports the QKV input projection,
  linear1 and linear2 become MatMul with a constant (pre-transposed, renamed ``onnx::MatMul_190`` /
  ``val_2`` ...) operand, which onnx2torch turns into buffers, not Parameters; out_proj and the head
  (2-D inputs) become Gemm.
- ``two_outputs``: logits plus a Softmax of them, for score-output detection.
- ``constant_weights``, ``shared_gemm``, ``shared_matmul``: hand-written ONNX text — weights as Constant
  nodes (as paddle2onnx writes them), one initializer feeding two Gemm nodes through Identity nodes, and
  one MatMul weight used twice in the same role with MatMul + Add instead of Gemm.

What the exporters do here (torch 2.14.1, measured):

- TorchScript (``dynamo=False, opset_version=17``): one self-contained file, dynamic batch through
  ``dynamic_axes``. It emits a DeprecationWarning on every call (dynamo is the default since torch
  2.9); ``export`` silences it because using the legacy exporter is the point here. In eval mode it
  folds BN into the convs (new initializers named ``onnx::Conv_40`` ...), so ``resnet_block`` is exported
  with ``training=PRESERVE, do_constant_folding=False`` to keep the BatchNormalization nodes (the
  dynamo exporter has no such switch: ``resnet_block_dynamo`` has BN folded and ReduceMean for GAP).
  ``nn.TransformerEncoderLayer``'s fused fast path does not export; ``export`` turns it off.
- Dynamo (``dynamo=True``): opset 20 by default, IR version 10. ``torch.onnx.export`` defaults to
  ``external_data=True``, which saves every tensor of 256 bytes or more to ``<file>.onnx.data`` (smaller
  ones, such as 20-element biases, stay inline). All our torch models have larger tensors, so every
  dynamo file here has a sidecar; ``export`` checks that and fails loudly if a torch upgrade changes it.
  The dynamic batch is declared with ``dynamic_shapes`` (a ``torch.export.Dim``), so the files run at any
  batch size (without it the exporter bakes the example batch into Reshape shapes).

Public API: ``MODELS`` (name → ``ModelSpec``), ``ONNX_FILES`` (file key → (model name, exporter)),
``file_key``, ``export(name, exporter, path)``, the test oracle ``expected_weight_names(model_proto)``,
``has_external_data``, and the fixture value types ``OnnxFile`` and ``DigitsSample``.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import onnx.parser
import torch
from torch import nn

Exporter = Literal["torchscript", "dynamo", "text"]

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
# The TorchScript exporter's opset must be one onnx2torch reads without conversion.
TORCHSCRIPT_OPSET = 17


# ----------------------------------------------------------------------------------------------
# Torch models
# ----------------------------------------------------------------------------------------------


def _randomise_batchnorm(module: nn.Module) -> None:
    """Give every BatchNorm random, mutually different statistics and affine parameters.

    Untrained BN has weight = running_var = 1 and bias = running_mean = 0, and the exporters merge
    equal initializers into one, which would hide the per-role tensors tests need.
    """
    for bn in module.modules():
        if isinstance(bn, nn.BatchNorm2d):
            c = bn.num_features
            with torch.no_grad():
                bn.running_mean.copy_(torch.randn(c) * 0.1)
                bn.running_var.copy_(torch.rand(c) + 0.5)
                bn.weight.copy_(torch.rand(c) + 0.5)
                bn.bias.copy_(torch.randn(c) * 0.1)


class LeNet5(nn.Module):
    """Caffe LeNet-5: conv 20 5x5, maxpool, conv 50 5x5, maxpool, fc 500, relu, fc 10 (431k weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.fc1 = nn.Linear(800, 500)
        self.fc2 = nn.Linear(500, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(self.conv1(x), 2)
        x = nn.functional.max_pool2d(self.conv2(x), 2)
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


class ResNetBlock(nn.Module):
    """Stem conv + BN, one basic residual block (conv-BN-relu-conv-BN + identity), GAP, Linear head."""

    def __init__(self, channels: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn0(self.stem(x)))
        y = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(y)) + x)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class MobileNetBlock(nn.Module):
    """Stem conv, a depthwise-separable block (depthwise 3x3 groups=C, pointwise 1x1), ReLU6, GAP, head."""

    def __init__(self, channels: int = 8, expanded: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, channels, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU6(),
        )
        self.depthwise = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU6(),
        )
        self.pointwise = nn.Sequential(
            nn.Conv2d(channels, expanded, 1, bias=False),
            nn.BatchNorm2d(expanded),
            nn.ReLU6(),
        )
        self.fc = nn.Linear(expanded, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pointwise(self.depthwise(self.stem(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class ResidualStages(nn.Module):
    """Stem, then two stages of one basic block each (the second halves the size through a stride-2 conv
    and a 1x1 downsample conv), GAP, Linear head: two coupled groups of three and two convs."""

    def __init__(self, channels: int = 8, classes: int = 10) -> None:
        super().__init__()
        wide = 2 * channels

        def conv_bn(cin: int, cout: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout))

        self.stem = conv_bn(3, channels)
        self.a1, self.a2 = conv_bn(channels, channels), conv_bn(channels, channels)
        self.b1, self.b2 = conv_bn(channels, wide, stride=2), conv_bn(wide, wide)
        self.down = conv_bn(channels, wide, kernel=1, stride=2)
        self.fc = nn.Linear(wide, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(self.a2(torch.relu(self.a1(x))) + x)
        x = torch.relu(self.b2(torch.relu(self.b1(x))) + self.down(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class ConcatBranches(nn.Module):
    """Two conv branches (6 and 10 channels) concatenated, BatchNorm over the 16, a conv, GAP, head."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.left = nn.Conv2d(3, 6, 3, padding=1)
        self.right = nn.Conv2d(3, 10, 1)
        self.bn = nn.BatchNorm2d(16)
        self.mix = nn.Conv2d(16, 12, 3, padding=1)
        self.fc = nn.Linear(12, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(torch.cat([torch.relu(self.left(x)), torch.relu(self.right(x))], 1))
        x = torch.relu(self.mix(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class TransformerClassifier(nn.Module):
    """One encoder layer (d_model 32, 4 heads, ff 64, batch_first) and a Linear head on the token mean."""

    def __init__(self, d_model: int = 32, classes: int = 10) -> None:
        super().__init__()
        # dropout=0 so eval and train graphs agree and nothing random is exported.
        self.encoder = nn.TransformerEncoderLayer(
            d_model, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True
        )
        self.fc = nn.Linear(d_model, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.encoder(x).mean(dim=1))


class TwoOutputs(nn.Module):
    """A tiny MLP returning (logits, softmax(logits)): two float [N, C] outputs, the second normalised."""

    def __init__(self, features: int = 16, hidden: int = 32, classes: int = 5) -> None:
        super().__init__()
        self.fc1 = nn.Linear(features, hidden)
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.fc2(torch.relu(self.fc1(x)))
        return logits, torch.softmax(logits, dim=1)


# ----------------------------------------------------------------------------------------------
# Hand-written graphs (ONNX text)
# ----------------------------------------------------------------------------------------------


def _floats(shape: tuple[int, ...], seed: int) -> str:
    """Deterministic float values as an ONNX-text tensor literal body, e.g. ``{0.1, -0.2}``."""
    values = np.random.default_rng(seed).normal(0.0, 0.3, size=int(np.prod(shape)))
    return "{" + ", ".join(f"{v:.4f}" for v in values) + "}"


def _constant_weights_text() -> str:
    # Weights as Constant nodes and no initializers at all: what paddle2onnx writes.
    return f"""
    <ir_version: 8, opset_import: ["" : 17]>
    constant_weights (float[N, 1, 8, 8] input) => (float[N, 10] logits) {{
        conv_w = Constant <value = float[4, 1, 3, 3] conv_w_value {_floats((4, 1, 3, 3), 1)}> ()
        conv_b = Constant <value = float[4] conv_b_value {_floats((4,), 2)}> ()
        fc_w = Constant <value = float[10, 144] fc_w_value {_floats((10, 144), 3)}> ()
        fc_b = Constant <value = float[10] fc_b_value {_floats((10,), 4)}> ()
        conv = Conv <kernel_shape = [3, 3]> (input, conv_w, conv_b)
        relu = Relu (conv)
        flat = Flatten <axis = 1> (relu)
        logits = Gemm <transB = 1> (flat, fc_w, fc_b)
    }}
    """


def _same_padding_text() -> str:
    # Keras-era padding: auto_pad SAME_UPPER / SAME_LOWER on Conv, MaxPool and ConvTranspose (older tf2onnx,
    # keras2onnx, tflite converters) and an AveragePool whose pads differ between the ends (onnx-caffe2's
    # Inception).
    return f"""
    <ir_version: 8, opset_import: ["" : 17]>
    same_padding (float[N, 3, 9, 9] input) => (float[N, 10] logits)
    <float[8, 3, 3, 3] conv1_w = {_floats((8, 3, 3, 3), 10)}, float[8] conv1_b = {_floats((8,), 11)},
     float[8, 8, 2, 2] conv2_w = {_floats((8, 8, 2, 2), 12)}, float[8, 4, 3, 3] up_w = {_floats((8, 4, 3, 3), 15)},
     float[4] up_b = {_floats((4,), 16)}, float[10, 64] fc_w = {_floats((10, 64), 13)},
     float[10] fc_b = {_floats((10,), 14)}> {{
        c1 = Conv <auto_pad = "SAME_UPPER", strides = [2, 2]> (input, conv1_w, conv1_b)
        r1 = Relu (c1)
        p1 = AveragePool <kernel_shape = [3, 3], pads = [0, 0, 1, 1]> (r1)
        c2 = Conv <auto_pad = "SAME_LOWER", kernel_shape = [2, 2]> (p1, conv2_w)
        r2 = Relu (c2)
        p2 = MaxPool <kernel_shape = [2, 2], strides = [2, 2], auto_pad = "SAME_UPPER"> (r2)
        up = ConvTranspose <auto_pad = "SAME_UPPER", strides = [2, 2]> (p2, up_w, up_b)
        flat = Flatten <axis = 1> (up)
        logits = Gemm <transB = 1> (flat, fc_w, fc_b)
    }}
    """


def _shared_gemm_text() -> str:
    # One initializer feeding two Gemm nodes, each through its own Identity: how the exporters
    # write a tensor that several nodes use. Both uses are the same role (Gemm B).
    return f"""
    <ir_version: 8, opset_import: ["" : 17]>
    shared_gemm (float[N, 16] input) => (float[N, 16] logits)
    <float[16, 16] shared_w = {_floats((16, 16), 5)}, float[16] b1 = {_floats((16,), 6)},
     float[16] b2 = {_floats((16,), 7)}> {{
        w1 = Identity (shared_w)
        w2 = Identity (shared_w)
        h = Gemm <transB = 1> (input, w1, b1)
        r = Relu (h)
        logits = Gemm <transB = 1> (r, w2, b2)
    }}
    """


def _shared_matmul_text() -> str:
    # MatMul + Add instead of Gemm (how exporters write Linear on 3-D inputs and sklearn MLPs);
    # the same weight is the right-hand operand of both MatMul nodes, directly, no Identity.
    return f"""
    <ir_version: 8, opset_import: ["" : 17]>
    shared_matmul (float[N, 12] input) => (float[N, 4] logits)
    <float[12, 12] w = {_floats((12, 12), 8)}, float[12] b1 = {_floats((12,), 9)},
     float[12] b2 = {_floats((12,), 10)}, float[12, 4] head_w = {_floats((12, 4), 11)}> {{
        m1 = MatMul (input, w)
        a1 = Add (m1, b1)
        r1 = Relu (a1)
        m2 = MatMul (r1, w)
        a2 = Add (m2, b2)
        r2 = Relu (a2)
        logits = MatMul (r2, head_w)
    }}
    """


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One test model and how to turn it into an ONNX file.

    Attributes:
        name: Registry key.
        input_shape: Shape of one sample (no batch axis); the graph input is ``[N, *input_shape]``.
        weights: What a user expects to be compressed, in their own words: torch parameter names for
            torch models (one entry per weight tensor), tensor names for hand-written graphs. Tests
            compare its length with ``expected_weight_names`` of the exported graph.
        factory: Builds the torch module (torch models only), seeded and in eval mode.
        text: Builds the ONNX text (hand-written graphs only).
        keep_batchnorm: Export in PRESERVE training mode without constant folding so BN nodes stay.
        output_names: Graph output names.
    """

    name: str
    input_shape: tuple[int, ...]
    weights: tuple[str, ...]
    factory: Callable[[], nn.Module] | None = None
    text: Callable[[], str] | None = None
    keep_batchnorm: bool = False
    output_names: tuple[str, ...] = (OUTPUT_NAME,)

    @property
    def exporters(self) -> tuple[Exporter, ...]:
        """Torch models are written by both torch exporters; hand-written graphs by the ONNX parser."""
        return ("text",) if self.text is not None else ("torchscript", "dynamo")

    def example_input(self, batch: int = 2, seed: int = 0) -> np.ndarray:
        """A deterministic float32 input batch ``[batch, *input_shape]``."""
        rng = np.random.default_rng(seed)
        return rng.standard_normal((batch, *self.input_shape)).astype(np.float32)

    def build(self) -> nn.Module:
        """The seeded torch module in eval mode (BN statistics randomised where it has BN)."""
        if self.factory is None:
            raise ValueError(f"{self.name} is a hand-written graph; it has no torch module")
        # Seed per model, so one model's weights do not depend on which others were built first.
        torch.manual_seed(0)
        module = self.factory()
        _randomise_batchnorm(module)
        return module.eval()


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            "lenet5",
            (1, 28, 28),
            weights=("conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"),
            factory=LeNet5,
        ),
        ModelSpec(
            "resnet_block",
            (3, 16, 16),
            weights=("stem.weight", "conv1.weight", "conv2.weight", "fc.weight"),
            factory=ResNetBlock,
            keep_batchnorm=True,
        ),
        ModelSpec(
            "mobilenet_block",
            (3, 16, 16),
            weights=("stem.0.weight", "depthwise.0.weight", "pointwise.0.weight", "fc.weight"),
            factory=MobileNetBlock,
        ),
        ModelSpec(
            "transformer",
            (6, 32),
            weights=(
                "encoder.self_attn.in_proj_weight",
                "encoder.self_attn.out_proj.weight",
                "encoder.linear1.weight",
                "encoder.linear2.weight",
                "fc.weight",
            ),
            factory=TransformerClassifier,
        ),
        ModelSpec(
            "two_outputs",
            (16,),
            weights=("fc1.weight", "fc2.weight"),
            factory=TwoOutputs,
            output_names=("logits", "probs"),
        ),
        ModelSpec(
            "constant_weights",
            (1, 8, 8),
            weights=("conv_w", "fc_w"),
            text=_constant_weights_text,
        ),
        ModelSpec(
            "same_padding",
            (3, 9, 9),
            weights=("conv1_w", "conv2_w", "up_w", "fc_w"),
            text=_same_padding_text,
        ),
        ModelSpec(
            "shared_gemm",
            (16,),
            weights=("shared_w",),
            text=_shared_gemm_text,
        ),
        ModelSpec(
            "shared_matmul",
            (12,),
            weights=("w", "head_w"),
            text=_shared_matmul_text,
        ),
    )
}


def file_key(name: str, exporter: Exporter) -> str:
    """The key of one exported file: ``lenet5_torchscript``, ``lenet5_dynamo``; hand-written: the name."""
    return name if exporter == "text" else f"{name}_{exporter}"


ONNX_FILES: dict[str, tuple[str, Exporter]] = {
    file_key(spec.name, exporter): (spec.name, exporter)
    for spec in MODELS.values()
    for exporter in spec.exporters
}


DIGITS_DIR = Path(__file__).resolve().parent.parent / "samples" / "digits"


@dataclasses.dataclass(frozen=True)
class DigitsSample:
    """The committed digits sample (samples/digits/README.md): what the ``digits_sample`` fixture yields."""

    dir: Path
    model: Path
    train: Path
    test: Path
    recipe: Path


@dataclasses.dataclass(frozen=True)
class OnnxFile:
    """One exported file with what made it (what the ``any_onnx_model`` fixture yields)."""

    key: str
    spec: ModelSpec
    exporter: Exporter
    path: Path


# ----------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------


def _export_torchscript(spec: ModelSpec, module: nn.Module, example: torch.Tensor, path: Path) -> None:
    dynamic_axes = {n: {0: "N"} for n in (INPUT_NAME, *spec.output_names)}
    kwargs: dict[str, object] = {}
    if spec.keep_batchnorm:
        # Eval-mode export folds BN into Conv; PRESERVE + no folding keeps the BatchNormalization nodes.
        kwargs = {"training": torch.onnx.TrainingMode.PRESERVE, "do_constant_folding": False}
    with warnings.catch_warnings():
        # "You are using the legacy TorchScript-based ONNX export": deliberate, see the module docstring.
        warnings.simplefilter("ignore", DeprecationWarning)
        # MultiheadAttention's Python shape checks; the shapes they test are fixed by the model.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            module,
            (example,),
            str(path),
            dynamo=False,
            opset_version=TORCHSCRIPT_OPSET,
            input_names=[INPUT_NAME],
            output_names=list(spec.output_names),
            dynamic_axes=dynamic_axes,
            **kwargs,
        )


def _export_dynamo(spec: ModelSpec, module: nn.Module, example: torch.Tensor, path: Path) -> None:
    torch.onnx.export(
        module,
        (example,),
        str(path),
        dynamo=True,
        input_names=[INPUT_NAME],
        output_names=list(spec.output_names),
        dynamic_shapes=({0: torch.export.Dim("N")},),
        verbose=False,
    )
    if not has_external_data(onnx.load(str(path), load_external_data=False)):
        raise RuntimeError(f"the dynamo exporter wrote {path} without external data; see models.py")


def export(name: str, exporter: Exporter, path: Path | str) -> Path:
    """Write model ``name`` with ``exporter`` to ``path`` (a dynamo export adds ``<path>.data``).

    Args:
        name: A key of ``MODELS``.
        exporter: ``"torchscript"``, ``"dynamo"`` or ``"text"``; must be one of the spec's exporters.
        path: The ``.onnx`` file to write; its folder must exist.

    Returns:
        ``path`` as a Path.
    """
    spec = MODELS[name]
    if exporter not in spec.exporters:
        raise ValueError(f"{name} is exported with {spec.exporters}, not {exporter!r}")
    path = Path(path)
    if exporter == "text":
        assert spec.text is not None
        model = onnx.parser.parse_model(spec.text())
        onnx.checker.check_model(model, full_check=True)
        onnx.save(model, str(path))
        return path
    module = spec.build()
    # Batch 2, not 1: a size-1 example would invite the exporters to specialise the batch axis.
    example = torch.from_numpy(spec.example_input(batch=2))
    # In eval mode under no_grad, TransformerEncoderLayer takes a fused fast path
    # (aten::_transformer_encoder_layer_fwd) that the TorchScript exporter cannot write; the plain
    # path exports as MatMul/Softmax/LayerNormalization nodes, as real exports of such models look.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            if exporter == "torchscript":
                _export_torchscript(spec, module, example, path)
            else:
                _export_dynamo(spec, module, example, path)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return path


# ----------------------------------------------------------------------------------------------
# Test oracle
# ----------------------------------------------------------------------------------------------

# Which inputs of each op hold the weight a user compresses. MatMul: whichever operand is constant.
_WEIGHT_INPUTS: dict[str, tuple[int, ...]] = {
    "Conv": (1,),
    "ConvTranspose": (1,),
    "Gemm": (1,),
    "MatMul": (1, 0),
    "Gather": (0,),
}
_FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
    onnx.TensorProto.DOUBLE,
}


def has_external_data(model: onnx.ModelProto) -> bool:
    """Whether any initializer of the (unloaded) model lives in an external file."""
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def expected_weight_names(model: onnx.ModelProto) -> list[str]:
    """The compressible weight tensors of a graph, found independently of the product's code.

    For every Conv/ConvTranspose/Gemm weight input, the constant operand of MatMul and the table of
    Gather, follow Identity nodes back to an initializer or a Constant node's output. Float tensors
    only (a Gather on an int64 shape constant is not a weight). Each name appears once, in graph
    order, however many nodes use it.
    """
    initializers = {t.name: t for t in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}

    def source(name: str) -> str | None:
        """The initializer or Constant output behind ``name``, through Identity nodes; else None."""
        while name not in initializers:
            node = producers.get(name)
            if node is None:
                return None
            if node.op_type == "Constant":
                value = next((a.t for a in node.attribute if a.name == "value"), None)
                return name if value is not None and value.data_type in _FLOAT_TYPES else None
            if node.op_type != "Identity":
                return None
            name = node.input[0]
        return name if initializers[name].data_type in _FLOAT_TYPES else None

    found: list[str] = []
    for node in model.graph.node:
        for index in _WEIGHT_INPUTS.get(node.op_type, ()):
            if index >= len(node.input):
                continue
            weight = source(node.input[index])
            if weight is not None:
                if weight not in found:
                    found.append(weight)
                break  # MatMul: a constant right operand wins; the left one is only a fallback
    return found

