"""Label-free compression of the two imbalanced-output corpus models, with and without ``train.balance``.

``python samples/corpus/objective.py [--work DIR] [--seeds 0 1] [--balance 0 0.5] [--only captcha_ctc,...]``
builds (or reuses) ``captcha_ctc`` and ``detector_1d`` (samples/corpus/synthetic.py) in the work folder
(default ``out/objective``), writes their representative inputs (no labels) to ``train.npz``, then runs,
per balance and seed, exactly

    onnx-admm compress MODEL --data train.npz --sparsity 0.5 --admm-epochs 1 --retrain-epochs 1
              --seed S --threads 1 --recipe balance.toml -o OUT --report REPORT --quiet

(``balance.toml`` holds ``[train] balance = B``) and measures the compressed model against the original in
onnxruntime on held-out generated inputs: for the captcha reader the share of captchas whose greedy-decoded
sequence equals the original's (and the original's exact reads against the rendered text), for the
detector the F1 of the positive set of the map (> 0.5) against the original's, and of the detection
confidences (> 0.5). It prints a markdown table; samples/corpus/RESULTS.md holds the one measured here.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import synthetic  # noqa: E402

logger = logging.getLogger("objective")

COMMAND = ("{python} -m onnx_admm.cli compress {model} --data {data} --sparsity 0.5 --admm-epochs 1 --retrain-epochs 1 "
           "--seed {seed} --threads 1 --recipe {recipe} -o {out} --report {report} --quiet")


def captcha_measures(original: Path, compressed: Path, held_out: int) -> dict[str, float]:
    images, texts, _ = synthetic.render_captchas(held_out, seed=2)
    reads = synthetic.greedy_decode(synthetic.run_onnx(original, {"image": images}, batch_axis=1)[0])
    return {**synthetic.captcha_agreement(original, compressed, images),
            "original_exact": synthetic.sequence_match(reads, [tuple(int(c) for c in t) for t in texts])}


def detector_measures(original: Path, compressed: Path, held_out: int) -> dict[str, float]:
    signal, aux, mask, _ = synthetic.make_events(held_out, seed=2)
    feeds = {"signal": signal, "aux": aux}
    return {**synthetic.detector_agreement(original, compressed, feeds),
            "original_exact": synthetic.positive_f1(synthetic.run_onnx(original, feeds)[0][..., 0] > 0.5, mask > 0.5)}


ENTRIES = {"captcha_ctc": (synthetic.captcha_ctc(), captcha_measures),
           "detector_1d": (synthetic.detector_1d(), detector_measures)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / "out/objective")
    parser.add_argument("--only", default="", help="comma-separated entry names")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--balance", type=float, nargs="+", default=[0.0, 0.5])
    parser.add_argument("--held-out", type=int, default=500)
    parser.add_argument("--train", type=int, default=2048, help="representative inputs to compress on")
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows = []
    for name, (build, measure) in ENTRIES.items():
        if args.only and name not in args.only.split(","):
            continue
        folder = args.work / name
        folder.mkdir(parents=True, exist_ok=True)
        model, feeds = build(folder)
        data = folder / f"train{args.train}.npz"
        np.savez(data, **{k: v[:args.train] for k, v in feeds.items()})
        for balance in args.balance:
            recipe = folder / f"balance{balance:g}.toml"
            recipe.write_text(f"[train]\nbalance = {balance}\n")
            for seed in args.seeds:
                out = folder / f"n{args.train}.b{balance:g}.s{seed}.onnx"
                command = COMMAND.format(python=sys.executable, model=model, data=data, seed=seed, recipe=recipe, out=out,
                                         report=out.with_suffix(".json"))
                started = time.perf_counter()
                subprocess.run(command.split(), check=True, cwd=ROOT)
                row = {"model": name, "train": args.train, "balance": balance, "seed": seed, "seconds": time.perf_counter() - started,
                       **measure(model, out, args.held_out)}
                logger.info("%s", row)
                rows.append(row)
    print("| model | balance | seed | match with the original | other | original vs ground truth | compress s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        other = (f"detections F1 {r['detections_f1']:.3f}, positives {r['positives']:.3f}" if "detections_f1" in r
                 else f"empty reads {r['empty']:.3f}")
        print(f"| {r['model']} | {r['balance']:g} | {r['seed']} | {r['match']:.3f} | {other} | {r['original_exact']:.3f} "
              f"| {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
