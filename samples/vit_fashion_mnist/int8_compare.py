"""Our int8 QDQ output against onnxruntime's quantize_static, per dense model (seed), on more images than the
test set: the 10,000 test images and the 40,000 training images outside the 20,000-image subset that the
dense model, compress and the calibration use (never trained, calibrated or selected on).

    python samples/vit_fashion_mnist/int8_compare.py WORK0 WORK1 ... [--int8-label int8]

Each WORK holds measure.py's ``dense.onnx``, ``qstatic.onnx`` and ``<int8-label>.onnx``. A fourth row is
our QDQ writer applied to ``dense.onnx`` without any training (``activations.int8_model`` on the same 256
calibration images quantize_static gets): where the int8 step alone stands. Rows: top-1, agreement with
the float model's predictions and the mean squared logit error against it; onnxruntime, one thread. One
JSON line per (work, set, row) on stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "lenet5_fashion_mnist"))
logger = logging.getLogger("int8_compare")


def _logits(model, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.log_severity_level = 3
    source = model.SerializeToString() if hasattr(model, "SerializeToString") else str(model)
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {"input": x[i:i + 1000]})[0] for i in range(0, len(x), 1000)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work", nargs="+", type=Path)
    parser.add_argument("--int8-label", default="int8", help="measure.py label of the --int8 row")
    parser.add_argument("--train", type=int, default=20000, help="measure.py's --train")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from bench import DEFAULT_DATA, load_fashion_mnist, train_subset

    from onnx_admm.activations import int8_model
    from onnx_admm.converters.modelio import load_model
    from onnx_admm.data import Dataset

    data = load_fashion_mnist(DEFAULT_DATA)
    x, _ = train_subset(data, args.train)
    # train_subset's pick, inverted: the training images no run sees.
    unused = np.ones(len(data["train_x"]), bool)
    unused[np.random.default_rng(123).permutation(len(data["train_x"]))[:args.train]] = False
    sets = {"test": (data["test_x"], data["test_y"]), "unused": (data["train_x"][unused], data["train_y"][unused])}
    for work in args.work:
        dense = load_model(work / "dense.onnx")
        untrained, _ = int8_model(dense, Dataset({"input": x[:256]}, None, {"input"}))
        rows = {"fp32": dense, "int8": work / f"{args.int8_label}.onnx", "int8_untrained": untrained,
                "quantize_static": work / "qstatic.onnx"}
        for name, (images, labels) in sets.items():
            reference = _logits(dense, images)
            for row, model in rows.items():
                out = reference if row == "fp32" else _logits(model, images)
                print(json.dumps({"work": str(work), "set": name, "images": len(images), "row": row,
                                  "top1": float((out.argmax(1) == labels).mean()),
                                  "agreement": float((out.argmax(1) == reference.argmax(1)).mean()),
                                  "logit_mse": float(np.mean((out - reference) ** 2))}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
