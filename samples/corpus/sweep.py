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
  the TorchScript and dynamo exporters, with a dynamic and a fixed batch;
- a torch TransformerEncoder (dynamo) and a bidirectional LSTM classifier (TorchScript);
- scikit-learn's MLPClassifier through skl2onnx;
- a hand-built graph in tf2onnx's style (int32 bytes -> OneHot, LayerNormalization written as
  ReduceMean/Sub/Pow/Sqrt/Div, Gather, MatMul);
- files and weights shipped inside PyPI wheels, used when the package is installed (nothing is
  downloaded at run time): ``pip install nudenet`` (a YOLOv8n detector, 320n.onnx, exported by
  ultralytics), ``pip install facenet-pytorch tqdm`` (the trained MTCNN ONet weights, exported here), and
  the onnx package's own ``backend/test/data/light`` models (onnx-caffe2 exports).
Needs the test extras (torchvision, onnxscript, scikit-learn, skl2onnx).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
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

from converters.errors import UserError  # noqa: E402
from converters.inputs import synthesize_inputs  # noqa: E402
from converters.modelio import load_model  # noqa: E402
from onnx_admm.api import compress  # noqa: E402
from onnx_admm.check import check  # noqa: E402
from onnx_admm.recipe import CompressConfig  # noqa: E402
from speed import train_and_infer_ms  # noqa: E402

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


def _torchvision(arch: str, dynamo: bool, dynamic: bool, size: int = 64):
    def build(work: Path) -> tuple[Path, Feeds | None]:
        import torchvision

        torch.manual_seed(0)
        model = getattr(torchvision.models, arch)(weights=None, num_classes=10)
        batch = 2 if dynamic else 1
        return _quiet_export(model, torch.randn(batch, 3, size, size), work / f"{arch}.onnx", dynamo, dynamic), None

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
    return _quiet_export(Encoder(), torch.randn(2, 16, 64), work / "transformer.onnx", True, True), None


def _lstm(work: Path) -> tuple[Path, Feeds | None]:
    from exporter_models import recurrent_classifier

    return _quiet_export(recurrent_classifier("lstm"), torch.randn(2, 7, 10), work / "lstm.onnx", False, True), None


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
    path = work / "tf2onnx_like.onnx"
    onnx.save(model, str(path))
    return path, {"x": rng.integers(0, 256, (256, length)).astype(np.int32)}


def _nudenet(work: Path) -> tuple[Path, Feeds | None]:
    # Located without importing nudenet: its __init__ imports OpenCV, which the model does not need.
    return Path(importlib.util.find_spec("nudenet").origin).parent / "320n.onnx", None


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


def _onnx_light(name: str):
    def build(work: Path) -> tuple[Path, Feeds | None]:
        return Path(onnx.__file__).parent / "backend/test/data/light" / f"light_{name}.onnx", None

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
    Entry("lstm_classifier", "torch nn (random)", "torch TorchScript", _lstm),
    Entry("sklearn_mlp", "scikit-learn digits (trained)", "skl2onnx", _sklearn),
    Entry("bytes_onehot_layernorm", "hand-built", "tf2onnx op pattern", _tf2onnx_like),
    Entry("nudenet_320n", "PyPI nudenet wheel (trained)", "ultralytics (torch), fixed batch 1", _nudenet, "nudenet"),
    Entry("mtcnn_onet", "PyPI facenet-pytorch wheel (trained weights)", "torch TorchScript", _facenet_onet,
          "facenet_pytorch"),
    Entry("light_bvlc_alexnet", "PyPI onnx wheel (test data)", "onnx-caffe2, batch 1", _onnx_light("bvlc_alexnet")),
    Entry("light_inception_v1", "PyPI onnx wheel (test data)", "onnx-caffe2, batch 1", _onnx_light("inception_v1")),
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


def run_entry(entry: Entry, work: Path, samples: int) -> dict:
    row = {"model": entry.name, "source": entry.source, "exporter": entry.exporter, "params": None, "check": "-",
           "agreement": None, "ratio": None, "reason": "", "seconds": 0.0}
    started = time.perf_counter()
    folder = work / entry.name
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            path, data = entry.build(folder)
        model = load_model(path)
        if data is None:
            train, val = _inputs(model, samples, 0), _inputs(model, samples // 2, 1)
        else:
            cut = len(next(iter(data.values()))) * 3 // 4
            train, val = {k: v[:cut][:samples] for k, v in data.items()}, {k: v[cut:][:samples // 2] for k, v in data.items()}
        report = check(path, {k: v[:8] for k, v in val.items()})
        failed = [s for s in report.steps if not s.passed]
        row["check"] = "pass" if report.passed else f"FAIL ({failed[0].name})"
        if failed:
            row["reason"] = f"check {failed[0].name}: {failed[0].detail}"[:200]
        if not report.steps or not report.steps[0].passed:
            return row
        config = CompressConfig.from_dict({"train": {"threads": 1, "batch_size": 32, "seed": 0},
                                           "admm": {"epochs": 2, "retrain_epochs": 1}, "prune": {"sparsity": 0.5}})
        np.savez(folder / "train.npz", **train)
        np.savez(folder / "val.npz", **val)
        result = compress(path, str(folder / "train.npz"), config, val_data=str(folder / "val.npz"))
        result.save(folder / "compressed.onnx")
        row["params"] = result.report["params"]["total"]
        row["agreement"] = result.report["metrics"]["agreement"]
        first = {k: v[:64] for k, v in train.items()}  # the batch of 64 the target is stated at
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


def format_rows(rows: list[dict]) -> str:
    lines = ["| model | source | exporter | params | check | agreement (50%, no labels) | train step / ort inference | failure |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        agreement = "-" if r["agreement"] is None else f"{r['agreement']:.3f}"
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
        row = run_entry(entry, args.work, args.samples)
        print(f"{entry.name}: check {row['check']}, agreement {row['agreement']}, ratio {row['ratio']}, "
              f"{row['seconds']:.0f} s {row['reason']}", file=sys.stderr)
        rows.append(row)
    print(format_rows(rows))


if __name__ == "__main__":
    main()
