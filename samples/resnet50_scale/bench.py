"""Big-model benchmark: compress a 25M-parameter ResNet-50 10x on the CPU, against plain PyTorch training.

    python samples/resnet50_scale/bench.py --work /tmp/r50 --images 96 --batch 16 --threads 2 --rounds 2

Builds torchvision's ResNet-50 with random weights (``resnet50(weights=None)``: nothing downloads),
exports it once with the TorchScript exporter (dynamic batch; eval mode, so BatchNorm is folded into the
convolutions), writes random 3x224x224 images as an uncompressed ``.npz`` (``--images`` to train on and
``--val-images`` for ``--val-data``; no labels, so compress distils from the original), then runs, in
turns and each in a fresh process so that its peak RSS is its own:

- ``plain``: the same torchvision module trained the usual way (``train()`` mode, cross-entropy on random
  labels, SGD with momentum 0.9) for one epoch of the samples and batches compress's epochs take;
- ``compress``: ``compress()`` with what ``onnx-admm compress --sparsity 0.9 --admm-epochs 1
  --retrain-epochs 1`` sets, at the same batch size and threads.

Each row (one JSON object per line in ``WORK/results.jsonl``) records the wall and CPU seconds of each
epoch and of each step in it (compress: from its progress events; its epoch also holds the end-of-epoch
work, the selection split's evaluation and the Z/U update), the peak RSS (plain: VmHWM of its process;
compress: the report's ``memory``, per phase) and the whole process's wall time. ``--only plain|compress``
runs one side once (what the turns call).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
logger = logging.getLogger("resnet50_scale")
SIZE = 224
CLASSES = 1000


def vm_hwm_mb() -> float:
    """This process's peak resident set (VmHWM), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def append_row(path: Path, row: dict) -> None:
    """One JSON line more in ``path``, logged too (a run cut short keeps the rows it finished)."""
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
    logger.info("%s", json.dumps(row))


def prepare(work: Path, images: int, val_images: int) -> None:
    """The ONNX model and the data, made once per ``work`` folder (seeded: the same every time)."""
    import torch
    import torchvision

    work.mkdir(parents=True, exist_ok=True)
    model_path = work / "resnet50.onnx"
    if not model_path.exists():
        torch.manual_seed(0)
        model = torchvision.models.resnet50(weights=None)
        # BatchNorm's statistics as initialised (mean 0, variance 1) normalise nothing in eval mode: the
        # residual sums then grow block after block, the logits reach ~1e4 and a 90% pruned copy's
        # distillation loss overflows to NaN. Running statistics of random images (cumulative averages
        # over a few batches; no weight changes) keep the exported, BatchNorm-folded graph normalised.
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = None
        with torch.no_grad():
            for _ in range(4):
                model.train()(torch.randn(8, 3, SIZE, SIZE))
        model.eval()
        torch.onnx.export(model, (torch.randn(1, 3, SIZE, SIZE),), str(model_path), dynamo=False,
                          input_names=["input"], output_names=["logits"], opset_version=17,
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
        logger.info("exported %s (%.1f MB)", model_path, model_path.stat().st_size / 1e6)
    rng = np.random.default_rng(0)
    for name, count in (("train", images), ("val", val_images)):
        path = work / f"{name}.npz"
        if not path.exists() or len(np.load(path)["input"]) != count:
            # savez, not savez_compressed: compress memory-maps an uncompressed member batch by batch.
            np.savez(path, input=rng.standard_normal((count, 3, SIZE, SIZE), dtype=np.float32))


class Clock:
    """Wall and CPU seconds (this process, all threads) of each epoch and of each training step in it."""

    def __init__(self) -> None:
        self.epochs: list[dict] = []
        self._epoch = self._step = None

    @staticmethod
    def _now() -> tuple[float, float]:
        return time.perf_counter(), time.process_time()

    def epoch_start(self, phase: str) -> None:
        self._epoch = self._step = self._now()
        self.epochs.append({"phase": phase, "steps_s": [], "steps_cpu_s": []})

    def step_end(self) -> None:
        now, epoch = self._now(), self.epochs[-1]
        epoch["steps_s"].append(round(now[0] - self._step[0], 2))
        epoch["steps_cpu_s"].append(round(now[1] - self._step[1], 2))
        self._step = now

    def epoch_end(self) -> None:
        now, epoch = self._now(), self.epochs[-1]
        epoch["epoch_s"] = round(now[0] - self._epoch[0], 1)
        epoch["epoch_cpu_s"] = round(now[1] - self._epoch[1], 1)

    def progress(self, event: dict) -> None:
        """``compress(progress=)``: an epoch's batches are timed from its start event to its end event."""
        if event["kind"] == "epoch":
            self.epoch_start(event["phase"])
        elif event["kind"] == "batch":
            self.step_end()
        elif event["kind"] == "epoch_end":
            self.epoch_end()


def plain(work: Path, samples: int, batch: int, threads: int) -> dict:
    """Train torchvision's ResNet-50 for one epoch of ``samples`` random images in steps of ``batch`` (the
    last one smaller), as compress's epoch over the same count."""
    import torch
    import torchvision

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    data = np.load(work / "train.npz", mmap_mode="r")["input"]
    labels = torch.randint(0, CLASSES, (len(data),))
    clock = Clock()
    clock.epoch_start("plain")
    for start in range(0, samples, batch):
        rows = np.arange(start, min(start + batch, samples))
        x = torch.from_numpy(np.ascontiguousarray(data[rows]))
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), labels[rows])
        loss.backward()
        optimizer.step()
        clock.step_end()
    clock.epoch_end()
    return {"epochs": clock.epochs, "samples": samples, "batch": batch, "peak_rss_mb": round(vm_hwm_mb())}


