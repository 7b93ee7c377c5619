"""Label-free k-bit runs on corpus entries, nearest against GPTQ rounding, measured on held-out inputs.

``python samples/corpus/rounding.py --work W --bits 4 --only digits_cnn,sklearn_mlp [--admm-epochs 1]
[--retrain-epochs 1]`` builds each entry (sweep.py) with agreement.py's splits (128 representative inputs,
64 for the selection split, held-out: 512 synthesized inputs of seed 7, or every input past the first three
quarters for entries with data), compresses it without labels to k bits per channel in one stage, once with
``quantize.rounding = "nearest"`` and once with ``"gptq"`` (batch 32, one thread, seed 0), and appends one
JSON line per entry to ``W/rows.jsonl``: the held-out top-1 agreement of each, which state each run kept
(``quantized_start``) and GPTQ's output error against nearest rounding (``reconstruction.rounding``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))

import agreement  # noqa: E402
import sweep  # noqa: E402
from onnx_admm.api import compress  # noqa: E402
from onnx_admm.recipe import CompressConfig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--only", required=True, help="comma-separated corpus entry names")
    parser.add_argument("--admm-epochs", type=float, default=1)
    parser.add_argument("--retrain-epochs", type=float, default=1)
    args = parser.parse_args()
    entries = {e.name: e for e in sweep.CORPUS}
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    epochs = {"epochs": args.admm_epochs, "retrain_epochs": args.retrain_epochs}
    for name in args.only.split(","):
        folder = args.work / name
        folder.mkdir(parents=True, exist_ok=True)
        path, train, val, held = agreement._splits(entries[name], folder, 512, 128)
        np.savez(folder / "train.npz", **train)
        np.savez(folder / "val.npz", **val)
        reference = agreement._scores(ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]),
                                      held).argmax(1)
        row = {"model": name, "bits": args.bits, "epochs": epochs}
        for rounding in ("nearest", "gptq"):
            config = {"train": {"threads": 1, "batch_size": 32, "seed": 0}, "admm": epochs, "prune": {"stages": 1},
                      "quantize": {"bits": args.bits, "rounding": rounding}}
            result = compress(path, str(folder / "train.npz"), CompressConfig.from_dict(config),
                              val_data=str(folder / "val.npz"), metric_floor=0)
            out = folder / f"{rounding}.onnx"
            result.save(out)
            scores = agreement._scores(ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"]),
                                       held)
            stage = result.report["stages"][0]
            row[rounding] = round(float((scores.argmax(1) == reference).mean()), 4)
            row[f"{rounding}_kept"] = (stage.get("quantized_start") or {}).get("kept")
            row[f"{rounding}_ratio"] = ((stage.get("reconstruction") or {}).get("rounding") or {}).get("error_ratio")
        print(json.dumps(row), flush=True)
        with open(args.work / "rows.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
