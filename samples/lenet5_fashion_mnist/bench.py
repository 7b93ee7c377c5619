"""Fashion-MNIST LeNet-5 benchmark: every compression method through onnx-admm's Python API, side by side
with the baselines users would pick, evaluated in onnxruntime on the 10,000 test images.

    python samples/lenet5_fashion_mnist/bench.py                 # every row (hours on 2 cores; resumable)
    python samples/lenet5_fashion_mnist/bench.py --only 'admm*'  # rows whose id matches the pattern
    python samples/lenet5_fashion_mnist/bench.py --quick         # plumbing check: few images, 1 epoch

What it does: trains the Caffe LeNet-5 (conv 20 5x5, pool, conv 50 5x5, pool, fc 500, fc 10; 431k
weights) on Debian's `dataset-fashion-mnist`, exports it with torch's TorchScript exporter (opset 17),
then runs each row on that ONNX file. Rows already in results.json are skipped unless --force.
Every pruning method at one target gets the same total number of training epochs (--epochs).
Each row runs in a child process, so its wall time and peak memory are its own.
Outputs (in --out): results.json, RESULTS.md and, when matplotlib is installed, results.png.
"""

from __future__ import annotations

import argparse
import fnmatch
import gzip
import json
import logging
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train_x": "train-images-idx3-ubyte.gz", "train_y": "train-labels-idx1-ubyte.gz",
    "test_x": "t10k-images-idx3-ubyte.gz", "test_y": "t10k-labels-idx1-ubyte.gz",
}
logger = logging.getLogger("bench")
# --quick: one training batch per epoch, a small test set; it checks the plumbing, not accuracy.
QUICK_TRAIN, QUICK_TEST = 128, 100


# ---------------------------------------------------------------- data and the dense model


def load_fashion_mnist(data_dir: Path) -> dict[str, np.ndarray]:
    missing = [name for name in FILES.values() if not (data_dir / name).is_file()]
    if missing:
        sys.exit(f"error: Fashion-MNIST not found in {data_dir} (missing {missing[0]}); "
                 "run `apt-get install dataset-fashion-mnist` or pass --data-dir")

    def idx(name: str, offset: int) -> np.ndarray:
        return np.frombuffer(gzip.open(data_dir / FILES[name]).read(), np.uint8, offset=offset)

    return {
        "train_x": (idx("train_x", 16).reshape(-1, 1, 28, 28) / 255.0).astype(np.float32),
        "train_y": idx("train_y", 8).astype(np.int64),
        "test_x": (idx("test_x", 16).reshape(-1, 1, 28, 28) / 255.0).astype(np.float32),
        "test_y": idx("test_y", 8).astype(np.int64),
    }


