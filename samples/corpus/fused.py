"""A model as exported against the same model after onnxruntime's optimizer fused it: compress both the same
way and time all four files in onnxruntime, in one process, interleaved.

    python samples/corpus/fused.py --plain bert.onnx --fused bert_opt.onnx --data train.npz --val val.npz \\
        --work W [-- ARGS for compress, default --sparsity 0.5 --admm-epochs 2 --retrain-epochs 1 --threads 1]

Prints one line per file: the held-out task metric of each compressed file against its own original (the
report's), the gzip'd size, and the median onnxruntime latency of a batch of the held-out data against the
plain original's, at one thread. The fused file is what onnxruntime's transformer optimizer writes
(``onnxruntime.transformers.optimizer.optimize_model``); making the two files needs whatever exported the model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from onnx_admm.validate import open_session  # noqa: E402

DEFAULT_ARGS = ["--sparsity", "0.5", "--admm-epochs", "2", "--retrain-epochs", "1", "--threads", "1"]


def _compress(model: Path, out: Path, data: Path, val: Path, args: list[str]) -> dict:
    report = out.with_suffix(".json")
    cmd = [sys.executable, "-m", "onnx_admm.cli", "compress", str(model), "-o", str(out), "--data", str(data),
           "--val-data", str(val), "--report", str(report), "--quiet", *args]
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"compress {model.name} exited {done.returncode}: {done.stderr.strip().splitlines()[-1:]}")
    result = json.loads(report.read_text())
    result["run_s"] = time.perf_counter() - started
    return result


def _latency(paths: list[Path], feeds_path: Path, batch: int, repeats: int) -> list[float]:
    """Median ms of one run per file over ``repeats`` rounds, the files taking turns within each round."""
    arrays = dict(np.load(feeds_path))
    sessions = [open_session(p, threads=1) for p in paths]
    names = [{i.name for i in s.get_inputs()} for s in sessions]
    feeds = [{k: v[:batch] for k, v in arrays.items() if k in n} for n in names]
    times: list[list[float]] = [[] for _ in paths]
    for s, f in zip(sessions, feeds):
        s.run(None, f)  # warm-up
    for _ in range(repeats):
        for k, (s, f) in enumerate(zip(sessions, feeds)):
            started = time.perf_counter()
            s.run(None, f)
            times[k].append(1000 * (time.perf_counter() - started))
    return [statistics.median(t) for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plain", type=Path, required=True)
    parser.add_argument("--fused", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--val", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("args", nargs="*", help="compress's options (after --)")
    options = parser.parse_args()
    options.work.mkdir(parents=True, exist_ok=True)
    args = options.args or DEFAULT_ARGS
    outputs = {name: options.work / f"{name}.compressed.onnx" for name in ("plain", "fused")}
    reports = {name: _compress(getattr(options, name), outputs[name], options.data, options.val, args)
               for name in outputs}
    files = [options.plain, options.fused, outputs["plain"], outputs["fused"]]
    ms = _latency(files, options.val, options.batch, options.repeats)
    print(f"compress {' '.join(args)}; onnxruntime at batch {options.batch}, one thread, medians of {options.repeats}")
    for label, path, t in zip(("plain original", "fused original", "plain compressed", "fused compressed"), files, ms):
        report = reports.get(label.split()[0]) if "compressed" in label else None
        metric = ""
        if report is not None:
            task = report["metrics"].get("task") or {}
            metric = (f"{task.get('metric', 'agreement')} {task.get('value', report['metrics'].get('agreement')):.3f}, "
                      f"gzip {report['compressed']['bytes_gzip']:,} B, {report['run_s']:.0f} s, ")
        print(f"  {label:17s} {metric}{t:.2f} ms ({t / ms[0]:.2f}x the plain original)")


if __name__ == "__main__":
    main()
