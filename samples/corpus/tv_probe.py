"""Torchvision architectures outside the corpus through check and a few label-free compress cases.

``python samples/corpus/tv_probe.py --work W [--cases 50,f30,q4,q4n] ARCH:EXPORTER ...`` (EXPORTER ``ts`` for
the TorchScript exporter, ``dynamo`` for the dynamo one; e.g. ``efficientnet_b0:dynamo googlenet:ts``) builds
each architecture as sweep.py builds its torchvision entries (random weights fitted briefly to templated 64x64
images, dynamic batch), runs ``check`` and then each case through sweep.run_entry (64 representative inputs, 32
for the selection split and the report): ``50`` the sweep's 50% unstructured run, ``f30`` 30% of the filters,
``q4`` 4 bits per channel in one stage (1 + 1 epochs), ``q4n`` the same with nearest rounding. One JSON line per
run goes to ``W/rows.jsonl``; a run already there is skipped, so the probe resumes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sweep  # noqa: E402

QUICK = {"admm": {"epochs": 1, "retrain_epochs": 1}}
sweep.CASES.update({
    "f30": {**QUICK, "prune": {"sparsity": 0.3, "structure": "filter"}},
    "q4": {**QUICK, "prune": {"stages": 1}, "quantize": {"bits": 4}},
    "q4n": {**QUICK, "prune": {"stages": 1}, "quantize": {"bits": 4, "rounding": "nearest"}},
})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--cases", default="50,f30,q4")
    parser.add_argument("models", nargs="+", help="ARCH:EXPORTER, e.g. efficientnet_b0:dynamo")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    out = args.work / "rows.jsonl"
    done = {(r["model"], r["case"]) for r in map(json.loads, out.read_text().splitlines())} if out.exists() else set()
    for spec in args.models:
        arch, exporter = spec.split(":")
        name = f"{arch}_{exporter}"
        entry = sweep.Entry(name, "torchvision (random)", exporter, sweep._torchvision(arch, exporter == "dynamo", True))
        for case in args.cases.split(","):
            if (name, case) in done:
                continue
            row = sweep.run_entry(entry, args.work, 64, case)
            row = {k: v for k, v in row.items() if isinstance(v, (str, int, float, bool, type(None)))}
            with open(out, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(name, case, row.get("check"), row.get("agreement"), row.get("reason"), flush=True)


if __name__ == "__main__":
    main()
