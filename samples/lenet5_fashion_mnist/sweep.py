"""ADMM schedule sweep on Fashion-MNIST LeNet-5: which rho, rho growth, Z/U updates and learning-rate
policy beat the magnitude baselines at a fixed total budget; with --quant, which retraining of binary or
ternary weights (every layer) comes closest to the dense model.

    python samples/lenet5_fashion_mnist/sweep.py --ratio 200 --epochs 10 --train 20000 --seeds 0
    python samples/lenet5_fashion_mnist/sweep.py --quant binary --epochs 10 --train 20000 --seeds 0

Every row is one `compress` through the Python API on the bench's dense model (dense.onnx, trained by
bench.py), with the same total epoch budget (`train.epochs`) and a training subset of --train images
(the sweep ranks settings; bench.py measures the chosen default on all 60,000). Top-1 is measured in
onnxruntime on the 10,000 test images, which no row selects on. Writes sweep-<ratio>x.json / .md in --out.
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
sys.path.insert(0, str(HERE))
import bench  # noqa: E402

logger = logging.getLogger("sweep")


def configs(s: float) -> dict[str, dict]:
    agp = bench.agp_targets(s, 4)
    admm = lambda **kw: {"prune": {"sparsity": s}, "admm": kw}  # noqa: E731
    return {
        "magnitude one-shot": {"prune": {"sparsity": s, "stages": 1}, "admm": {"epochs": 0}},
        "AGP global": {"prune": {"sparsity": s, "targets": agp, "allocation": "global"}, "admm": {"epochs": 0}},
        "AGP lamp": {"prune": {"sparsity": s, "targets": agp}, "admm": {"epochs": 0}},
        "magnitude progressive (auto stages)": {"prune": {"sparsity": s}, "admm": {"epochs": 0}},
        "ADMM rho 1e-2 AGP targets": {"prune": {"sparsity": s, "targets": agp}, "admm": {"rho": 1e-2}},
        "ADMM rho 3e-2 AGP targets": {"prune": {"sparsity": s, "targets": agp}, "admm": {"rho": 3e-2}},
        "ADMM rho 1e-2 AGP targets share 0.3": {"prune": {"sparsity": s, "targets": agp},
                                                "admm": {"rho": 1e-2, "share": 0.3}},
        "AGP lamp + distill 0.5": {"prune": {"sparsity": s, "targets": agp}, "admm": {"epochs": 0},
                                   "train": {"distill": 0.5}},
        "ADMM rho 1e-2 AGP targets + distill 0.5": {"prune": {"sparsity": s, "targets": agp}, "admm": {"rho": 1e-2},
                                                    "train": {"distill": 0.5}},
        "ADMM rho 1e-3 reset": admm(rho=1e-3),
        "ADMM rho 1e-2 reset": admm(rho=1e-2),
        "ADMM rho 1e-1 reset": admm(rho=1e-1),
        "ADMM rho 1e-2 constant lr": admm(rho=1e-2, lr_policy="constant"),
        "ADMM rho 1e-2 cosine lr": admm(rho=1e-2, lr_policy="cosine"),
        "ADMM rho 1e-2 growth 1.0": admm(rho=1e-2, rho_growth=1.0),
        "ADMM rho 1e-2 30 updates": admm(rho=1e-2, updates=30),
        "ADMM rho 1e-2 global alloc": {"prune": {"sparsity": s, "allocation": "global"}, "admm": {"rho": 1e-2}},
        # rho chosen per phase from the steps per Z/U period (admm.rho unset), at three strengths
        "ADMM auto rho, pull 0.05": admm(pull=0.05),
        "ADMM auto rho, pull 0.2 (default)": admm(),
        "ADMM auto rho, pull 0.5": admm(pull=0.5),
        "ADMM auto rho, pull 0.2, LR reset per period": admm(lr_policy="reset"),
        # the shipped default (tool-chosen stages, refit, hand-over), with and without distillation from the original
        "default": {"prune": {"sparsity": s}},
        "default + distill 0.5": {"prune": {"sparsity": s}, "train": {"distill": 0.5}},
        "default + distill 0.9": {"prune": {"sparsity": s}, "train": {"distill": 0.9}},
    }


def quant_configs(kind: str) -> dict[str, dict]:
    """Binary or ternary weights on every layer, per output channel: the retraining choices (scales frozen
    or refit, every 10 steps unless a row says otherwise; latent clipping; ADMM share of the budget;
    learning rate; distillation from the original)."""
    levels = {"bits": 1} if kind == "binary" else {"ternary": True}

    def row(quantize: dict | None = None, **tables) -> dict:
        return {"prune": {"stages": 1}, "quantize": {**levels, "per_channel": True, **(quantize or {})}, **tables}

    ste = {"epochs": 0}  # the whole budget in straight-through retraining
    return {
        "frozen levels, no clipping (before)": row({"refit": 0, "clip": 0}),
        "refit + clip 2": row(),
        "refit + clip 2, STE only": row(admm=ste),
        "refit + clip 2, STE only, distill 0.5": row(admm=ste, train={"distill": 0.5}),
        "refit + clip 2, distill 0.5": row(train={"distill": 0.5}),
        "refit, no clipping": row({"clip": 0}),
        "refit + clip 2, lr 0.03": row(train={"lr": 0.03}),
        "refit + clip 2, lr 0.1": row(train={"lr": 0.1}),
        "refit + clip 1.5": row({"clip": 1.5}),
        "refit + clip 3": row({"clip": 3}),
        "refit every step + clip 2": row({"refit": 1}),
        "refit + clip 2, ADMM share 0.3": row(admm={"share": 0.3}),
        "refit + clip 2, lr 0.003": row(train={"lr": 0.003}),
        "refit + clip 2, STE only, lr 0.03": row(admm=ste, train={"lr": 0.03}),
        "refit + clip 2, STE only, adam 1e-3": row(admm=ste, train={"optimizer": "adam", "lr": 1e-3}),
        "refit + clip 2, adam 1e-3": row(train={"optimizer": "adam", "lr": 1e-3}),
        "refit + clip 2, adam 3e-3": row(train={"optimizer": "adam", "lr": 3e-3}),
        "refit + clip 2, adam 3e-4": row(train={"optimizer": "adam", "lr": 3e-4}),
        "refit + clip 1.5, lr 0.03": row({"clip": 1.5}, train={"lr": 0.03}),
        "refit + clip 3, lr 0.03": row({"clip": 3}, train={"lr": 0.03}),
        "refit every step + clip 2, lr 0.03": row({"refit": 1}, train={"lr": 0.03}),
        "refit + clip 2, lr 0.05": row(train={"lr": 0.05}),
        "refit + clip 2, lr 0.02": row(train={"lr": 0.02}),
        "refit + clip 2, lr 0.03, distill 0.5": row(train={"lr": 0.03, "distill": 0.5}),
        "refit + clip 2, lr 0.03, ADMM share 0.3": row(admm={"share": 0.3}, train={"lr": 0.03}),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=200)
    parser.add_argument("--quant", choices=("binary", "ternary"), help="sweep binary or ternary retraining instead")
    parser.add_argument("--epochs", type=float, default=10)
    parser.add_argument("--train", type=int, default=20000, help="training images (a seeded subset)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--only", nargs="*", help="row names to run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dense-epochs", type=int, default=24, help="epochs of the dense model (when work has none)")
    parser.add_argument("--work", type=Path, default=HERE / "work")
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from onnx_admm.api import compress
    from onnx_admm.data import Dataset
    from onnx_admm.recipe import CompressConfig

    data = bench.load_fashion_mnist(bench.DEFAULT_DATA)
    dense = bench.train_dense(args.work, data, args.dense_epochs, args.threads)
    pick = np.sort(np.random.default_rng(123).permutation(len(data["train_x"]))[:args.train])
    train = Dataset({"input": data["train_x"][pick]}, data["train_y"][pick], {"input"})
    test = Dataset({"input": data["test_x"]}, data["test_y"], {"input"})
    s = 1 - 1 / args.ratio
    tag = args.quant or f"{args.ratio:g}x"
    path = args.out / f"sweep-{tag}.json"
    results = json.loads(path.read_text()) if path.exists() else []
    table = quant_configs(args.quant) if args.quant else configs(s)
    for name, recipe in table.items():
        if args.only and name not in args.only:
            continue
        for seed in args.seeds:
            if any(r["name"] == name and r["seed"] == seed and r["epochs"] == args.epochs
                   and r.get("train", 20000) == args.train for r in results):
                continue
            recipe_full = {**recipe, "train": {"batch_size": 128, "lr": 0.01, "threads": args.threads,
                                               "seed": seed, "epochs": args.epochs, **recipe.get("train", {})}}
            started = time.perf_counter()
            result = compress(dense, train, CompressConfig.from_dict(recipe_full), val_data=test, metric_floor=0)
            m = result.report["metrics"]
            row = {"name": name, "seed": seed, "epochs": args.epochs, "train": args.train, "top1": m["compressed_accuracy"],
                   "dense": m["original_accuracy"], "stages": len(result.stages),
                   "density": {layer["name"]: round(1 - layer["sparsity"], 5) for layer in result.report["layers"]},
                   "residual_end": {layer["name"]: layer["residual"] for layer in result.report["layers"]},
                   "wall_s": round(time.perf_counter() - started, 1)}
            logger.info("%s seed %d: %.4f (%s)", name, seed, row["top1"], row["density"])
            results.append(row)
            path.write_text(json.dumps(results, indent=1) + "\n")
    lines = [f"| row | seed | top-1 | drop (pt) | stages | per-layer density | wall s |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        dens = ", ".join(f"{100 * v:.3g}%" for v in r["density"].values())
        lines.append(f"| {r['name']} | {r['seed']} | {100 * r['top1']:.2f}% | {100 * (r['dense'] - r['top1']):.2f} | "
                     f"{r['stages']} | {dens} | {r['wall_s']} |")
    what = f"{args.quant}, every layer" if args.quant else f"{args.ratio:g}x"
    flag = f"--quant {args.quant}" if args.quant else f"--ratio {args.ratio:g}"
    (args.out / f"sweep-{tag}.md").write_text(
        f"Sweep at {what}, {args.epochs:g} epochs, {args.train} training images "
        f"(`python samples/lenet5_fashion_mnist/sweep.py {flag} --epochs {args.epochs:g} "
        f"--train {args.train}`)\n\n" + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
