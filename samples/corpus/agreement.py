"""Held-out top-1 agreement of the sweep's label-free 50% compress, over several seeds and more held-out inputs.

``python samples/corpus/agreement.py --only transformer_encoder,digits_vit [--seeds 0 1 2] [--held-out 512]
[--inputs 128] [--recipe '{"train": {"lr": 0.03}}'] [--results FILE]`` builds each corpus entry (sweep.py) in
the work folder (default ``out/agreement``), compresses it exactly as the sweep does (128 representative
inputs, or ``--inputs``; 64 for the selection and report; ``--sparsity 0.5``, 2 ADMM + 1 retraining epochs,
batch 32, one thread, no labels; ``--recipe`` adds recipe keys) once per seed, and measures the compressed model against the original
in onnxruntime on more held-out inputs than the sweep's 64: ``--held-out`` synthesized ones (seed 7) for
entries without data, every input past the first three quarters for entries with data (450 digits). It also
counts how many disagreements fall on inputs where the original's top-two margin is below its median. One
markdown row per run goes to stdout and, with ``--results``, is appended to that file as it is measured.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import sys
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import sweep  # noqa: E402
from onnx_admm.api import compress  # noqa: E402
from onnx_admm.recipe import CompressConfig  # noqa: E402

logger = logging.getLogger("agreement")


def _splits(entry: sweep.Entry, folder: Path, held_out: int, inputs: int):
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        path, data = entry.build(folder)
    if data is None:  # as sweep.run_entry: synthesized inputs, seeds 0 and 1; the extra held-out ones seed 7
        model = sweep.load_model(path)
        return path, sweep._inputs(model, inputs, 0), sweep._inputs(model, 64, 1), sweep._inputs(model, held_out, 7)
    cut = len(next(iter(data.values()))) * 3 // 4
    return (path, {k: v[:cut][:inputs] for k, v in data.items()}, {k: v[cut:][:64] for k, v in data.items()},
            {k: v[cut:] for k, v in data.items()})


def _scores(session: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """The first float output shaped [N, C >= 2] (a classifier's scores; skl2onnx puts its labels first)."""
    outputs = session.run(None, feeds)
    return next(o for o in outputs if o.dtype == np.float32 and o.ndim == 2 and o.shape[1] >= 2)


def measure(entry: sweep.Entry, work: Path, seeds: list[int], held_out: int, recipe: dict,
            inputs: int = 128) -> list[dict]:
    folder = work / entry.name
    folder.mkdir(parents=True, exist_ok=True)
    path, train, val, held = _splits(entry, folder, held_out, inputs)
    np.savez(folder / "train.npz", **train)
    np.savez(folder / "val.npz", **val)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    reference = _scores(ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]), held)
    top2 = np.sort(reference, 1)[:, -2:]
    unsure = (top2[:, 1] - top2[:, 0]) < np.median(top2[:, 1] - top2[:, 0])
    rows = []
    for seed in seeds:
        config = {"train": {"threads": 1, "batch_size": 32, "seed": seed}, "admm": {"epochs": 2, "retrain_epochs": 1},
                  "prune": {"sparsity": 0.5}}
        for table, values in recipe.items():
            config.setdefault(table, {}).update(values)
        result = compress(path, str(folder / "train.npz"), CompressConfig.from_dict(config),
                          val_data=str(folder / "val.npz"))
        out = folder / f"compressed.s{seed}.onnx"
        result.save(out)
        scores = _scores(ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"]), held)
        differ = scores.argmax(1) != reference.argmax(1)
        recipe_text = json.dumps(recipe) + ("" if inputs == 128 else f", {inputs} inputs")
        rows.append({"model": entry.name, "recipe": recipe_text, "seed": seed, "held_out": len(differ),
                     "agreement": 1 - float(differ.mean()), "report": result.report["metrics"]["agreement"],
                     "disagree": int(differ.sum()), "unsure": int((differ & unsure).sum())})
        logger.info("%s", rows[-1])
    return rows


def format_row(r: dict) -> str:
    return (f"| {r['model']} | `{r['recipe']}` | {r['seed']} | {r['agreement']:.4f} ({r['held_out']}) | "
            f"{r['report']:.3f} | {r['disagree']} ({r['unsure']} under the median margin) |")


HEADER = ("| model | recipe | seed | held-out agreement (inputs) | report (64) | disagreements |\n"
          "| --- | --- | --- | --- | --- | --- |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / "out/agreement")
    parser.add_argument("--only", required=True, help="comma-separated corpus entry names")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--held-out", type=int, default=512)
    parser.add_argument("--inputs", type=int, default=128, help="training inputs (the sweep's 128)")
    parser.add_argument("--recipe", default="{}", help="recipe keys as JSON, e.g. '{\"train\": {\"lr\": 0.03}}'")
    parser.add_argument("--results", type=Path, help="append each row to this markdown file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("onnx_admm").setLevel(logging.ERROR)
    logging.getLogger("converters").setLevel(logging.ERROR)
    entries = {e.name: e for e in sweep.CORPUS}
    print(HEADER)
    for name in args.only.split(","):
        for row in measure(entries[name], args.work, args.seeds, args.held_out, json.loads(args.recipe),
                           args.inputs):
            print(format_row(row), flush=True)
            if args.results:
                with args.results.open("a") as f:
                    f.write(format_row(row) + "\n")


if __name__ == "__main__":
    main()
