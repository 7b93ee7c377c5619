"""Filter pruning of a small residual CNN on Fashion-MNIST: what removing coupled channel groups buys.

    python samples/resnet_fashion_mnist/measure.py --label after               # this checkout
    PYTHONPATH=/path/to/older/checkout python samples/resnet_fashion_mnist/measure.py --label before

Trains a ResNet-style CNN (stem W, stages of W/2W/4W channels at 28/14/7 pixels, one basic block each,
1x1 downsample convs; BatchNorm folded into the convs by the exporter) briefly on a fixed subset of the
training images, exports it once (``WORK/dense.onnx``, reused by later runs), then runs
``compress(..., structure="filter", sparsity=0.5)`` and records the test accuracy in onnxruntime, MACs,
the stored Conv weights and the onnxruntime latency at batch 1 and 64 from the report's structure section.
Run it once per code version with the same ``--work`` folder: both rows prune the same dense model.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "lenet5_fashion_mnist"))
logger = logging.getLogger("measure")


def residual_cnn(width: int):
    """The dense model: every stage's convs meet in residual sums, so most filters are coupled."""
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.down = None
            if stride != 1 or cin != cout:
                self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            y = self.bn2(self.conv2(nn.functional.relu(self.bn1(self.conv1(x)))))
            return nn.functional.relu(y + (x if self.down is None else self.down(x)))

    w = width
    return nn.Sequential(
        nn.Conv2d(1, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
        Block(w, w, 1), Block(w, 2 * w, 2), Block(2 * w, 4 * w, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, 10))


def train_dense(work: Path, x: np.ndarray, y: np.ndarray, epochs: int, width: int, threads: int) -> Path:
    """SGD, momentum 0.9, one-cycle LR (peak 0.1), batch 128; exported with the TorchScript exporter."""
    import torch
    from bench import fit_and_export  # the LeNet benchmark's training loop and export

    path = work / "dense.onnx"
    if path.exists():
        return path
    torch.manual_seed(0)
    torch.set_num_threads(threads)
    model = residual_cnn(width)
    return fit_and_export(model, x, y, epochs, 0.1, 0.2, path)


def conv_weights(path: Path) -> int:
    """Entries of the Conv weights the file stores (after any shrink)."""
    import onnx

    from onnx_admm.converters.shrink import count_macs

    report = count_macs(onnx.load(str(path)))
    return sum(node["params"] for node in report["nodes"].values() if node["op_type"] == "Conv")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", required=True, help="row name (e.g. before / after)")
    parser.add_argument("--train", type=int, default=10000, help="training images (fixed seeded subset)")
    parser.add_argument("--width", type=int, default=8, help="channels of the first stage (then 2x, 4x)")
    parser.add_argument("--dense-epochs", type=int, default=3)
    parser.add_argument("--epochs", type=float, default=3, help="compress budget (train.epochs)")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--structure", default="filter", help="prune.structure (unstructured: weight by weight)")
    parser.add_argument("--lr", type=float, default=None,
                        help="compress learning rate (train.lr; default: the product's for the recipe)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="compress's train.seed (the dense model stays seed 0)")
    parser.add_argument("--no-reconstruct", action="store_true", help="prune.reconstruct = false (no refit)")
    parser.add_argument("--norm-ft", action="store_true",
                        help="norm-based filter pruning + fine-tuning: no ADMM phase, the budget split evenly over "
                             "--stages stages of masked retraining")
    parser.add_argument("--stages", type=int, default=2, help="stages of --norm-ft (the default run chose 2)")
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
    dense = train_dense(args.work, x, y, args.dense_epochs, args.width, args.threads)
    test = Dataset({"input": data["test_x"]}, data["test_y"], {"input"})
    recipe = {
        "train": {"batch_size": 128, "threads": args.threads, "epochs": args.epochs, "seed": args.seed},
        "prune": {"sparsity": args.sparsity, "structure": args.structure, "reconstruct": not args.no_reconstruct},
    }
    if args.lr is not None:
        recipe["train"]["lr"] = args.lr
    if args.norm_ft:  # the same budget, all of it masked retraining after each magnitude (filter norm) cut
        del recipe["train"]["epochs"]
        recipe["admm"] = {"epochs": 0, "retrain_epochs": round(args.epochs / args.stages)}
        recipe["prune"]["stages"] = args.stages
    config = CompressConfig.from_dict(recipe)
    out = args.work / f"{args.label}.onnx"
    started = time.perf_counter()
    result = compress(dense, Dataset({"input": x}, y, {"input"}), config, metric_floor=0)
    result.save(out)
    wall = time.perf_counter() - started
    report = validate(dense, out, test, batch_size=64, threads=1)
    structure = result.report.get("structure") or {}
    row = {
        "label": args.label, "sparsity": args.sparsity, "epochs": args.epochs, "train": args.train,
        "width": args.width, "dense_epochs": args.dense_epochs, "lr": config.lr, "seed": args.seed,
        "structure": args.structure,
        "reconstruct": not args.no_reconstruct, "norm_ft": args.norm_ft,
        "reconstruction": [s.get("reconstruction") for s in result.report["stages"]],
        "dense_top1": report.original.accuracy, "top1": report.compressed.accuracy,
        "drop_pt": 100 * (report.original.accuracy - report.compressed.accuracy),
        "macs": structure.get("macs"),
        "conv_weights": {"original": conv_weights(dense), "compressed": conv_weights(out)},
        "latency_ms": structure.get("latency"), "kept_channels": structure.get("kept_channels"),
        "left_alone": result.report.get("left_alone"), "wall_s": round(wall, 1),
    }
    (args.work / f"{args.label}.json").write_text(json.dumps(row, indent=1))
    logger.info("%s", json.dumps(row, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