def train_dense(work: Path, data: dict[str, np.ndarray], epochs: int, threads: int) -> Path:
    """Train and export the dense LeNet-5 once; later runs reuse dense.onnx."""
    import torch
    from torch import nn

    path = work / "dense.onnx"
    if path.exists():
        return path
    torch.manual_seed(0)
    torch.set_num_threads(threads)
    model = nn.Sequential(
        nn.Conv2d(1, 20, 5), nn.MaxPool2d(2), nn.Conv2d(20, 50, 5), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(800, 500), nn.ReLU(), nn.Linear(500, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, epochs))
    x, y = torch.from_numpy(data["train_x"]), torch.from_numpy(data["train_y"])
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))
        for i in range(0, len(x), 128):
            batch = order[i:i + 128]
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
        scheduler.step()
        logger.info("dense epoch %d done", epoch + 1)
    model.eval()
    tmp = work / "dense.tmp.onnx"
    torch.onnx.export(model, (x[:2],), str(tmp), dynamo=False, opset_version=17, input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------- rows


@dataclass(frozen=True)
class Row:
    id: str
    method: str
    target: str
    kind: str  # compress | ort_dynamic | ort_static | dense
    sparsity: float | None = None
    recipe: dict = field(default_factory=dict)


def agp_targets(final: float, steps: int) -> list[float]:
    """Gradual magnitude pruning's cubic schedule s_t = s_f (1 - (1 - t/n)^3), t = 1..n."""
    return [round(final * (1 - (1 - t / steps) ** 3), 6) for t in range(1, steps + 1)]


def rows(epochs: int) -> list[Row]:
    """Every row; pruning methods at one target share exactly ``epochs`` total training epochs.

    ``epochs`` must be a multiple of 12: magnitude trains all of them after one projection; AGP gives a
    quarter to each of its 4 steps; ADMM one-shot splits them 2/3 ADMM, 1/3 masked retraining; ADMM
    progressive gives a third to each of its 3 stages, half ADMM and half retraining.
    """
    if epochs % 12:
        raise SystemExit(f"error: --epochs must be a multiple of 12 so every method gets exactly that many, got {epochs}")
    out = [Row("dense", "dense fp32", "1x", "dense")]
    for ratio in (10, 40, 100):
        s = 1 - 1 / ratio
        out += [
            Row(f"magnitude-{ratio}x", "magnitude one-shot + fine-tune", f"{ratio}x", "compress", s,
                {"admm": {"epochs": 0, "retrain_epochs": epochs}, "prune": {"sparsity": s, "stages": 1}}),
            Row(f"agp-{ratio}x", "gradual magnitude (AGP, 4 steps)", f"{ratio}x", "compress", s,
                {"admm": {"epochs": 0, "retrain_epochs": epochs // 4},
                 "prune": {"sparsity": s, "targets": agp_targets(s, 4)}}),
            Row(f"admm-{ratio}x", "ADMM one-shot", f"{ratio}x", "compress", s,
                {"admm": {"epochs": 2 * epochs // 3, "retrain_epochs": epochs // 3},
                 "prune": {"sparsity": s, "stages": 1}}),
            Row(f"admm-progressive-{ratio}x", "ADMM progressive (3 stages)", f"{ratio}x", "compress", s,
                {"admm": {"epochs": epochs // 6, "retrain_epochs": epochs // 3 - epochs // 6},
                 "prune": {"sparsity": s, "stages": 3}}),
        ]
    admm_split = {"epochs": 2 * epochs // 3, "retrain_epochs": epochs // 3}
    for name, quant in (("8bit", {"bits": 8}), ("4bit", {"bits": 4}), ("2bit", {"bits": 2}),
                        ("binary", {"bits": 1}), ("ternary", {"ternary": True}), ("16clusters", {"clusters": 16})):
        out.append(Row(f"admm-{name}", f"ADMM quantization ({name}, all layers)", name, "compress", None,
                       {"admm": admm_split, "quantize": {**quant, "per_channel": "clusters" not in quant}}))
    for ratio, bits in ((40, 4), (100, 2)):
        s = 1 - 1 / ratio
        out.append(Row(f"admm-{ratio}x-{bits}bit", f"ADMM joint pruning + {bits}-bit", f"{ratio}x+{bits}bit",
                       "compress", s, {"admm": admm_split, "prune": {"sparsity": s, "stages": 1},
                                       "quantize": {"bits": bits, "per_channel": True}}))
    for fraction in (0.5, 0.75):
        pct = int(fraction * 100)
        out += [
            Row(f"filter-magnitude-{pct}", "filter pruning by norm + fine-tune", f"{pct}% filters", "compress", None,
                {"admm": {"epochs": 0, "retrain_epochs": epochs},
                 "prune": {"sparsity": fraction, "structure": "filter"}}),
            Row(f"filter-admm-{pct}", "structured ADMM (filters)", f"{pct}% filters", "compress", None,
                {"admm": admm_split, "prune": {"sparsity": fraction, "structure": "filter"}}),
        ]
    out += [
        Row("ort-dynamic-int8", "onnxruntime quantize_dynamic", "int8", "ort_dynamic"),
        Row("ort-static-qdq", "onnxruntime quantize_static (QDQ, per-channel)", "int8", "ort_static"),
    ]
    return out


def run_row(row: Row, work: Path, dense: Path, data: dict, args: argparse.Namespace) -> dict:
    """Run one row in this process and return its result dict (accuracy from onnxruntime on test)."""
    from onnx_admm.data import Dataset
    from onnx_admm.validate import validate

    test = Dataset({"input": data["test_x"]}, data["test_y"], {"input"})
    started = time.perf_counter()
    out = work / f"{row.id}.onnx"
    epochs = 0
    structure = None
    if row.kind == "dense":
        out = dense
    elif row.kind == "compress":
        from onnx_admm.api import compress
        from onnx_admm.recipe import CompressConfig

        recipe = {"train": {"batch_size": 128, "lr": 0.01, "threads": args.threads, "device": args.device}, **row.recipe}
        config = CompressConfig.from_dict(recipe)
        train = Dataset({"input": data["train_x"]}, data["train_y"], {"input"})
        result = compress(dense, train, config)
        result.save(out)
        n_stages = len(result.stages)
        epochs = n_stages * (config.admm.epochs + config.admm.retrain_epochs)
        structure = result.report.get("structure")
    elif row.kind == "ort_dynamic":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(dense), str(out), weight_type=QuantType.QInt8)
    elif row.kind == "ort_static":
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.batches = iter([{"input": data["train_x"][i:i + 50]} for i in range(0, 500, 50)])

            def get_next(self):
                return next(self.batches, None)

        quantize_static(str(dense), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
    wall = time.perf_counter() - started
    report = validate(dense, out, test, batch_size=64, threads=1)
    stats = report.compressed
    extra = {}
    if structure:  # onnxruntime latency, measured in the compress run (interleaved, median)
        lat = structure["latency"]
        extra = {"latency_ms_b1": lat["batch_1"]["compressed_ms"], "latency_ms_b64": lat["batch_64"]["compressed_ms"],
                 "dense_latency_ms_b1": lat["batch_1"]["original_ms"],
                 "dense_latency_ms_b64": lat["batch_64"]["original_ms"]}
    return {
        **extra,
        "id": row.id, "method": row.method, "target": row.target,
        "top1": stats.accuracy, "drop_pt": 100 * (report.original.accuracy - stats.accuracy),
        "ratio": report.compression_ratio, "bytes": stats.bytes, "bytes_gzip": stats.gzip_bytes,
        "storage_bits": _storage_bits(out), "epochs": epochs, "wall_s": round(wall, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def _storage_bits(path: Path) -> int | None:
    from onnx_admm.validate import weight_storage_bits

    return weight_storage_bits(path)


# ---------------------------------------------------------------- outputs


def write_outputs(results: list[dict], out: Path, args: argparse.Namespace) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        f"Fashion-MNIST LeNet-5, {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, "
        f"`python samples/lenet5_fashion_mnist/bench.py{' --quick' if args.quick else ''} --epochs {args.epochs}`; "
        "top-1 on the 10,000 test images in onnxruntime.", "",
        "| method | target | top-1 | drop (pt) | ratio | bytes | gzip bytes | storage bits | epochs | wall s | peak MB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        ratio = f"{r['ratio']:.1f}x" if r.get("ratio") else "-"
        lines.append(f"| {r['method']} | {r['target']} | {100 * r['top1']:.2f}% | {r['drop_pt']:.2f} | {ratio} | "
                     f"{r['bytes']:,} | {r['bytes_gzip']:,} | {r['storage_bits'] or '-'} | {r['epochs']} | "
                     f"{r['wall_s']} | {r['peak_rss_mb']} |")
    timed = [r for r in results if "latency_ms_b64" in r]
    if timed:
        lines += ["", "Structured rows, onnxruntime latency (ms per batch, median of interleaved runs):", "",
                  "| method | target | batch 1 | dense batch 1 | speed-up | batch 64 | dense batch 64 | speed-up |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in timed:
            lines.append(f"| {r['method']} | {r['target']} | {r['latency_ms_b1']:.3f} | {r['dense_latency_ms_b1']:.3f} | "
                         f"{r['dense_latency_ms_b1'] / r['latency_ms_b1']:.2f}x | {r['latency_ms_b64']:.2f} | "
                         f"{r['dense_latency_ms_b64']:.2f} | {r['dense_latency_ms_b64'] / r['latency_ms_b64']:.2f}x |")
    (out / "RESULTS.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("matplotlib not installed: no results.png")
        return
    # x: weight-storage reduction (the papers' figure: nonzeros x bits + index bits), so pruned,
    # quantized and joint rows share one axis; rows without a storage figure are left out.
    dense_bits = next((r["storage_bits"] for r in results if r["id"] == "dense"), None)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    by_method: dict[str, list[dict]] = {}
    for r in results:
        if r.get("storage_bits") and dense_bits:
            by_method.setdefault(r["method"], []).append(r)
    for method, points in by_method.items():
        points.sort(key=lambda r: dense_bits / r["storage_bits"])
        ax.plot([dense_bits / p["storage_bits"] for p in points], [100 * p["top1"] for p in points], marker="o",
                label=method)
    ax.set_xscale("log")
    ax.set_xlabel("weight-storage reduction (fp32 bits / nonzeros x bits + index bits)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title("Fashion-MNIST LeNet-5: accuracy vs compression")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "results.png", dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=HERE, help="where results.json/RESULTS.md/results.png go")
    parser.add_argument("--work", type=Path, help="models and scratch (default: OUT/work)")
    parser.add_argument("--only", default="*", help="run rows whose id matches this glob")
    parser.add_argument("--force", action="store_true", help="rerun rows already in results.json")
    parser.add_argument("--quick", action="store_true", help="128 training images, 1 dense epoch, in-process")
    parser.add_argument("--epochs", type=int, default=12, help="total training epochs per pruning row (multiple of 12)")
    parser.add_argument("--dense-epochs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: run one row, print its JSON
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.quick:
        args.dense_epochs = 1
    work = args.work or args.out / "work"
    work.mkdir(parents=True, exist_ok=True)
    data = load_fashion_mnist(args.data_dir)
    if args.quick:
        data = {"train_x": data["train_x"][:QUICK_TRAIN], "train_y": data["train_y"][:QUICK_TRAIN],
                "test_x": data["test_x"][:QUICK_TEST], "test_y": data["test_y"][:QUICK_TEST]}
    dense = train_dense(work, data, args.dense_epochs, args.threads)
    table = {r.id: r for r in rows(args.epochs)}
    if args.row:
        print(json.dumps(run_row(table[args.row], work, dense, data, args)))
        return 0
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() and not args.force else []
    done = {r["id"] for r in results}
    for row in table.values():
        if not fnmatch.fnmatchcase(row.id, args.only) or row.id in done:
            continue
        logger.info("row %s ...", row.id)
        if args.quick:
            result = run_row(row, work, dense, data, args)
        else:
            child = [sys.executable, __file__, "--row", row.id, "--data-dir", str(args.data_dir), "--out", str(args.out),
                     "--work", str(work), "--epochs", str(args.epochs), "--threads", str(args.threads),
                     "--device", args.device, "--dense-epochs", str(args.dense_epochs)]
            proc = subprocess.run(child, check=True, capture_output=True, text=True)
            result = json.loads(proc.stdout.strip().splitlines()[-1])
        results = [r for r in results if r["id"] != row.id] + [result]
        results.sort(key=lambda r: list(table).index(r["id"]) if r["id"] in table else len(table))
        write_outputs(results, args.out, args)  # after every row, so an interrupted run keeps its rows
        logger.info("row %s: top-1 %.4f, ratio %s", row.id, result["top1"], result["ratio"])
    write_outputs(results, args.out, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
