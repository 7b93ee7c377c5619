"""onnxsim's channel pruning on measure.py's residual CNN, beside onnx-admm's filter pruning of the same file:
top-1 in onnxruntime and interleaved onnxruntime latency at batch 1 and 64 (median, one process).

    python samples/resnet_fashion_mnist/onnxsim_peer.py --work WORK --train 6000 --compare WORK/after40.onnx

Prunes ``WORK/dense.onnx`` (made by measure.py) with onnxsim's ``apply_structured_pruning`` (L2 filter norm,
per layer and global), each with and without its label-free block fine-tuning, through the LeNet benchmark's
peers.py (same settings and calibration: the training images, no labels), then times every file against the
dense one and ``--compare`` (e.g. measure.py's filter-pruned row). Optional: without onnxsim it says so in one
line and exits 0. Writes ``WORK/onnxsim_peer.json``.
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
sys.path.insert(0, str(HERE))
logger = logging.getLogger("onnxsim_peer")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=HERE / "work", help="holds measure.py's dense.onnx")
    parser.add_argument("--train", type=int, default=6000, help="calibration images (measure.py's subset)")
    parser.add_argument("--sparsity", type=float, default=0.5, help="fraction of filters removed")
    parser.add_argument("--compare", type=Path, nargs="*", default=[], help="more files to time and score")
    parser.add_argument("--steps", type=int, help="block fine-tuning steps (default: peers.FINETUNE_STEPS; 0: no "
                        "fine-tuned rows)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    import peers
    from bench import DEFAULT_DATA, load_fashion_mnist, train_subset
    from latency import medians

    if not peers.available():
        logger.warning("%s", peers.NOTE)
        return 0
    from onnx_admm.data import Dataset
    from onnx_admm.validate import validate

    data = load_fashion_mnist(DEFAULT_DATA)
    images, _ = train_subset(data, args.train)
    test = Dataset({"input": data["test_x"]}, data["test_y"], {"input"})
    dense = args.work / "dense.onnx"
    rows = []
    for pooled in (False, True):
        for finetune in (False, True) if args.steps != 0 else (False,):
            label = f"onnxsim-channels{'-global' if pooled else ''}{'-ft' if finetune else ''}"
            out = args.work / f"{label}.onnx"
            started = time.perf_counter()
            info = peers.run({"prune": "channels", "global": pooled, "finetune": finetune}, args.sparsity, dense,
                             out, images, steps=args.steps or peers.FINETUNE_STEPS)
            rows.append({"label": label, "file": str(out), "wall_s": round(time.perf_counter() - started, 1), **info})
            logger.info("%s: %s", label, info)
    rows += [{"label": path.stem, "file": str(path)} for path in args.compare]
    for row in rows:
        report = validate(dense, row["file"], test, batch_size=64, threads=1)
        row.update(dense_top1=report.original.accuracy, top1=report.compressed.accuracy,
                   drop_pt=100 * (report.original.accuracy - report.compressed.accuracy))
    latency = medians([str(dense)] + [row["file"] for row in rows], args.threads)
    for row in rows:
        row["latency_ms"] = {f"batch_{b}": {"dense": ms[str(dense)], "file": ms[row["file"]]} for b, ms in latency.items()}
        logger.info("%s: top-1 %.4f, batch 1 %.3f ms (dense %.3f), batch 64 %.2f ms (dense %.2f)", row["label"],
                    row["top1"], latency[1][row["file"]], latency[1][str(dense)], latency[64][row["file"]],
                    latency[64][str(dense)])
    (args.work / "onnxsim_peer.json").write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
