"""What an ADMM epoch costs next to a plain training epoch, on the benchmark's LeNet-5.

Three ways of training the same imported module on the same batches, interleaved ``--repeats`` times
in one process (so a busy machine slows them alike): plain SGD steps (no compression), the ADMM phase
of ``compress`` (penalty gradient every step, Z/U updates with the LAMP re-split of a 40x budget) and its
masked-retraining phase (gradient mask and re-zeroing every step). The figure is seconds per batch,
whole phases including the Z/U updates, median over the repeats; the ratios are what to read.

    python samples/lenet5_fashion_mnist/epoch_cost.py --train 10000 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE))

BATCH = 128


def _plain(model_path: Path, x: np.ndarray, y: np.ndarray, seed: int) -> float:
    import torch

    from onnx_admm.converters.importer import import_model
    from onnx_admm.converters.modelio import load_model

    module = import_model(load_model(model_path)).module.train()
    optimizer = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    order = torch.randperm(len(xt), generator=torch.Generator().manual_seed(seed))
    started, n = time.perf_counter(), 0
    for i in range(0, len(xt), BATCH):
        batch = order[i:i + BATCH]
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(module(xt[batch])[0], yt[batch]).backward()
        optimizer.step()
        n += 1
    return (time.perf_counter() - started) / n


def _phases(model_path: Path, data: Path, seed: int) -> dict[str, float]:
    """Seconds per batch of the ADMM and the retraining phase of one ``compress`` run (one epoch each)."""
    from onnx_admm.api import compress
    from onnx_admm.recipe import CompressConfig

    config = CompressConfig().replace(
        train={"batch_size": BATCH, "seed": seed, "threads": 1},
        admm={"epochs": 1, "retrain_epochs": 1},
        prune={"sparsity": 1 - 1 / 40, "stages": 1},
    )
    marks: dict[str, list[float]] = {}
    counts: dict[str, int] = {}
    current = [None]

    def progress(event: dict) -> None:
        now = time.perf_counter()
        if event["kind"] == "epoch":
            current[0] = event["phase"]
            marks.setdefault(event["phase"], []).append(now)
        elif event["kind"] == "batch" and current[0] is not None:
            counts[current[0]] = counts.get(current[0], 0) + 1
            marks[current[0]].append(now)

    compress(str(model_path), str(data), config, progress=progress, metric_floor=0)
    # From the phase's first event to its last batch: every step and every Z/U update in between.
    return {phase: (times[-1] - times[0]) / counts[phase] for phase, times in marks.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=10000, help="training images per epoch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, default=HERE / "work", help="where bench.py left dense.onnx")
    args = parser.parse_args()

    import torch

    from bench import DEFAULT_DATA, load_fashion_mnist, train_subset  # the benchmark's own data

    torch.set_num_threads(1)
    model = args.work / "dense.onnx"
    if not model.exists():
        raise SystemExit(f"error: {model} not found; run bench.py first (it trains the dense model)")
    x, y = train_subset(load_fashion_mnist(DEFAULT_DATA), args.train)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "train.npz"
        np.savez(data, input=x, labels=y)
        rows: dict[str, list[float]] = {"plain": [], "admm": [], "retrain": []}
        for r in range(args.repeats):
            rows["plain"].append(_plain(model, x, y, r))
            for phase, seconds in _phases(model, data, r).items():
                rows[phase].append(seconds)
    median = {k: statistics.median(v) for k, v in rows.items()}
    print(f"LeNet-5, {args.train} images, batch {BATCH}, 1 thread, median of {args.repeats} interleaved repeats")
    print("| training | ms per batch | vs plain |")
    print("| --- | --- | --- |")
    for k in ("plain", "admm", "retrain"):
        print(f"| {k} | {1000 * median[k]:.2f} | {median[k] / median['plain']:.3f}x |")


if __name__ == "__main__":
    main()
