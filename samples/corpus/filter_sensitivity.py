"""Filter groups' sensitivity, and a split from it against the uniform one, on a corpus entry.

``python samples/corpus/filter_sensitivity.py measure ppocr_rec --groups conv2d_0.w_0,conv2d_6.w_0+conv2d_9.w_0
--levels 0.3,0.6 --out sens.jsonl`` prunes each group alone (members joined by ``+``: a coupled group's
producers) to each level of its filters, one shot with the refit and no training (every other weight
skipped), and appends the task metric against the original on the second half of the entry's data and the
MACs left. ``python samples/corpus/filter_sensitivity.py train ppocr_rec --split SPLIT.json --seed 0 --out
rows.jsonl`` runs the sweep's label-free filter compress (128 inputs, 64 held out, batch 32, the default
budget, one thread) with each layer's share from ``SPLIT.json`` (``{"weight": sparsity}``; 0 skips the
layer), or with every layer at ``--sparsity`` when no split is given (the uniform split), and appends the
held-out task metric and the MACs.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sweep  # noqa: E402
from onnx_admm.api import compress  # noqa: E402
from onnx_admm.recipe import CompressConfig  # noqa: E402


def _run(path: Path, folder: Path, config: dict) -> dict:
    result = compress(path, str(folder / "train.npz"), CompressConfig.from_dict(config),
                      val_data=str(folder / "val.npz"), metric_floor=0.0)
    task = result.report["metrics"]["task"]
    return {"metric": task["metric"], "value": task["value"], "error_rate": task.get("error_rate"),
            "macs": result.report["structure"]["macs"]["compressed"],
            "macs_original": result.report["structure"]["macs"]["original"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("measure", "train"))
    parser.add_argument("entry")
    parser.add_argument("--work", type=Path, default=Path("out/filter_sensitivity"))
    parser.add_argument("--groups", default="", help="measure: comma-separated groups, members joined by +")
    parser.add_argument("--levels", default="0.3,0.6", help="measure: shares of each group's filters removed")
    parser.add_argument("--split", type=Path, help="train: JSON {weight: sparsity}; none: every layer at --sparsity")
    parser.add_argument("--sparsity", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="append one JSON line per run")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    entry = {e.name: e for e in sweep.CORPUS}[args.entry]
    folder = args.work / f"{args.entry}-{args.mode}"
    folder.mkdir(parents=True, exist_ok=True)
    path, data = entry.build(folder)
    model = sweep.load_model(path)
    if args.mode == "measure":
        half = len(next(iter(data.values()))) // 2
        np.savez(folder / "train.npz", **sweep._rows(model, data, 0, half))
        np.savez(folder / "val.npz", **sweep._rows(model, data, half, 2 * half))
        runs = [(group, level) for group in args.groups.split(",") for level in map(float, args.levels.split(","))]
    else:
        cut = len(next(iter(data.values()))) * 3 // 4  # as sweep.run_entry splits it
        np.savez(folder / "train.npz", **sweep._rows(model, data, 0, min(cut, 128)))
        np.savez(folder / "val.npz", **sweep._rows(model, data, cut, cut + 64))
        runs = [(None, None)]
    for group, level in runs:
        train = {"threads": 1, "batch_size": 32, "seed": args.seed}
        if args.mode == "measure":
            config = {"train": train, "admm": {"epochs": 0, "retrain_epochs": 0},
                      "prune": {"structure": "filter", "sparsity": level, "round_to": 1},
                      "rules": [*({"match": m, "sparsity": level} for m in group.split("+")), {"match": "*", "skip": True}]}
            row = {"entry": args.entry, "group": group, "level": level}
        else:
            config = {"train": train, "prune": {"structure": "filter", "sparsity": args.sparsity}}
            split = json.loads(args.split.read_text()) if args.split else None
            if split:
                config["rules"] = [{"match": w, "sparsity": s} if s > 0 else {"match": w, "skip": True}
                                   for w, s in split.items()]
            row = {"entry": args.entry, "split": str(args.split or f"uniform {args.sparsity:g}"), "seed": args.seed}
        row.update(_run(path, folder, config))
        print(json.dumps(row), flush=True)
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
