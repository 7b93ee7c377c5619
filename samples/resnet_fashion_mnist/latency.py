"""Interleaved onnxruntime latency of several ONNX files: median per file at batch 1 and 64, one process.

    python samples/resnet_fashion_mnist/latency.py WORK/dense.onnx WORK/before.onnx WORK/after.onnx

Each round runs every file once in turn, so load from other processes hits them alike.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import numpy as np

logger = logging.getLogger("latency")


def medians(files: list[str], threads: int = 2) -> dict[int, dict[str, float]]:
    """Median onnxruntime latency (ms) of each file at batch 1 and 64, the files run in turn each round."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    sessions = {f: ort.InferenceSession(str(f), options, providers=["CPUExecutionProvider"]) for f in files}
    rng = np.random.default_rng(0)
    out: dict[int, dict[str, float]] = {}
    for batch, rounds in ((1, 200), (64, 40)):
        x = {"input": rng.random((batch, 1, 28, 28), dtype=np.float32)}
        for session in sessions.values():
            for _ in range(5):  # warm-up
                session.run(None, x)
        times: dict[str, list[float]] = {f: [] for f in files}
        for _ in range(rounds):
            for f, session in sessions.items():
                start = time.perf_counter()
                session.run(None, x)
                times[f].append(time.perf_counter() - start)
        out[batch] = {f: 1000 * float(np.median(t)) for f, t in times.items()}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for batch, ms in medians(args.files, args.threads).items():
        logger.info("batch %d: %s", batch, ", ".join(f"{f} {t:.3f} ms" for f, t in ms.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
