"""Where a compress step's time goes on ResNet-50: each piece timed on its own, in CPU seconds.

    python samples/resnet50_scale/profile_step.py --work /tmp/r50 --batch 16 --threads 2 --rounds 2

Uses ``WORK/resnet50.onnx`` and ``WORK/train.npz`` from ``bench.py``. In one process, in turns (every
piece once per round, so a busy machine slows all of them alike), one step of each of:

- ``torchvision_train``: torchvision's ResNet-50 in ``train()`` mode (BatchNorm on batch statistics),
  forward, cross-entropy, backward, SGD step (``bench.py``'s plain training);
- ``torchvision_eval``: the same with BatchNorm frozen (``eval()``), as compress keeps the converted model;
- ``converted``: the onnx2torch module compress trains (``converters.importer``; BatchNorm folded into
  the convolutions by the exporter), same step;
- ``teacher``: the converted module's forward pass under ``no_grad`` (distillation's extra cost per step);
- ``admm_penalty``: ``ADMM.add_penalty_grad`` over every Conv/Gemm weight (90% unstructured);
- ``zu_update``: one ``ADMM.update`` (projection of W + U, dual update).

CPU seconds (``time.process_time``, all threads) are the steadier figure on a shared machine; wall seconds
are recorded too. Results are one JSON line per piece and round in ``WORK/profile.jsonl``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np

logger = logging.getLogger("profile_step")


def timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    import onnx
    import torch
    import torchvision

    from bench import append_row  # this folder's benchmark (run as a script, its folder is on sys.path)

    from converters.importer import import_model
    from onnx_admm.admm import ADMM
    from onnx_admm.projections import Unstructured, keep_count

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.from_numpy(np.ascontiguousarray(np.load(args.work / "train.npz", mmap_mode="r")["input"][:args.batch]))
    labels = torch.randint(0, 1000, (args.batch,))
    loss_fn = torch.nn.functional.cross_entropy

    def sgd_step(model, optimizer, forward):
        optimizer.zero_grad(set_to_none=True)
        loss_fn(forward(model), labels).backward()
        optimizer.step()

    tv_train = torchvision.models.resnet50(weights=None).train()
    tv_eval = torchvision.models.resnet50(weights=None).eval()
    converted = import_model(onnx.load(str(args.work / "resnet50.onnx"))).module
    teacher = import_model(onnx.load(str(args.work / "resnet50.onnx"))).module.eval().requires_grad_(False)
    optimizers = {name: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)
                  for name, m in (("torchvision_train", tv_train), ("torchvision_eval", tv_eval),
                                  ("converted", converted))}
    weights = {n: p for n, p in converted.named_parameters() if p.dim() >= 2}
    admm = ADMM(weights, {n: Unstructured(keep_count(p.numel(), 0.9)) for n, p in weights.items()})
    for p in weights.values():  # the penalty adds to a gradient that exists
        p.grad = torch.zeros_like(p)

    def no_grad_teacher():
        with torch.no_grad():
            teacher(x)

    pieces = {
        "torchvision_train": lambda: sgd_step(tv_train, optimizers["torchvision_train"], lambda m: m(x)),
        "torchvision_eval": lambda: sgd_step(tv_eval, optimizers["torchvision_eval"], lambda m: m(x)),
        "converted": lambda: sgd_step(converted, optimizers["converted"], lambda m: m(x)[0]),
        "teacher": no_grad_teacher,
        "admm_penalty": admm.add_penalty_grad,
        "zu_update": admm.update,
    }
    for piece in pieces.values():  # warm-up: first-call allocations and lazy initialisation
        piece()
    out = args.work / "profile.jsonl"
    for turn in range(args.rounds):
        for name, piece in pieces.items():
            wall, cpu = timed(piece)
            append_row(out, {"turn": turn, "piece": name, "batch": args.batch, "threads": args.threads,
                             "wall_s": round(wall, 2), "cpu_s": round(cpu, 2)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