def compress(work: Path, batch: int, threads: int) -> dict:
    """``compress()`` 10x (what ``onnx-admm compress --sparsity 0.9 --admm-epochs 1 --retrain-epochs 1``
    runs), timed through its progress events; memory from its report."""
    from onnx_admm.api import compress as run
    from onnx_admm.recipe import CompressConfig

    config = CompressConfig.from_dict({"train": {"batch_size": batch, "threads": threads},
                                       "admm": {"epochs": 1, "retrain_epochs": 1}, "prune": {"sparsity": 0.9}})
    clock = Clock()
    result = run(work / "resnet50.onnx", work / "train.npz", config, val_data=work / "val.npz",
                 progress=clock.progress, output=work / "resnet50.admm.onnx", metric_floor=0)
    report = result.report
    return {"epochs": clock.epochs, "steps": report["distributed"]["batches_per_rank"], "batch": batch,
            "peak_rss_mb": round(report["peak_rss_mb"]), "wall_s": round(report["wall_s"], 1),
            "memory": {k: round(v) for k, v in report["memory"]["peak_rss_mb"].items()},
            "sparsity": round(1 - report["params"]["nonzero"] / report["params"]["total"], 4),
            "reconstruction": [stage["reconstruction"] for stage in report["stages"]]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=HERE / "work")
    parser.add_argument("--images", type=int, default=96, help="training images (random, 3x224x224)")
    parser.add_argument("--val-images", type=int, default=16, help="images for --val-data")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="turns of plain then compress")
    parser.add_argument("--only", choices=("plain", "compress"), help="one run of one side (the turns call this)")
    parser.add_argument("--samples", type=int, help="--only plain: images in the epoch")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.only == "plain":
        print(json.dumps(plain(args.work, args.samples, args.batch, args.threads)))  # read by the parent
        return 0
    if args.only == "compress":
        print(json.dumps(compress(args.work, args.batch, args.threads)))
        return 0
    prepare(args.work, args.images, args.val_images)
    # compress trains on the part of --data left after its 10% selection split (onnx_admm.data.Dataset.split)
    train = args.images - int(round(args.images * 0.1))
    results = args.work / "results.jsonl"
    for turn in range(args.rounds):
        for side in ("plain", "compress"):
            command = [sys.executable, __file__, "--only", side, "--work", str(args.work), "--batch", str(args.batch),
                       "--threads", str(args.threads), "--samples", str(train)]
            started = time.perf_counter()
            out = subprocess.run(command, capture_output=True, text=True,
                                 env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
            (args.work / f"{side}.{turn}.log").write_text(out.stderr)
            if out.returncode:
                raise RuntimeError(f"{side} failed ({out.returncode}): {out.stderr[-2000:]}")
            row = {"turn": turn, "side": side, **json.loads(out.stdout.strip().splitlines()[-1]),
                   "process_s": round(time.perf_counter() - started, 1), "load": os.getloadavg()[0]}
            append_row(results, row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
