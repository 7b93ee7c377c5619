"""How far distillation alone can take a pruned corpus classifier: fit on the training inputs, measure on others.

``python samples/corpus/fit_probe.py --entry transformer_encoder [--train 128] [--steps 100] [--lr 1e-3]
[--mix]`` builds the entry (sweep.py) in the work folder (default ``out/fit_probe``), imports it with
onnx-admm's importer, prunes half of its compressible weights in one shot (LAMP allocation, the largest
``|w|`` kept per layer, as the hard projection does), then trains every float parameter with Adam on
label-free distillation (KL to the original's [N, C] logits, the product's loss) on ``--train`` inputs
(synthesized with seed 0, as the sweep's), masks re-applied after each step, batches of 32. With ``--mix``
each batch is replaced by random convex mixes of its inputs, labelled by the original (input mixup: the
teacher labels any input). Every fifth of the steps it logs the top-1 agreement with the original on the
training inputs and on 512 others (seed 7): where the first reaches 1.0 and the second stays low, the
inputs, not the objective or the budget, limit what a compress can reach.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import logging
import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import sweep  # noqa: E402
from onnx_admm.converters.importer import import_model  # noqa: E402
from onnx_admm.allocation import Allocation, allocate  # noqa: E402
from onnx_admm.train import Loss, ScoreSpec  # noqa: E402

logger = logging.getLogger("fit_probe")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entry", default="transformer_encoder")
    parser.add_argument("--work", type=Path, default=ROOT / "out/fit_probe")
    parser.add_argument("--train", type=int, default=128)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--mix", action="store_true", help="input mixup, labelled by the original")
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    entry = next(e for e in sweep.CORPUS if e.name == args.entry)
    folder = args.work / entry.name
    folder.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        path, _ = entry.build(folder)
        model = sweep.load_model(path)
        imported = import_model(model)
    module, index = imported.module, imported.score.index
    x = torch.from_numpy(next(iter(sweep._inputs(model, args.train, 0).values())))
    held = torch.from_numpy(next(iter(sweep._inputs(model, 512, 7).values())))
    teacher = copy.deepcopy(module).eval()
    with torch.no_grad():
        targets, reference = teacher(x)[index], teacher(held)[index]
    weights = {e.param: imported.parameter(e) for e in imported.compressible()}
    keep = allocate({n: p.detach() for n, p in weights.items()}, sum(p.numel() for p in weights.values()) // 2,
                    Allocation())
    masks = {}
    for name, p in weights.items():
        order = p.detach().abs().flatten().argsort(descending=True)
        mask = torch.zeros(p.numel(), dtype=torch.bool)
        mask[order[:keep[name]]] = True
        masks[name] = mask.reshape(p.shape)

    def apply_masks() -> None:
        with torch.no_grad():
            for name, p in weights.items():
                p.mul_(masks[name])

    def agreement() -> tuple[float, float]:
        with torch.no_grad():
            return tuple(float((module(a)[index].argmax(1) == b.argmax(1)).float().mean())
                         for a, b in ((x, targets), (held, reference)))

    apply_masks()
    logger.info("%s, %d training inputs: one-shot 50%%: agreement %.3f on them, %.3f on 512 others", entry.name,
                args.train, *agreement())
    loss_fn = Loss(ScoreSpec(index, imported.score.kind))
    optimizer = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=args.lr)
    g = torch.Generator().manual_seed(0)
    for step in range(args.steps):
        idx = torch.randperm(len(x), generator=g)[:32]
        inputs = x[idx]
        if args.mix:
            share = torch.rand(len(inputs), *[1] * (inputs.dim() - 1), generator=g)
            inputs = share * inputs + (1 - share) * inputs[torch.randperm(len(inputs), generator=g)]
        with torch.no_grad():
            taught = teacher(inputs)
        loss = loss_fn(module(inputs), None, taught)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        apply_masks()
        if (step + 1) % max(1, args.steps // 5) == 0:
            logger.info("step %d: loss %.4f, agreement %.3f on the training inputs, %.3f on 512 others", step + 1,
                        loss.item(), *agreement())


if __name__ == "__main__":
    main()
