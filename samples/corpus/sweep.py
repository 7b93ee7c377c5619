"""The corpus sweep: real and exported models through ``check`` and a label-free 50% compress.

``python samples/corpus/sweep.py [--work DIR] [--only NAME,...] [--samples N]`` builds or collects each
corpus model into the work folder (default ``out/corpus``), then for each one runs ``check``,
``compress --sparsity 0.5 --admm-epochs 2 --retrain-epochs 1`` without labels (the original is the
teacher) on synthetic inputs or the data a source ships, and measures a training step of the
converted module against onnxruntime's inference on the same batch (``speed.py``). It prints a
markdown table (model, source / exporter, params, check, top-1 agreement of the compressed model
with the original in onnxruntime on held-out inputs, train-step / inference time, failure reason);
``samples/corpus/RESULTS.md`` holds the one measured here.

Models come from:
- ``samples/digits`` (the bundled trained CNN) and onnxruntime.quantization's three forms of it;
- torchvision classifiers with random weights (resnet18, mobilenet_v3_small, squeezenet1_1) through
  the TorchScript and dynamo exporters, with a dynamic and a fixed batch, fitted briefly to templated
  images they ship as their data;
- a torch TransformerEncoder (dynamo) and a bidirectional LSTM classifier (TorchScript);
- a ViT-style transformer trained here on scikit-learn's digits (``vit.py``, dynamo): the trained
  counterpart of the random-weight encoder;
- a CRNN-style recognizer (convs + GRU, seq-first [T, N, C] log-probabilities and their int64 ArgMax
  ids, TorchScript) and an encoder-decoder segmenter ([N, 1, H, W] Sigmoid map, dynamo);
- two imbalanced-output models trained here on synthetic data (``synthetic.py``): a CTC captcha reader
  (ResNet-style convs + BiLSTM, [T, N, C] log-probabilities, mostly blank; TorchScript) and a two-input
  1-D event detector (dilated Conv1d encoder, ConvTranspose1d decoder, a [N, L, 1] Sigmoid map with
  about 7% positives and a [N, 32, 3] detection tensor; TorchScript), whose built files are cached in
  the work folder;
- scikit-learn's MLPClassifier through skl2onnx;
- a PaddleOCR-style CTC recognizer and DB text detector trained in PaddlePaddle on synthetic digit lines and
  exported by paddle2onnx (``paddle_ocr/``, committed files; fed lines and pages of ``glyphs.py``);
- a hand-built graph in tf2onnx's style (int32 bytes -> OneHot, LayerNormalization written as
  ReduceMean/Sub/Pow/Sqrt/Div, Gather, MatMul);
- files and weights shipped inside PyPI wheels, used when the package is installed (nothing is
  downloaded at run time): ``pip install nudenet`` (a YOLOv8n detector, 320n.onnx, exported by
  ultralytics), ``pip install facenet-pytorch tqdm`` (the trained MTCNN ONet weights, exported here), and
  the onnx package's own ``backend/test/data/light`` models (onnx-caffe2 exports, weights given here).
Every random-weight model is first trained for a few dozen steps on synthetic, input-dependent labels
(``_fit``; through onnx-admm's import for the ONNX-only graphs, ``_calibrate_onnx``): random weights give
near-uniform, often input-independent scores, where a top-1 agreement figure measures noise.
Needs the test extras (torchvision, onnxscript, scikit-learn, skl2onnx).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import logging
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from onnx_admm.converters.errors import UserError  # noqa: E402
from onnx_admm.converters.graphinfo import graph_inputs  # noqa: E402
from onnx_admm.converters.inputs import synthesize_inputs  # noqa: E402
from onnx_admm.converters.modelio import load_model  # noqa: E402
from onnx_admm.api import compress  # noqa: E402
from onnx_admm.check import check  # noqa: E402
from onnx_admm.data import from_arrays  # noqa: E402
from onnx_admm.recipe import CompressConfig  # noqa: E402
from speed import train_and_infer_ms  # noqa: E402
from synthetic import captcha_ctc, detector_1d  # noqa: E402
from vit import digits_vit  # noqa: E402
import vad  # noqa: E402
import seq2seq  # noqa: E402
import yolo  # noqa: E402
import frontends  # noqa: E402

Feeds = dict[str, np.ndarray]


@dataclass
class Entry:
    name: str
    source: str
    exporter: str
    build: Callable[[Path], tuple[Path, Feeds | None]]  # -> model path, representative inputs (or None)
    needs: str | None = None  # importable module the source needs (else the entry is skipped)


# ----------------------------------------------------------------------------------------------------
# builders
# ----------------------------------------------------------------------------------------------------

def _quiet_export(module: torch.nn.Module, example: torch.Tensor, path: Path, dynamo: bool, dynamic: bool) -> Path:
    from exporter_models import export_torch

    return export_torch(module.eval(), example, path, "dynamo" if dynamo else "torchscript", dynamic=dynamic)


def _synthetic_labels(x: torch.Tensor, classes: int, seed: int = 0) -> torch.Tensor:
    """Input-dependent class ids a model can learn: argmax of a fixed random projection of coarse input
    features (2x2 average-pooled images, time-averaged sequences, byte histograms)."""
    if not x.is_floating_point():
        features = torch.nn.functional.one_hot(x.long().clamp(0, 255), 256).float().mean(1)
    elif x.dim() == 4:
        features = torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)
    elif x.dim() == 3:
        features = x.mean(1)
    else:
        features = x.flatten(1)
    features = (features - features.mean(0)) / (features.std(0) + 1e-6)
    projection = torch.randn(features.shape[1], classes, generator=torch.Generator().manual_seed(seed))
    return (features @ projection).argmax(1)


def _fit(module: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor, steps: int, pick=lambda out: out,
         batch: int = 32, lr: float = 2e-3) -> None:
    """A few Adam steps of cross-entropy on synthetic labels, so a random-weight model's scores are
    confident and depend on the input (random weights give near-uniform, often input-independent scores,
    where top-1 agreement measures noise). Eval mode: BatchNorm statistics stay as they are.

    ``pick`` takes the module's output to [N, C] logits, or to [N, C, positions] with labels [N, positions].
    """
    module.eval()
    optimizer = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=g)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(pick(module(x[idx])), labels[idx]).backward()
        optimizer.step()
    module.eval()


def _calibrate_onnx(path: Path, x: np.ndarray, steps: int, out: Path) -> Path:
    """``_fit`` for a model that exists only as ONNX: trained through onnx-admm's own import, the weights
    written back into the same graph (the exporter's nodes, names and I/O stay)."""
    from onnx_admm.converters.importer import import_model
    from onnx_admm.converters.modelio import save_model
    from onnx_admm.converters.writeback import write_back

    imported = import_model(load_model(path))
    index = imported.score.index
    xt = torch.from_numpy(x)
    with torch.no_grad():
        classes = imported.module(xt[:2])[index].shape[-1]
    kind = imported.score.kind
    pick = (lambda o: torch.log(o[index].clamp_min(1e-12))) if kind == "probabilities" else (lambda o: o[index])
    _fit(imported.module, xt, _synthetic_labels(xt, classes), steps, pick)
    save_model(write_back(imported.original, imported.updates()).model, out)
    return out


def _templated_images(n: int, size: int, classes: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images a CNN can tell apart: one smooth random template per class (4x4 noise, upsampled) plus
    pixel noise. On pure-noise images the synthetic labels are beyond a deep CNN's few dozen steps, and
    resnet18, mobilenet_v3_small and squeezenet gave every input the same class."""
    templates = torch.nn.functional.interpolate(torch.randn(classes, 3, 4, 4, generator=torch.Generator().manual_seed(123)),
                                                size=size, mode="bilinear", align_corners=False)
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    return templates[labels] + 0.8 * torch.randn(n, 3, size, size, generator=g), labels


def _batchnorm_statistics(module: torch.nn.Module, x: torch.Tensor, batch: int = 64) -> None:
    """Set every BatchNorm's running statistics to those of ``x`` (a cumulative average over its batches)."""
    norms = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    module.train()
    with torch.no_grad():
        for i in range(0, len(x), batch):
            module(x[i:i + batch])
    module.eval()


def _torchvision(arch: str, dynamo: bool, dynamic: bool, size: int = 64, steps: int = 60):
    """A torchvision classifier with random weights fitted briefly to templated images, which it ships as
    its data (so the compress and its held-out figures see the inputs it tells apart)."""
    def build(work: Path) -> tuple[Path, Feeds | None]:
        import torchvision

        torch.manual_seed(0)
        model = getattr(torchvision.models, arch)(weights=None, num_classes=10)
        x, labels = _templated_images(512, size)
        _batchnorm_statistics(model, x)
        _fit(model, x, labels, steps)
        batch = 2 if dynamic else 1
        path = _quiet_export(model, torch.randn(batch, 3, size, size), work / f"{arch}.onnx", dynamo, dynamic)
        return path, {onnx.load(str(path), load_external_data=False).graph.input[0].name: x.numpy()}

    return build


def _transformer(work: Path) -> tuple[Path, Feeds | None]:
    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            layer = torch.nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
            self.encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.head = torch.nn.Linear(64, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.encoder(x).mean(1))

    torch.manual_seed(0)
    model, x = Encoder(), torch.randn(512, 16, 64)
    _fit(model, x, _synthetic_labels(x, 10), 60)
    return _quiet_export(model, torch.randn(2, 16, 64), work / "transformer.onnx", True, True), None


def _lstm(work: Path) -> tuple[Path, Feeds | None]:
    from exporter_models import recurrent_classifier

    torch.manual_seed(0)
    model, x = recurrent_classifier("lstm"), torch.randn(512, 7, 10)
    _fit(model, x, _synthetic_labels(x, 5), 60)
    return _quiet_export(model, torch.randn(2, 7, 10), work / "lstm.onnx", False, True), None


class _Crnn(torch.nn.Module):
    """A small CRNN text recognizer: convs over a [N, 1, 16, 64] line image, a bidirectional GRU over its
    16 columns, a Linear head; seq-first log-probabilities [16, N, 12] (what CTC exports write) and
    their ArgMax ids [16, N]."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Sequential(torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                                        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(),
                                        torch.nn.MaxPool2d((2, 1)))
        self.rnn = torch.nn.GRU(32 * 4, 48, bidirectional=True)
        self.head = torch.nn.Linear(96, 12)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        f = self.conv(x)  # [N, 32, 4, 32]
        seq = f.flatten(1, 2).permute(2, 0, 1)  # [T=32, N, 128]
        return self.head(self.rnn(seq)[0])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logp = torch.log_softmax(self.logits(x), -1)
        return logp, logp.argmax(-1)


def _crnn(work: Path) -> tuple[Path, Feeds | None]:
    torch.manual_seed(0)
    model, x = _Crnn(), torch.randn(512, 1, 16, 64)
    # One label per column: the sign pattern of a fixed projection of that column's pixels.
    columns = torch.nn.functional.avg_pool2d(x, (16, 2)).flatten(1)  # [N, 32]
    labels = ((columns.unsqueeze(-1) * torch.linspace(-2, 2, 12)).argmax(-1)).long()  # [N, 32]
    _fit(model, x, labels, 80, pick=lambda out: out[0].permute(1, 2, 0))
    return _quiet_export(model, torch.randn(2, 1, 16, 64), work / "crnn.onnx", False, True), None


class _Segmenter(torch.nn.Module):
    """A small encoder-decoder segmenter: [N, 3, 32, 32] -> [N, 1, 32, 32] Sigmoid probabilities."""

    def __init__(self) -> None:
        super().__init__()
        c = torch.nn.Conv2d
        self.down = torch.nn.Sequential(c(3, 16, 3, padding=1), torch.nn.ReLU(), c(16, 32, 3, stride=2, padding=1),
                                        torch.nn.ReLU())
        self.up = torch.nn.Sequential(torch.nn.ConvTranspose2d(32, 16, 2, stride=2), torch.nn.ReLU(), c(16, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.up(self.down(x)))


def _segmenter(work: Path) -> tuple[Path, Feeds | None]:
    torch.manual_seed(0)
    model, x = _Segmenter(), torch.randn(512, 3, 32, 32)
    # Foreground where the locally smoothed first channel is above the second.
    smooth = torch.nn.functional.avg_pool2d(x[:, :2], 5, stride=1, padding=2)
    mask = (smooth[:, :1] > smooth[:, 1:]).float()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(80):
        idx = torch.randint(0, len(x), (32,), generator=g)
        optimizer.zero_grad()
        torch.nn.functional.binary_cross_entropy(model(x[idx]), mask[idx]).backward()
        optimizer.step()
    return _quiet_export(model.eval(), torch.randn(2, 3, 32, 32), work / "segmenter.onnx", True, True), None


def _digits(work: Path) -> tuple[Path, Feeds | None]:
    return ROOT / "samples/digits/model.onnx", {"input": np.load(ROOT / "samples/digits/train.npz")["input"]}


def _digits_quantized(form: str):
    def build(work: Path) -> tuple[Path, Feeds | None]:
        from exporter_models import ort_quantized

        x = np.load(ROOT / "samples/digits/train.npz")["input"]
        calibration = [{"input": x[i:i + 16]} for i in range(0, 256, 16)]
        return ort_quantized(ROOT / "samples/digits/model.onnx", work / f"digits.{form}.onnx", form, calibration), {"input": x}

    return build


def _sklearn(work: Path) -> tuple[Path, Feeds | None]:
    from exporter_models import sklearn_mlp

    path, x, _ = sklearn_mlp(work / "sklearn_mlp.onnx", zipmap=False)
    return path, {onnx.load(str(path)).graph.input[0].name: x}


def _sklearn_pipeline(work: Path) -> tuple[Path, Feeds | None]:
    """SimpleImputer + StandardScaler + MLPClassifier (64-32-10) on digits with a tenth of the values missing
    (NaN), written by skl2onnx: its Imputer and Scaler nodes come ahead of the network."""
    import warnings

    from skl2onnx import to_onnx
    from sklearn.datasets import load_digits
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.impute import SimpleImputer
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32)
    x[np.random.default_rng(0).random(x.shape) < 0.1] = np.nan
    pipe = make_pipeline(SimpleImputer(), StandardScaler(), MLPClassifier(hidden_layer_sizes=(32,), max_iter=100,
                                                                          random_state=0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        pipe.fit(x, y)
    path = work / "sklearn_pipeline.onnx"
    path.write_bytes(to_onnx(pipe, x[:1], options={"zipmap": False},
                             target_opset={"": 17, "ai.onnx.ml": 3}).SerializeToString())
    return path, {"X": x}


def _audio_stft(work: Path) -> tuple[Path, Feeds | None]:
    """A sound classifier with its own torch.stft spectrogram (samples/corpus/frontends.py), trained on synthetic
    clips; clips of another seed."""
    return frontends.build_audio(work / "audio_stft.onnx"), {"wave": frontends.make_clips(384, 1)[0]}


def _sklearn_columns(work: Path) -> tuple[Path, Feeds | None]:
    """A ColumnTransformer (scaled pixels, one-hot grey levels) + MLP on digits (samples/corpus/frontends.py)."""
    path, x, _ = frontends.build_columns(work / "sklearn_columns.onnx")
    return path, {"X": x}


def _keras_bytes(work: Path) -> tuple[Path, Feeds | None]:
    """A Keras byte classifier exported by tf2onnx, committed with 600 streams it did not train on
    (samples/corpus/keras_bytes/make.py says how they were made)."""
    folder = Path(__file__).resolve().parent / "keras_bytes"
    return folder / "keras_bytes.onnx", {"bytes": np.load(folder / "bytes.npz")["bytes"].astype(np.int32)}


def _bert_optimized(work: Path) -> tuple[Path, Feeds | None]:
    """A Hugging Face BERT fused by onnxruntime's transformer optimizer, committed (samples/corpus/bert_optimized/
    make.py; trained, 94.2% held out), fed token sequences of its task it did not train on (another seed)."""
    r = np.random.default_rng(2)
    mask = (np.arange(12)[None] < r.integers(4, 13, 384)[:, None]).astype(np.int64)
    feeds = {"input_ids": r.integers(5, 60, (384, 12)) * mask, "attention_mask": mask,
             "token_type_ids": np.zeros((384, 12), np.int64)}
    return Path(__file__).resolve().parent / "bert_optimized" / "bert_optimized.onnx", feeds


def _keras_digits(work: Path) -> tuple[Path, Feeds | None]:
    """A Keras CNN exported by tf2onnx, committed (samples/corpus/keras_digits/make.py), with scikit-learn's
    digits as [N, 8, 8, 1] in the seeded order it trained on (its first 1,350)."""
    from sklearn.datasets import load_digits

    x = (load_digits().data / 16.0).astype(np.float32).reshape(-1, 8, 8, 1)
    order = np.random.default_rng(0).permutation(len(x))
    return Path(__file__).resolve().parent / "keras_digits" / "keras_digits.onnx", {"image": x[order]}


def _keras_tcn(work: Path) -> tuple[Path, Feeds | None]:
    """A Keras TCN (dilated causal Conv1D blocks) exported by tf2onnx, committed (samples/corpus/keras_tcn/make.py),
    fed 600 signals of its task it did not train on."""
    from keras_tcn.signals import signals

    return Path(__file__).resolve().parent / "keras_tcn" / "keras_tcn.onnx", {"signal": signals(600, 1)[0]}


def _paddle_ocr(kind: str) -> Callable[[Path], tuple[Path, Feeds | None]]:
    """PaddleOCR-style recognizer (``rec``) or detector (``det``) exported by paddle2onnx, committed
    (samples/corpus/paddle_ocr/make.py), fed lines or pages of seeds they did not train on."""
    from glyphs import det_pages, rec_lines

    def build(work: Path) -> tuple[Path, Feeds | None]:
        x = rec_lines(256, 1)[0] if kind == "rec" else det_pages(128, 1)[0]
        return Path(__file__).resolve().parent / "paddle_ocr" / f"ppocr_{kind}.onnx", {"x": x}

    return build


def _keras_captcha(work: Path) -> tuple[Path, Feeds | None]:
    """A Keras CTC captcha reader exported by tf2onnx, committed (samples/corpus/keras_captcha/make.py: [N, 100,
    32, 1] images, two bidirectional LSTMs, [N, 25, 11] probabilities, blank last), fed captchas of a seed it did
    not train on."""
    from glyphs import keras_captchas

    return Path(__file__).resolve().parent / "keras_captcha" / "keras_captcha.onnx", {"image": keras_captchas(256, 5)[0]}


def _tf2onnx_like(work: Path) -> tuple[Path, Feeds | None]:
    """Bytes -> OneHot(256) -> MatMul + Gather embedding -> LayerNorm as tf2onnx writes it -> MLP."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    d, h, classes, length = 256, 512, 10, 64
    arrays = {
        "depth": np.array(256, np.int32), "values": np.array([0, 1], np.float32),
        "W1": rng.normal(0, 0.05, (256, d)), "E": rng.normal(0, 0.05, (256, d)), "two": np.array(2.0, np.float32),
        "eps": np.array(1e-5, np.float32), "gamma": np.ones(d), "beta": np.zeros(d),
        "W2": rng.normal(0, 0.05, (d, h)), "b2": np.zeros(h), "W3": rng.normal(0, 0.05, (h, classes)),
    }
    inits = [numpy_helper.from_array(v.astype(np.float32) if v.dtype == np.float64 else v, k) for k, v in arrays.items()]
    n = helper.make_node
    nodes = [
        n("OneHot", ["x", "depth", "values"], ["oh"], axis=-1, name="onehot"), n("MatMul", ["oh", "W1"], ["h1"], name="mm1"),
        n("Gather", ["E", "x"], ["emb"], name="embed"), n("Add", ["h1", "emb"], ["h"], name="add"),
        n("ReduceMean", ["h"], ["mu"], axes=[-1], name="ln/mean"), n("Sub", ["h", "mu"], ["dev"], name="ln/sub"),
        n("Pow", ["dev", "two"], ["sq"], name="ln/pow"), n("ReduceMean", ["sq"], ["var"], axes=[-1], name="ln/var"),
        n("Add", ["var", "eps"], ["ve"], name="ln/eps"), n("Sqrt", ["ve"], ["sd"], name="ln/sqrt"),
        n("Div", ["dev", "sd"], ["normed"], name="ln/div"), n("Mul", ["normed", "gamma"], ["scaled"], name="ln/mul"),
        n("Add", ["scaled", "beta"], ["shifted"], name="ln/add"), n("MatMul", ["shifted", "W2"], ["h2"], name="mm2"),
        n("Add", ["h2", "b2"], ["h2b"], name="bias2"), n("Relu", ["h2b"], ["r"], name="relu"),
        n("ReduceMean", ["r"], ["pooled"], axes=[1], keepdims=0, name="pool"), n("MatMul", ["pooled", "W3"], ["logits"], name="mm3"),
    ]
    graph = helper.make_graph(nodes, "bytes_classifier", [helper.make_tensor_value_info("x", TensorProto.INT32, ["N", length])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="tf2onnx-style")
    path = work / "tf2onnx_like.random.onnx"
    onnx.save(model, str(path))
    feeds = rng.integers(0, 256, (512, length)).astype(np.int32)
    return _calibrate_onnx(path, feeds, 60, work / "tf2onnx_like.onnx"), {"x": feeds}


def _nudenet(work: Path) -> tuple[Path, Feeds | None]:
    # Located without importing nudenet: its __init__ imports OpenCV, which the model does not need.
    # YOLOv8 needs sides that are multiples of 32 (8x8 inputs break its Concat): 128x128 N(0, 1) images.
    x = np.random.default_rng(0).normal(size=(192, 3, 128, 128)).astype(np.float32)
    return Path(importlib.util.find_spec("nudenet").origin).parent / "320n.onnx", {"images": x}


def _facenet_onet(work: Path) -> tuple[Path, Feeds | None]:
    from facenet_pytorch.models.mtcnn import ONet

    net = ONet(pretrained=True)  # weights from the wheel's data/onet.pt

    class Scores(torch.nn.Module):  # ONet returns (box, landmarks, face probability): keep all three
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            box, points, prob = self.net(x)
            return torch.cat([prob, box, points], 1)

    return _quiet_export(Scores(), torch.randn(2, 3, 48, 48), work / "mtcnn_onet.onnx", False, True), None


def _onnx_light(name: str, steps: int = 20):
    """onnx's light test models keep each weight as a ConstantOfShape fill (all 0.02) to stay small, so
    every class scores the same: each fill becomes a seeded He-initialised initializer of its shape
    under the same name (the graph's other nodes, names and I/O stay), then ``_calibrate_onnx``."""
    def build(work: Path) -> tuple[Path, Feeds | None]:
        from onnx import numpy_helper

        model = onnx.load(str(Path(onnx.__file__).parent / "backend/test/data/light" / f"light_{name}.onnx"))
        rng = np.random.default_rng(0)
        values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        fills = [n for n in model.graph.node if n.op_type == "ConstantOfShape" and n.input[0] in values]
        for node in fills:
            shape = tuple(int(d) for d in values[node.input[0]])
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 0
            value = rng.normal(0, np.sqrt(2 / fan_in), shape) if fan_in else np.zeros(shape)
            model.graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), node.output[0]))
            if model.ir_version < 4:  # before IR 4 every initializer is also a graph input
                model.graph.input.append(onnx.helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT, shape))
            model.graph.node.remove(node)
        used = {i for n in model.graph.node for i in n.input}
        for tensor in [t for t in model.graph.initializer if t.name not in used]:
            model.graph.initializer.remove(tensor)
        for value in [v for v in model.graph.input if v.name not in used]:
            model.graph.input.remove(value)
        path = work / f"{name}.random.onnx"
        onnx.save(model, str(path))
        x = np.random.default_rng(1).normal(size=(192, 3, 224, 224)).astype(np.float32)
        return _calibrate_onnx(path, x[:64], steps, work / f"{name}.onnx"), {"data_0": x}

    return build


