"""Pruning the bundled digits CNN with labels at several learning rates: the second model behind the pruning
default of 0.02 (recipe.PRUNE_LR; ``bench.py``'s ``default`` against ``default-lr01``).

    python samples/lenet5_fashion_mnist/prune_lr.py --sparsity 0.95 0.98 --lr 0.01 0.02 --seeds 0 1
    python samples/lenet5_fashion_mnist/prune_lr.py --structure filter --sparsity 0.5 0.75 ...
    python samples/lenet5_fashion_mnist/prune_lr.py --structure 2:4 --sparsity 0.5 ...

The default ``compress`` (``train.epochs`` 10, stages chosen by the tool) on samples/digits' 1,437 training
digits, one thread; top-1 of the compressed file in onnxruntime on its 360 test digits. One JSON line per run
is appended to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

DIGITS = Path(__file__).resolve().parent.parent / "digits"
logger = logging.getLogger("prune_lr")


def main(argv: list[str] | None = None) -> int:
    from onnx_admm.api import compress
    from onnx_admm.data import Dataset
    from onnx_admm.recipe import CompressConfig
    from onnx_admm.validate import validate

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.95, 0.98])
    parser.add_argument("--lr", type=float, nargs="+", default=[0.01, 0.02])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--structure", default="unstructured", help="prune.structure (an N:M pattern fixes the sparsity)")
    parser.add_argument("--out", type=Path, default=Path("prune_lr.jsonl"))
    parser.add_argument("--work", type=Path, default=Path("prune_lr_work"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.work.mkdir(parents=True, exist_ok=True)
    train, test = np.load(DIGITS / "train.npz"), np.load(DIGITS / "test.npz")
    train_data = Dataset({"input": train["input"]}, train["labels"], {"input"})
    test_data = Dataset({"input": test["input"]}, test["labels"], {"input"})
    for sparsity in args.sparsity:
        for lr in args.lr:
            for seed in args.seeds:
                prune = {"sparsity": sparsity, "structure": args.structure}
                config = CompressConfig.from_dict({"prune": prune,
                                                   "train": {"lr": lr, "seed": seed, "threads": 1, "epochs": 10}})
                out = args.work / f"digits-{args.structure.replace(':', '-')}-{sparsity}-{lr}-{seed}.onnx"
                compress(DIGITS / "model.onnx", train_data, config, output=out, metric_floor=0)
                report = validate(DIGITS / "model.onnx", out, test_data, batch_size=64, threads=1)
                row = {"structure": args.structure, "sparsity": sparsity, "lr": lr, "seed": seed,
                       "top1": report.compressed.accuracy, "dense": report.original.accuracy}
                logger.info("%s", row)
                with args.out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
