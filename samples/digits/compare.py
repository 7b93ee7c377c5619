"""ADMM vs magnitude pruning on the bundled digits CNN, same total epochs, same run.

    python samples/digits/compare.py [--sparsity 0.98] [--stages 2] [--admm-epochs 10] [--retrain-epochs 5]
    python samples/digits/compare.py --quantize 4     # or 2, 1 (binary): ADMM + STE vs STE alone

With --quantize the rows are ADMM then retraining with the straight-through estimator, against the
hard projection followed by STE retraining alone (ADMM epochs 0), per-channel levels, no pruning.

Both rows use the recipe in this folder; the magnitude row sets ADMM epochs to 0 (one-shot magnitude
projection per stage) and gives those epochs to masked retraining instead, so both train
stages x (admm + retrain) epochs. Accuracy is measured in onnxruntime on test.npz (360 images).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from onnx_admm.api import compress
from onnx_admm.recipe import CompressConfig

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.98)
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--admm-epochs", type=int, default=10)
    parser.add_argument("--retrain-epochs", type=int, default=5)
    parser.add_argument("--quantize", type=int, choices=range(1, 9), metavar="BITS",
                        help="compare quantization (1 = binary) instead of pruning")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    import dataclasses

    from onnx_admm.recipe import PruneConfig, QuantizeConfig

    base = CompressConfig.from_toml(HERE / "recipe.toml").replace(
        prune={"sparsity": args.sparsity, "stages": args.stages})
    # This script fixes each stage's epochs itself: drop the recipe's total budget.
    base = dataclasses.replace(base, train=dataclasses.replace(base.train, epochs=None))
    if args.quantize:
        base = dataclasses.replace(base, prune=PruneConfig(),
                                   quantize=QuantizeConfig(bits=args.quantize, per_channel=True))
    epochs = args.admm_epochs + args.retrain_epochs
    rows = []
    baseline = "STE only" if args.quantize else "magnitude"
    for method, admm_epochs, retrain_epochs in ((baseline, 0, epochs), ("admm", args.admm_epochs, args.retrain_epochs)):
        config = base.replace(admm={"epochs": admm_epochs, "retrain_epochs": retrain_epochs})
        started = time.perf_counter()
        result = compress(HERE / "model.onnx", str(HERE / "train.npz"), config, val_data=str(HERE / "test.npz"), metric_floor=0)
        report = result.report
        m = report["metrics"]
        rows.append({
            "method": method, "sparsity": None if args.quantize else args.sparsity, "bits": args.quantize, "ratio": round(report["compression_ratio"], 1),
            "top1": m["compressed_accuracy"], "dense_top1": m["original_accuracy"],
            "drop_pt": 100 * (m["original_accuracy"] - m["compressed_accuracy"]),
            "epochs": len(result.stages) * epochs, "wall_s": round(time.perf_counter() - started, 1),
            "bytes": report["compressed"]["bytes"], "bytes_gzip": report["compressed"]["bytes_gzip"],
        })
    print(f"{'method':<10} {'ratio':>6} {'top1':>7} {'drop':>6} {'epochs':>6} {'bytes':>7} {'gzip':>6} {'wall':>6}")
    for r in rows:
        print(f"{r['method']:<10} {r['ratio']:>5}x {100 * r['top1']:>6.2f}% {r['drop_pt']:>5.2f} {r['epochs']:>6} "
              f"{r['bytes']:>7} {r['bytes_gzip']:>6} {r['wall_s']:>5}s")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