def _vad(work: Path) -> tuple[Path, Feeds]:
    """Two voice-activity networks behind an If on the sample rate, weights as Constant nodes in the branches
    (samples/corpus/vad.py); 16 kHz frames with a zero state."""
    return vad.build(work / "vad_if.onnx"), vad.feeds(256, 3)


def _seq2seq(dynamo: bool):
    """The character-level encoder-decoder transformer (samples/corpus/seq2seq.py): token ids in, per-position
    logits out, a causal mask the graph computes (Trilu); source words and teacher-forced decoder inputs."""
    def build(work: Path) -> tuple[Path, Feeds]:
        return seq2seq.build(work / f"seq2seq_{'dynamo' if dynamo else 'ts'}.onnx", dynamo=dynamo), seq2seq.feeds(256, 1)
    return build


def _yolo(c2f: bool):
    """A two-level detector in YOLOv8's export layout, boxes and Sigmoid class probabilities in one output
    (samples/corpus/yolo.py), with YOLOv8's C2f blocks or without; generated images."""
    def build(work: Path) -> tuple[Path, Feeds]:
        return yolo.build(work / f"yolo_{'c2f' if c2f else 'like'}.onnx", c2f=c2f), yolo.feeds(256, 1)
    return build


CORPUS = [
    Entry("digits_cnn", "samples/digits (trained)", "torch TorchScript", _digits),
    Entry("digits_dynamic_int8", "onnxruntime quantize_dynamic", "ort quantizer (ConvInteger/MatMulInteger)",
          _digits_quantized("dynamic")),
    Entry("digits_qdq_int8", "onnxruntime quantize_static", "ort quantizer (QDQ)", _digits_quantized("qdq")),
    Entry("digits_qoperator_int8", "onnxruntime quantize_static", "ort quantizer (QLinearConv/QGemm)",
          _digits_quantized("qoperator")),
    Entry("resnet18", "torchvision (random)", "torch TorchScript, dynamic batch", _torchvision("resnet18", False, True)),
    Entry("mobilenet_v3_small", "torchvision (random)", "torch dynamo, dynamic batch",
          _torchvision("mobilenet_v3_small", True, True)),
    Entry("squeezenet1_1_b1", "torchvision (random)", "torch dynamo, fixed batch 1", _torchvision("squeezenet1_1", True, False)),
    Entry("transformer_encoder", "torch nn (random)", "torch dynamo, dynamic batch", _transformer),
    Entry("digits_vit", "scikit-learn digits (trained ViT)", "torch dynamo, dynamic batch", digits_vit()),
    Entry("lstm_classifier", "torch nn (random)", "torch TorchScript", _lstm),
    Entry("sklearn_mlp", "scikit-learn digits (trained)", "skl2onnx", _sklearn),
    Entry("sklearn_pipeline", "scikit-learn digits, 10% missing (imputer + scaler + MLP, trained)",
          "skl2onnx (ai.onnx.ml Imputer, Scaler)", _sklearn_pipeline),
    Entry("sklearn_columns", "scikit-learn digits (ColumnTransformer: scaler + one-hot levels, MLP; trained)",
          "skl2onnx (ai.onnx.ml ArrayFeatureExtractor, OneHotEncoder in onnxruntime)", _sklearn_columns),
    Entry("audio_stft", "synthetic tones (trained; torch.stft spectrogram front end)",
          "torch dynamo, dynamic batch (STFT in onnxruntime)", _audio_stft),
    Entry("bytes_onehot_layernorm", "hand-built", "tf2onnx op pattern", _tf2onnx_like),
    Entry("keras_bytes", "Keras (trained, synthetic byte streams; committed file)", "tf2onnx 1.16, opset 15",
          _keras_bytes),
    Entry("bert_optimized", "Hugging Face BERT (trained, synthetic token task; committed file)",
          "torch TorchScript, then onnxruntime's transformer optimizer (fused com.microsoft ops)", _bert_optimized),
    Entry("keras_digits", "Keras CNN (trained on scikit-learn digits; committed file)", "tf2onnx 1.16, opset 15",
          _keras_digits),
    Entry("keras_tcn", "Keras TCN (trained, synthetic two-channel events; committed file)",
          "tf2onnx 1.17, opset 17, causal dilated Conv1D", _keras_tcn),
    Entry("ppocr_rec", "PaddlePaddle (trained, synthetic digit lines; PP-OCRv3 rec layout; committed file)",
          "paddle2onnx 2.1, opset 14, [N, T, C] CTC probabilities", _paddle_ocr("rec")),
    Entry("ppocr_det", "PaddlePaddle (trained, synthetic pages; DB detector layout; committed file)",
          "paddle2onnx 2.1, opset 14, [N, 1, H, W] Sigmoid map", _paddle_ocr("det")),
    Entry("keras_captcha", "Keras CTC reader (trained, synthetic captchas; committed file)",
          "tf2onnx 1.17, opset 15, bidirectional LSTM ops, [N, T, C] probabilities, blank last", _keras_captcha),
    Entry("nudenet_320n", "PyPI nudenet wheel (trained)", "ultralytics (torch), fixed batch 1", _nudenet, "nudenet"),
    Entry("mtcnn_onet", "PyPI facenet-pytorch wheel (trained weights)", "torch TorchScript", _facenet_onet,
          "facenet_pytorch"),
    Entry("light_bvlc_alexnet", "PyPI onnx wheel (test graph, random)", "onnx-caffe2, opset 9, batch 1",
          _onnx_light("bvlc_alexnet")),
    Entry("light_inception_v1", "PyPI onnx wheel (test graph, random)", "onnx-caffe2, opset 9, batch 1",
          _onnx_light("inception_v1")),
    Entry("crnn_seq_first", "torch nn (random)", "torch TorchScript, [T, N, C] + argmax ids", _crnn),
    Entry("segmenter_map", "torch nn (random)", "torch dynamo, [N, 1, H, W] Sigmoid map", _segmenter),
    Entry("captcha_ctc", "synthetic captchas (trained, CTC)", "torch TorchScript, [T, N, C] log-probabilities",
          captcha_ctc()),
    Entry("detector_1d", "synthetic 1-D events (trained)", "torch TorchScript, 2 inputs, [N, L, 1] map + [N, 32, 3]",
          detector_1d()),
    Entry("vad_if", "synthetic audio (trained; silero-VAD layout)",
          "torch TorchScript (scripted If on sr), state [2, N, 64]", _vad),
    Entry("seq2seq_ts", "synthetic romanization (trained; encoder-decoder transformer)",
          "torch TorchScript, int64 tokens, [N, T, V] logits, causal mask by Trilu", _seq2seq(False)),
    Entry("seq2seq_dynamo", "synthetic romanization (trained; encoder-decoder transformer)",
          "torch dynamo, int64 tokens, [N, T, V] logits, causal mask by Trilu", _seq2seq(True)),
    Entry("yolo_like", "synthetic shapes (trained; YOLOv8 layout)",
          "torch TorchScript, [N, 4 + 2, A] boxes + Sigmoid classes", _yolo(False)),
    Entry("yolo_c2f", "synthetic shapes (trained; YOLOv8 layout, C2f blocks)",
          "torch TorchScript, [N, 4 + 2, A] boxes + Sigmoid classes", _yolo(True)),
]


