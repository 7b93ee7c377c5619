"""Neurons and heads removed from a small ViT-style classifier on Fashion-MNIST, against int8 QDQ.

    python samples/vit_fashion_mnist/measure.py --label dense                     # train + export only
    python samples/vit_fashion_mnist/measure.py --label filter50 --sparsity 0.5   # --structure filter
    python samples/vit_fashion_mnist/measure.py --label int8 --int8               # --activations int8
    python samples/vit_fashion_mnist/measure.py --label frozen     # dense, attention shapes made constant
    python samples/vit_fashion_mnist/measure.py --label qstatic    # onnxruntime quantize_static (QDQ)
    python samples/resnet_fashion_mnist/latency.py WORK/dense.onnx WORK/frozen.onnx WORK/filter50.onnx WORK/int8.onnx
    python samples/vit_fashion_mnist/int8_compare.py WORK ...  # int8 vs qstatic on test + 40,000 unused images

The dense model: 7x7 patches of the 28x28 image (a stride-7 Conv, 16 tokens) plus a learned position
embedding, ``--layers`` ``nn.TransformerEncoderLayer`` (batch_first, ReLU FFN, no dropout), the token mean,
LayerNorm and a Linear head. It is trained briefly on a fixed subset of the training images with the LeNet
benchmark's loop and exported once with the TorchScript exporter (dynamic batch; ``WORK/dense.onnx``,
reused by later runs). A row then compresses that file through the Python API: ``--structure filter``
removes FFN intermediate units and attention heads (the residual stream, the patch embedding and the head
are left alone, with their reasons in ``left_alone``); ``--int8`` quantizes the weights to 8 bits and
writes integer activations. Test accuracy is measured in onnxruntime on the 10,000 test images.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "lenet5_fashion_mnist"))
sys.path.insert(0, str(HERE.parent / "resnet_fashion_mnist"))
logger = logging.getLogger("measure")


def vit(dim: int, heads: int, ffn: int, layers: int):
    """Patches -> TransformerEncoder -> mean token -> Linear."""
    import torch
    from torch import nn

    class ViT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.patches = nn.Conv2d(1, dim, 7, 7)
            self.position = nn.Parameter(torch.randn(1, 16, dim) * 0.02)
            layer = nn.TransformerEncoderLayer(dim, heads, ffn, dropout=0.0, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(dim)
            self.head = nn.Linear(dim, 10)

        def forward(self, x):
            tokens = self.patches(x).flatten(2).transpose(1, 2) + self.position
            return self.head(self.norm(self.encoder(tokens).mean(dim=1)))

    return ViT()


def train_dense(work: Path, x, y, args: argparse.Namespace) -> Path:
    """The LeNet benchmark's loop (SGD, one-cycle LR); MultiheadAttention's fused fast path is off for the
    export, which the TorchScript exporter cannot write."""
    import torch
    from bench import fit_and_export

    path = work / "dense.onnx"
    if path.exists():
        return path
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.backends.mha.set_fastpath_enabled(False)
    model = vit(args.dim, args.heads, args.ffn, args.layers)
    return fit_and_export(model, x, y, args.dense_epochs, args.dense_lr, 0.2, path)


def frozen_shapes(dense: Path, out: Path) -> Path:
    """``dense`` with the Reshape shapes that the head groups freeze made constant, every unit kept: how much
    of a pruned model's speed comes from constant shapes alone."""
    from onnx_admm.converters.cut import with_frozen
    from onnx_admm.converters.groups import channel_groups
    from onnx_admm.converters.modelio import load_model, save_model

    model = load_model(dense)
    changes = with_frozen(model, tuple(f for g in channel_groups(model) if g.unit == "head" for f in g.frozen))
    logger.info("frozen: %d Reshapes", len(changes))
    save_model(model, out)
    return out


