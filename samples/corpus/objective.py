"""Label-free compression of the two imbalanced-output corpus models, with and without ``train.balance``.

``python samples/corpus/objective.py [--work DIR] [--seeds 0 1] [--balance 0 0.5] [--lr LR] [--only captcha_ctc,...]``
builds (or reuses) ``captcha_ctc`` and ``detector_1d`` (samples/corpus/synthetic.py) in the work folder
(default ``out/objective``), writes their representative inputs (no labels) to ``train.npz``, then runs,
per balance and seed, exactly

    onnx-admm compress MODEL --data train.npz --sparsity 0.5 --admm-epochs 1 --retrain-epochs 1
              --seed S --threads 1 --recipe balance.toml -o OUT --report REPORT --quiet

(``balance.toml`` holds ``[train] balance = B``; exit 3, the metric floor, writes OUT's .gate-failed.onnx,
which is measured all the same) and measures the compressed model against the original in onnxruntime on
held-out generated inputs with onnx_admm.metrics: for the captcha reader the share of captchas whose
greedy-decoded reads equal the original's and the character error rate, for the detector the F1 of the
map's positive set (> 0.5) against the original's (and of the detection confidences). The report's own
task metric (on its held-out split of the data) and the original against the generator's truth stand
beside them. It prints a markdown table; samples/corpus/RESULTS.md holds the one measured here.
"""

from __future__ import annotations

import argparse
import json
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
from onnx_admm.metrics import PositiveSet, SequenceMatch  # noqa: E402

logger = logging.getLogger("objective")

COMMAND = ("{python} -m onnx_admm.cli compress {model} --data {data} --sparsity 0.5 --admm-epochs 1 --retrain-epochs 1 "
           "--seed {seed} --threads 1 --recipe {recipe} -o {out} --report {report} --quiet")


def captcha_measures(original: Path, compressed: Path, held_out: int) -> dict:
    images, _, frames = synthetic.render_captchas(held_out, seed=2)
    # The frame labels decode (greedily) to the rendered text: the original's reads against the truth.
    truth = SequenceMatch(blank=0)
    truth.add(frames, synthetic.run_onnx(original, {"image": images}, batch_axis=1)[0].argmax(-1).T, batch=held_out)
    return {**synthetic.captcha_agreement(original, compressed, images), "original_exact": truth.value}


def detector_measures(original: Path, compressed: Path, held_out: int) -> dict:
    signal, aux, mask, _ = synthetic.make_events(held_out, seed=2)
    feeds = {"signal": signal, "aux": aux}
    truth = PositiveSet(binary=True)
    truth.add(mask > 0.5, synthetic.run_onnx(original, feeds)[0][..., 0] > 0.5, batch=held_out)
    return {**synthetic.detector_agreement(original, compressed, feeds), "original_exact": truth.value}


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
    parser.add_argument("--lr", type=float, help="train.lr in the recipe (default: the product's)")
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
            tag = f"balance{balance:g}" + (f".lr{args.lr:g}" if args.lr is not None else "")
            recipe = folder / f"{tag}.toml"
            recipe.write_text(f"[train]\nbalance = {balance}\n" + (f"lr = {args.lr}\n" if args.lr is not None else ""))
            for seed in args.seeds:
                out = folder / f"n{args.train}.{tag}.s{seed}.onnx"
                command = COMMAND.format(python=sys.executable, model=model, data=data, seed=seed, recipe=recipe, out=out,
                                         report=out.with_suffix(".json"))
                started = time.perf_counter()
                # Exit 3 is the metric floor (or gate): the model is then written as OUT's .gate-failed.onnx.
                status = subprocess.run(command.split(), cwd=ROOT).returncode
                if status not in (0, 3):
                    raise SystemExit(f"{command}: exit status {status}")
                written = out if status == 0 else out.with_suffix(".gate-failed.onnx")
                task = json.loads(out.with_suffix(".json").read_text())["metrics"].get("task") or {}
                row = {"model": name, "train": args.train, "balance": balance, "lr": args.lr, "seed": seed,
                       "status": status,
                       "seconds": time.perf_counter() - started, "report_task": task.get("value"),
                       **measure(model, written, args.held_out)}
                logger.info("%s", row)
                rows.append(row)
    print(format_rows(rows))


def format_rows(rows: list[dict]) -> str:
    lines = ["| model | inputs | balance | seed | vs the original (held-out) | detail | report's task metric | exit "
             "| original vs truth | compress s |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if r["metric"] == "sequence match":
            detail = f"CER {r['error_rate']:.3f}, empty reads {r['empty']:.3f}"
        else:
            detail = (f"P {r['precision']:.3f} R {r['recall']:.3f}, detections F1 {r['detections_f1']:.3f}, "
                      f"positives {r['positives']:.3f}")
        task = "-" if r["report_task"] is None else f"{r['report_task']:.3f}"
        lines.append(f"| {r['model']} | {r['train']} | {r['balance']:g} | {r['seed']} | {r['metric']} {r['value']:.3f} "
                     f"| {detail} | {task} | {r['status']} | {r['original_exact']:.3f} | {r['seconds']:.0f} |")
    return "\n".join(lines)

if __name__ == "__main__":
    main()