# ----------------------------------------------------------------------------------------------------
# one model
# ----------------------------------------------------------------------------------------------------

def _inputs(model: onnx.ModelProto, n: int, seed: int) -> Feeds:
    """``n`` synthesized samples; a graph with a fixed first dim b gets n // b runs of it stacked."""
    one = synthesize_inputs(model, batch=n, seed=seed)
    if all(len(v) >= n for v in one.values()):
        return one
    runs = [synthesize_inputs(model, batch=n, seed=seed + k) for k in range(max(1, n // min(map(len, one.values()))))]
    return {k: np.concatenate([r[k] for r in runs]) for k in one}


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:160]


def _io(path: Path) -> tuple[list[bytes], list[bytes]]:
    model = onnx.load(str(path), load_external_data=False)
    return [v.SerializeToString() for v in model.graph.input], [v.SerializeToString() for v in model.graph.output]


# The compress each case runs, as recipe keys besides threads / batch / seed: the sweep's own 50% run, and
# the cases a held-out evaluation runs on unseen models (ratios, binary, ratio + 4-bit, with --epochs 10).
CASES = {
    "50": {"admm": {"epochs": 2, "retrain_epochs": 1}, "prune": {"sparsity": 0.5}},
    "40x": {"train": {"epochs": 10}, "prune": {"sparsity": 0.975}},
    "200x": {"train": {"epochs": 10}, "prune": {"sparsity": 0.995}},
    "binary": {"train": {"epochs": 10}, "quantize": {"bits": 1}},
    "40x-4bit": {"train": {"epochs": 10}, "prune": {"sparsity": 0.975}, "quantize": {"bits": 4}},
    # The sweep's 50% run with 4-bit levels (RESULTS.md, fifteenth session: the stage start as a candidate).
    "50-4bit": {"admm": {"epochs": 2, "retrain_epochs": 1}, "prune": {"sparsity": 0.5}, "quantize": {"bits": 4}},
    # 30% of the filters with the default budget, at the default rate and at 0.03 (RESULTS.md, fourteenth session).
    "filters30": {"prune": {"structure": "filter", "sparsity": 0.3}},
    "filters30-lr03": {"prune": {"structure": "filter", "sparsity": 0.3}, "train": {"lr": 0.03}},
    "filters30-exact": {"prune": {"structure": "filter", "sparsity": 0.3, "round_to": 1}},
}


def _recipe(case: str) -> dict:
    keys = {section: dict(values) for section, values in CASES[case].items()}
    keys["train"] = {"threads": 1, "batch_size": 32, "seed": 0, **keys.get("train", {})}
    return keys


def run_entry(entry: Entry, work: Path, samples: int, case: str = "50", speed: bool = True) -> dict:
    """One entry through check and the case's compress; ``speed``: also time a train step against an onnxruntime run
    (the tests leave it out: they assert nothing on it)."""
    row = {"model": entry.name, "source": entry.source, "exporter": entry.exporter, "params": None, "check": "-",
           "agreement": None, "ratio": None, "reason": "", "seconds": 0.0, "case": case}
    started = time.perf_counter()
    folder = work / entry.name if case == "50" else work / case / entry.name
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            path, data = entry.build(folder)
        model = load_model(path)
        if data is None:
            train, val = _inputs(model, samples, 0), _inputs(model, samples // 2, 1)
        else:
            cut = len(from_arrays(data, graph_inputs(model))) * 3 // 4
            train, val = _rows(model, data, 0, min(cut, samples)), _rows(model, data, cut, cut + samples // 2)
        report = check(path, _rows(model, val, 0, 8))
        failed = [s for s in report.steps if not s.passed]
        row["check"] = "pass" if report.passed else f"FAIL ({failed[0].name})"
        if failed:
            row["reason"] = f"check {failed[0].name}: {failed[0].detail}"[:200]
        if not report.steps or not report.steps[0].passed:
            return row
        config = CompressConfig.from_dict(_recipe(case))
        np.savez(folder / "train.npz", **train)
        np.savez(folder / "val.npz", **val)
        result = compress(path, str(folder / "train.npz"), config, val_data=str(folder / "val.npz"))
        result.save(folder / "compressed.onnx")
        row["params"] = result.report["params"]["total"]
        row["agreement"] = result.report["metrics"]["agreement"]
        score = result.report.get("score") or {}
        row["per"] = score.get("per", "MSE, no score output")
        row["task"] = result.report["metrics"]["task"]
        row["written_vs_trained"] = result.report["written_vs_trained"]
        row["wall_s"], row["peak_rss_mb"] = result.report["wall_s"], result.report["peak_rss_mb"]
        row["io_same"] = _io(folder / "compressed.onnx") == _io(path)
        if not row["io_same"]:
            row["reason"] += "graph I/O changed"
        if not speed:
            return row
        # The batch of 64 the target is stated at, or the batch a fixed-batch graph takes (onnxruntime refuses
        # any other there).
        # (The first input fed at run time: an IR 3 graph lists its initializers as inputs too, a bias first.)
        fixed = (graph_inputs(model)[0].shape or (None,))[:1]
        batch = fixed[0] if fixed and isinstance(fixed[0], int) else 64
        first = _rows(model, train, 0, batch)
        train_ms, infer_ms = train_and_infer_ms(path, feeds=first, repeats=3)
        row["ratio"] = train_ms / infer_ms
        row["train_ms"], row["infer_ms"] = train_ms, infer_ms
    except UserError as exc:
        row["reason"] = (row["reason"] + "; " if row["reason"] else "") + str(exc)[:200]
    except Exception as exc:  # a sweep records every failure and goes on
        logging.getLogger(__name__).debug("%s", traceback.format_exc())
        row["reason"] = (row["reason"] + "; " if row["reason"] else "") + _one_line(exc)
    finally:
        row["seconds"] = time.perf_counter() - started
    return row


def _rows(model: onnx.ModelProto, data: Feeds, start: int, stop: int) -> Feeds:
    """Samples ``start:stop`` of ``data``, each input cut on its sample axis (a recurrent state [2, N, H] on
    axis 1; a scalar such as a sample rate kept whole), as the product's data layer reads them."""
    dataset = from_arrays(data, graph_inputs(model))
    rows = np.arange(len(dataset))[start:stop]
    out = {}
    for key, value in data.items():
        axis = dataset.axes.get(key, 0)
        out[key] = np.take(np.asarray(value), rows, axis=axis) if key in dataset.batched or key == "labels" else value
    return out


def format_rows(rows: list[dict]) -> str:
    lines = ["| model | source | exporter | params | check | agreement (50%, no labels) | train step / ort inference | failure |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        agreement = "-" if r["agreement"] is None else f"{r['agreement']:.3f}"
        if r.get("per"):
            agreement += f" ({r['per']})"
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.1f}x ({r['train_ms']:.0f} / {r['infer_ms']:.1f} ms)"
        params = "-" if r["params"] is None else f"{r['params']:,}"
        reason = r["reason"].replace("|", "/")
        lines.append(f"| {r['model']} | {r['source']} | {r['exporter']} | {params} | {r['check']} | {agreement} | {ratio} | {reason} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / "out/corpus")
    parser.add_argument("--only", default="", help="comma-separated model names")
    parser.add_argument("--samples", type=int, default=128, help="training samples per model (half as many held out)")
    parser.add_argument("--case", choices=sorted(CASES), default="50",
                        help="the compress to run: 50 (2 + 1 epochs at 50%%) or a held-out case at --epochs 10")
    parser.add_argument("--jsonl", type=Path, help="also append each row to this file as one JSON line")
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.ERROR)
    only = {n for n in args.only.split(",") if n}
    rows = []
    for entry in CORPUS:
        if only and entry.name not in only:
            continue
        if entry.needs and importlib.util.find_spec(entry.needs) is None:
            print(f"skip {entry.name}: pip install {entry.needs.replace('_', '-')}", file=sys.stderr)
            continue
        row = run_entry(entry, args.work, args.samples, args.case)
        if args.jsonl:
            with args.jsonl.open("a") as f:
                f.write(json.dumps(row, default=str) + "\n")
        print(f"{entry.name}: check {row['check']}, agreement {row['agreement']}, ratio {row['ratio']}, "
              f"{row['seconds']:.0f} s {row['reason']}", file=sys.stderr)
        rows.append(row)
    print(format_rows(rows))


if __name__ == "__main__":
    main()