def quantize_static_qdq(dense: Path, out: Path, calibration) -> Path:
    """onnxruntime's own int8 (QDQ, per-channel weights), calibrated on ``calibration`` in batches of 32:
    the bar for ``--activations int8``."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"input": calibration[i:i + 32]} for i in range(0, len(calibration), 32)])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(dense), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", required=True, help="row name (dense trains and exports only)")
    parser.add_argument("--train", type=int, default=20000, help="training images (fixed seeded subset)")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--ffn", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dense-epochs", type=int, default=8)
    parser.add_argument("--dense-lr", type=float, default=0.05)
    parser.add_argument("--epochs", type=float, default=4, help="compress budget (train.epochs)")
    parser.add_argument("--sparsity", type=float, default=0.5, help="share of FFN units and heads removed")
    parser.add_argument("--rule", action="append", default=[], metavar="GLOB=SPARSITY",
                        help="a filter-pruning target of its own for the weights GLOB matches (repeatable)")
    parser.add_argument("--int8", action="store_true", help="8-bit weights and int8 activations, no pruning")
    parser.add_argument("--structure", default="filter", help="prune.structure (unstructured: weight by weight)")
    parser.add_argument("--lr", type=float, default=None,
                        help="compress learning rate (train.lr; default: the product's for the recipe)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds the dense model's initialisation and order (give each seed its own --work) "
                             "and the compress run (train.seed)")
    parser.add_argument("--work", type=Path, default=HERE / "work")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    from bench import DEFAULT_DATA, load_fashion_mnist, train_subset  # the LeNet benchmark's data

    from onnx_admm.api import compress
    from onnx_admm.data import Dataset
    from onnx_admm.recipe import CompressConfig
    from onnx_admm.validate import validate

    args.work.mkdir(parents=True, exist_ok=True)
    data = load_fashion_mnist(DEFAULT_DATA)
    x, y = train_subset(data, args.train)
    started = time.perf_counter()
    dense = train_dense(args.work, x, y, args)
    test = Dataset({"input": data["test_x"]}, data["test_y"], {"input"})
    if args.label == "dense":
        report = validate(dense, dense, test, batch_size=64, threads=1)
        row = {"label": "dense", "top1": report.original.accuracy, "wall_s": round(time.perf_counter() - started, 1)}
    elif args.label == "qstatic":
        out = quantize_static_qdq(dense, args.work / "qstatic.onnx", x[:256])
        report = validate(dense, out, test, batch_size=64, threads=1)
        row = {"label": "qstatic", "top1": report.compressed.accuracy, "dense_top1": report.original.accuracy,
               "drop_pt": 100 * (report.original.accuracy - report.compressed.accuracy)}
    elif args.label == "frozen":
        # The control for latency: the dense graph with the attention shapes made constant, nothing removed.
        out = frozen_shapes(dense, args.work / "frozen.onnx")
        report = validate(dense, out, test, batch_size=64, threads=1)
        row = {"label": "frozen", "top1": report.compressed.accuracy, "dense_top1": report.original.accuracy}
    else:
        recipe = {"train": {"batch_size": 128, "threads": args.threads, "epochs": args.epochs, "seed": args.seed,
                            **({} if args.lr is None else {"lr": args.lr})}}
        if args.int8:
            recipe.update({"quantize": {"bits": 8, "per_channel": True}, "output": {"activations": "int8"}})
        else:
            recipe["prune"] = {"sparsity": args.sparsity, "structure": args.structure}
            recipe["rules"] = [{"match": glob, "sparsity": float(value), "structure": args.structure}
                               for glob, value in (rule.rsplit("=", 1) for rule in args.rule)]
        out = args.work / f"{args.label}.onnx"
        config = CompressConfig.from_dict(recipe)
        result = compress(dense, Dataset({"input": x}, y, {"input"}), config, metric_floor=0)
        result.save(out)
        wall = time.perf_counter() - started
        report = validate(dense, out, test, batch_size=64, threads=1)
        structure = result.report.get("structure") or {}
        row = {
            "label": args.label, "recipe": recipe, "lr": config.lr, "train": args.train,
            "dense_top1": report.original.accuracy, "top1": report.compressed.accuracy,
            "drop_pt": 100 * (report.original.accuracy - report.compressed.accuracy),
            "macs": structure.get("macs"), "latency_ms": structure.get("latency"),
            "kept_channels": structure.get("kept_channels"), "left_alone": result.report.get("left_alone"),
            "activations": result.report.get("activations"), "wall_s": round(wall, 1),
        }
    (args.work / f"{args.label}.json").write_text(json.dumps(row, indent=1, default=str))
    logger.info("%s", json.dumps(row, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
