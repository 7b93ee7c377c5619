"""Interleaved onnxruntime latency of several ONNX files: median per file at batch 1 and 64, one process.

    python samples/resnet_fashion_mnist/latency.py WORK/dense.onnx WORK/before.onnx WORK/after.onnx

Each round runs every file once in turn, so load from other processes hits them alike. Beside the wall
time, the CPU time of this process per run (``time.process_time``) is reported: on a shared machine other
jobs stretch the wall time of a run but not the CPU time it uses (cache effects remain).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import numpy as np

logger = logging.getLogger("latency")


def timings(files: list[str], threads: int = 2, repeat: int = 1) -> dict[int, dict[str, dict[str, float]]]:
    """Median onnxruntime latency (ms) of each file at batch 1 and 64, the files run in turn each round:
    ``{batch: {"wall": {file: ms}, "cpu": {file: ms}}}`` (``repeat`` multiplies the rounds)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    sessions = {f: ort.InferenceSession(str(f), options, providers=["CPUExecutionProvider"]) for f in files}
    rng = np.random.default_rng(0)
    out: dict[int, dict[str, dict[str, float]]] = {}
    for batch, rounds in ((1, 200), (64, 40)):
        x = {"input": rng.random((batch, 1, 28, 28), dtype=np.float32)}
        for session in sessions.values():
            for _ in range(5):  # warm-up
                session.run(None, x)
        wall: dict[str, list[float]] = {f: [] for f in files}
        cpu: dict[str, list[float]] = {f: [] for f in files}
        for _ in range(rounds * repeat):
            for f, session in sessions.items():
                start, start_cpu = time.perf_counter(), time.process_time()
                session.run(None, x)
                wall[f].append(time.perf_counter() - start)
                cpu[f].append(time.process_time() - start_cpu)
        out[batch] = {kind: {f: 1000 * float(np.median(t)) for f, t in runs.items()}
                      for kind, runs in (("wall", wall), ("cpu", cpu))}
    return out


def medians(files: list[str], threads: int = 2) -> dict[int, dict[str, float]]:
    """The wall-time medians of ``timings``: ``{batch: {file: ms}}``."""
    return {batch: kinds["wall"] for batch, kinds in timings(files, threads).items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1, help="multiply the rounds (200 at batch 1, 40 at 64)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for batch, kinds in timings(args.files, args.threads, args.repeat).items():
        logger.info("batch %d: %s", batch, ", ".join(f"{f} {t:.3f} ms" for f, t in kinds["wall"].items()))
        logger.info("batch %d CPU: %s", batch, ", ".join(f"{f} {t:.3f} ms" for f, t in kinds["cpu"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
