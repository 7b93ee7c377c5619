"""Binary weights on every layer at two learning rates, on models other than the benchmark's LeNet-5: the
check behind the binary default (recipe.BINARY_LR = 0.03 against DEFAULT_LR = 0.01).

    python samples/lenet5_fashion_mnist/binary_lr.py --model digits --lr 0.01 0.03 --seeds 0 1
    python samples/lenet5_fashion_mnist/binary_lr.py --model resnet --resnet WORK/dense.onnx --lr 0.01 0.03 --seeds 0 1 2

``digits``: the bundled sample CNN (samples/digits), 10 epochs on its 1,437 training digits, top-1 on its 360
test digits. ``resnet``: the residual CNN of samples/resnet_fashion_mnist (``measure.py --work WORK --width 16
--train 6000 --dense-epochs 4`` trains and exports it to WORK/dense.onnx, 82.65%; BatchNorm folded into the
convs), 4 epochs on a fixed 10,000-image subset
of Fashion-MNIST, top-1 on the 10,000 test images. Per-channel binary levels, one stage, one thread, top-1 in
onnxruntime; one JSON line per run appended to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench  # noqa: E402


def datasets(which: str):
    from onnx_admm.data import Dataset

    if which == "resnet":
        data = bench.load_fashion_mnist(bench.DEFAULT_DATA)
        pick = np.sort(np.random.default_rng(123).permutation(len(data["train_x"]))[:10000])
        return (Dataset({"input": data["train_x"][pick]}, data["train_y"][pick], {"input"}),
                Dataset({"input": data["test_x"]}, data["test_y"], {"input"}), 4)
    digits = HERE.parent / "digits"
    train, test = np.load(digits / "train.npz"), np.load(digits / "test.npz")
    return (Dataset({"input": train["input"]}, train["labels"], {"input"}),
            Dataset({"input": test["input"]}, test["labels"], {"input"}), 10)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("digits", "resnet"), required=True)
    parser.add_argument("--resnet", type=Path, help="the residual CNN's dense.onnx (measure.py --work WORK)")
    parser.add_argument("--lr", type=float, nargs="+", default=[0.01, 0.03])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--out", type=Path, default=Path("binary_lr.jsonl"))
    parser.add_argument("--work", type=Path, default=Path("binary_lr_work"))
    args = parser.parse_args(argv)
    from onnx_admm.api import compress
    from onnx_admm.recipe import CompressConfig
    from onnx_admm.validate import validate

    model = args.resnet if args.model == "resnet" else HERE.parent / "digits" / "model.onnx"
    if model is None:
        parser.error("--model resnet needs --resnet WORK/dense.onnx")
    train, test, epochs = datasets(args.model)
    args.work.mkdir(parents=True, exist_ok=True)
    for lr in args.lr:
        for seed in args.seeds:
            config = CompressConfig.from_dict({"quantize": {"bits": 1, "per_channel": True}, "prune": {"stages": 1},
                                               "train": {"epochs": epochs, "lr": lr, "seed": seed, "threads": 1}})
            started = time.perf_counter()
            out = args.work / f"{args.model}-{lr:g}-{seed}.onnx"
            compress(model, train, config, metric_floor=0).save(out)
            report = validate(model, out, test, batch_size=64, threads=1)
            row = {"model": args.model, "lr": lr, "seed": seed, "top1": report.compressed.accuracy,
                   "dense": report.original.accuracy, "wall_s": round(time.perf_counter() - started, 1)}
            print(json.dumps(row), flush=True)
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
