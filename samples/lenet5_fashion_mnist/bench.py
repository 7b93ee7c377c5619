"""Fashion-MNIST LeNet-5 benchmark: every compression method through onnx-admm's Python API, side by side
with the baselines users would pick, evaluated in onnxruntime on the 10,000 test images.

    python samples/lenet5_fashion_mnist/bench.py --epochs 10 --seeds 0 1      # every row (hours on 2 cores)
    python samples/lenet5_fashion_mnist/bench.py --only 'agp-*'               # rows whose id matches
    python samples/lenet5_fashion_mnist/bench.py --train 20000                # a fixed subset of the images
    python samples/lenet5_fashion_mnist/bench.py --quick                      # plumbing check: few images
    python samples/lenet5_fashion_mnist/bench.py --only 'onnxsim-*'           # the onnxsim peer rows

What it does: trains the Caffe LeNet-5 (conv 20 5x5, pool, conv 50 5x5, pool, fc 500, fc 10; 431k
weights) to convergence on Debian's `dataset-fashion-mnist` (24 epochs, one-cycle LR: 92.0%), exports it
with torch's TorchScript exporter (opset 17), then runs each row on that ONNX file. Every training row
gets the same total budget (--epochs, given to compress as `train.epochs`), including the
"dense + E epochs" control, which shows the dense model gains nothing from more training. The test
images are never used for selection: compress selects on a split of the training data. Rows already in
results.json are skipped unless --force; each row runs in a child process, so its wall time and peak
memory are its own. onnxsim's one-shot pruning, block fine-tuning and weight-only quantization run as peer
rows on the same dense file (peers.py; skipped with one line when onnxsim, in the `samples` extra, is not
installed). Outputs (in --out): results.json, RESULTS.md (mean over seeds, half the spread,
per-layer density) and, when matplotlib is installed, results.png.
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
sys.path.insert(0, str(HERE))  # peers.py, beside this file, when bench is loaded by path (the tests)
import peers  # noqa: E402  (onnxsim's rows; it imports onnxsim only when one runs)
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
    """Train the dense LeNet-5 to convergence and export it once; later runs reuse dense.onnx.

    SGD with Nesterov momentum, weight decay 5e-4 and a one-cycle learning rate (peak 0.05), batch 128:
    a schedule that ends annealed, so the dense model is converged and extra epochs no longer help it
    (the "dense + E epochs" row checks this).
    """
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
    return fit_and_export(model, data["train_x"], data["train_y"], epochs, 0.05, 0.15, path)


def fit_and_export(model, x: np.ndarray, y: np.ndarray, epochs: int, peak_lr: float, pct_start: float,
                   path: Path) -> Path:
    """Train ``model`` on (x, y) with SGD (Nesterov momentum 0.9, weight decay 5e-4, batch 128) and a one-cycle
    learning rate peaking at ``peak_lr``, then export it with the TorchScript exporter (dynamic batch) to ``path``
    through a temporary file."""
    import torch
    from torch import nn

    x, y = torch.from_numpy(x), torch.from_numpy(y)
    steps = -(-len(x) // 128)
    optimizer = torch.optim.SGD(model.parameters(), lr=peak_lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, peak_lr, total_steps=max(1, epochs) * steps,
                                                    pct_start=pct_start)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))
        for i in range(0, len(x), 128):
            batch = order[i:i + 128]
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
            scheduler.step()
        logger.info("dense epoch %d done", epoch + 1)
    model.eval()
    tmp = path.with_name(path.stem + ".tmp.onnx")
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
    kind: str  # compress | ort_dynamic | ort_static | dense | dense_plus | onnxsim
    sparsity: float | None = None
    recipe: dict = field(default_factory=dict)


def agp_targets(final: float, steps: int) -> list[float]:
    """Gradual magnitude pruning's cubic schedule s_t = s_f (1 - (1 - t/n)^3), t = 1..n."""
    from onnx_admm.schedule import cubic_stages

    return [round(s, 6) for s in cubic_stages(final, steps)]


TARGETS = (40, 100, 200, 400)


def rows(epochs: float, seeds: tuple[int, ...] = (0,)) -> list[Row]:
    """Every row; every training row gets the same total budget of ``epochs`` epochs (``train.epochs``).

    The baselines spend it on masked retraining (``admm.epochs = 0``): magnitude one-shot (one projection
    to the target, LAMP allocation, then fine-tuning), and gradual magnitude pruning (AGP, 4 cubic steps)
    with global |W| and with LAMP allocation (and AGP-LAMP with the product's refit after each projection, which
    tells the refit's share from ADMM's). ADMM one-shot and progressive (3 stages) and the default
    ``compress`` (stages chosen by the tool) split the same budget themselves. The baselines and the two
    ADMM rows are the literature's methods, without the refit after each projection
    (``prune.reconstruct = false``); the default rows are the product as it ships. Pruning rows run once per
    seed in ``seeds``, and so do the quantized and joint rows. Every compress row trains at the product's default
    learning rate (SGD, batch 128; CompressConfig.lr: 0.02 for pruning, recipe.PRUNE_LR, 0.01 for levels alone,
    0.03 for binary weights), except the ``-lr01`` rows of the default and AGP-LAMP, which prune at 0.01 (the
    product's pruning default before PRUNE_LR).
    """
    out = [Row("dense", "dense fp32", "1x", "dense"), Row("dense-plus", f"dense + {epochs:g} epochs (control)", "1x",
                                                        "dense_plus")]
    for ratio in TARGETS:
        s = 1 - 1 / ratio
        agp = agp_targets(s, 4)
        plain = {"reconstruct": False}
        methods = [
            ("magnitude", "magnitude one-shot + fine-tune",
             {"admm": {"epochs": 0}, "prune": {"sparsity": s, "stages": 1, **plain}}),
            ("agp-global", "AGP (4 steps), global magnitude",
             {"admm": {"epochs": 0}, "prune": {"sparsity": s, "targets": agp, "allocation": "global", **plain}}),
            ("agp-lamp", "AGP (4 steps), LAMP", {"admm": {"epochs": 0}, "prune": {"sparsity": s, "targets": agp, **plain}}),
            ("agp-lamp-lr01", "AGP (4 steps), LAMP, lr 0.01",
             {"admm": {"epochs": 0}, "prune": {"sparsity": s, "targets": agp, **plain}, "train": {"lr": 0.01}}),
            ("agp-lamp-refit", "AGP (4 steps), LAMP + refit",
             {"admm": {"epochs": 0}, "prune": {"sparsity": s, "targets": agp}}),
            ("admm-oneshot", "ADMM one-shot", {"prune": {"sparsity": s, "stages": 1, **plain}}),
            ("admm-progressive", "ADMM progressive (3 stages)", {"prune": {"sparsity": s, "stages": 3, **plain}}),
            ("default", "onnx-admm default", {"prune": {"sparsity": s}}),
            ("default-lr01", "onnx-admm default, lr 0.01", {"prune": {"sparsity": s}, "train": {"lr": 0.01}}),
            ("default-plain", "onnx-admm default without the refit", {"prune": {"sparsity": s, **plain}}),
            ("default-global", "onnx-admm default, global magnitude allocation",
             {"prune": {"sparsity": s, "allocation": "global"}}),
            ("default-sensitivity", "onnx-admm default, sensitivity allocation",
             {"prune": {"sparsity": s, "allocation": "sensitivity"}}),
        ]
        # several seeds where the issue asks for a spread (40x-200x); one at 400x, to save time
        for seed in (seeds if ratio != TARGETS[-1] else seeds[:1]):
            for key, method, recipe in methods:
                out.append(Row(f"{key}-{ratio}x-s{seed}", method, f"{ratio}x", "compress", s,
                               {**recipe, "train": {**recipe.get("train", {}), "seed": seed}}))
    for seed in seeds:
        for name, quant in (("binary", {"bits": 1}), ("ternary", {"ternary": True}), ("2bit", {"bits": 2}),
                            ("4bit", {"bits": 4})):
            out.append(Row(f"quant-{name}-s{seed}", f"ADMM quantization ({name}, every layer)", name, "compress", None,
                           {"prune": {"stages": 1}, "quantize": {**quant, "per_channel": True},
                            "train": {"seed": seed}}))
        for ratio, bits in ((40, 4), (100, 2)):
            s = 1 - 1 / ratio
            out.append(Row(f"joint-{ratio}x-{bits}bit-s{seed}", f"ADMM pruning + {bits}-bit", f"{ratio}x+{bits}bit",
                           "compress", s, {"prune": {"sparsity": s}, "quantize": {"bits": bits, "per_channel": True},
                                           "train": {"seed": seed}}))
        # The 40x row's nonzeros on a k-means codebook of 15 values (with zero, 16: 4-bit indices, non-uniform
        # levels) instead of the uniform 4-bit grid: pruning + weight sharing, as Deep Compression stores layers.
        out.append(Row(f"joint-40x-c15-s{seed}", "ADMM pruning + 15 clusters (4-bit indices)", "40x+c15", "compress",
                       1 - 1 / 40, {"prune": {"sparsity": 1 - 1 / 40}, "quantize": {"clusters": 15},
                                    "train": {"seed": seed}}))
        # Ternary with a level of its own on each side ({-a, 0, +b}, as trained ternary quantization has it): half
        # of each layer's weights pruned, the rest on a 2-value k-means codebook (2-bit indices, as int2 ternary).
        out.append(Row(f"ternary-c2-s{seed}", "ADMM 50% pruning per layer + 2 clusters (asymmetric ternary)",
                       "ternary-c2", "compress", 0.5, {"prune": {"sparsity": 0.5, "allocation": "uniform", "stages": 1},
                                                       "quantize": {"clusters": 2}, "train": {"seed": seed}}))
        # The same levels with one scale per tensor (--per-tensor; the product's default for ternary levels).
        for name, quant, s in (("binary", {"bits": 1}, None), ("ternary", {"ternary": True}, None),
                               ("4bit", {"bits": 4}, None), ("40x-4bit", {"bits": 4}, 1 - 1 / 40)):
            prune = {"sparsity": s} if s is not None else {"stages": 1}
            out.append(Row(f"tensor-{name}-s{seed}", f"{name}, one scale per tensor",
                           name.replace("-4bit", "+4bit"), "compress", s, {"prune": prune, "quantize": quant,
                                                                            "train": {"seed": seed}}))
    out += [
        Row("ort-dynamic-int8", "onnxruntime quantize_dynamic", "int8", "ort_dynamic"),
        Row("ort-static-qdq", "onnxruntime quantize_static (QDQ, per-channel)", "int8", "ort_static"),
    ]
    return out + onnxsim_rows()


def onnxsim_rows() -> list[Row]:
    """The peer: onnxsim 0.8 on the same dense file (peers.py). Its weight-only INT8 and INT4, then its one-shot
    global pruning (Wanda, magnitude) at 40x, 100x and 200x, then the same with its block fine-tuning (the
    slow rows last, so a short run lands the cheap ones first). Skipped when onnxsim is not installed."""
    out = [Row(f"onnxsim-{bits}", f"onnxsim weight-only {bits.upper()}", bits, "onnxsim", None, {"quantize": bits})
           for bits in ("int8", "int4")]
    for finetune in (False, True):
        for ratio in TARGETS[:-1]:
            for score in peers.PRUNE_SCORES:
                method = f"onnxsim {score} global one-shot" + (" + block fine-tuning" if finetune else "")
                out.append(Row(f"onnxsim-{score}{'-ft' if finetune else ''}-{ratio}x", method, f"{ratio}x", "onnxsim",
                               1 - 1 / ratio, {"prune": score, "finetune": finetune}))
    return out


def train_subset(data: dict, n: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The training images every row sees: all of them, or a fixed seeded subset of ``n``."""
    if n is None or n >= len(data["train_x"]):
        return data["train_x"], data["train_y"]
    pick = np.sort(np.random.default_rng(123).permutation(len(data["train_x"]))[:n])
    return data["train_x"][pick], data["train_y"][pick]


def dense_plus(dense: Path, out: Path, x: np.ndarray, y: np.ndarray, epochs: float, threads: int) -> None:
    """The control row: the dense model trained ``epochs`` more epochs as the compress rows train (SGD lr 0.01,
    momentum 0.9, batch 128, cosine to 0), nothing pruned; written back into the same graph."""
    import torch

    from onnx_admm.converters.importer import import_model
    from onnx_admm.converters.modelio import load_model, save_model
    from onnx_admm.converters.writeback import write_back

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    imported = import_model(load_model(dense))
    module = imported.module.train()
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    steps = max(1, round(epochs * -(-len(x) // 128)))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    done = 0
    while done < steps:
        order = torch.randperm(len(xt), generator=torch.Generator().manual_seed(done))
        for i in range(0, len(xt), 128):
            if done == steps:
                break
            batch = order[i:i + 128]
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(module(xt[batch])[0], yt[batch]).backward()
            optimizer.step()
            scheduler.step()
            done += 1
    save_model(write_back(imported.original, imported.updates()).model, out)


def run_row(row: Row, work: Path, dense: Path, data: dict, args: argparse.Namespace) -> dict:
    """Run one row in this process and return its result dict (accuracy from onnxruntime on test)."""
    from onnx_admm.data import Dataset
    from onnx_admm.validate import validate

    test = Dataset({"input": data["test_x"]}, data["test_y"], {"input"})
    started = time.perf_counter()
    out = work / f"{row.id}.onnx"
    epochs = 0
    structure = None
    density = None
    extra_info: dict = {}
    compress_peak = 0.0
    x, y = train_subset(data, args.train)
    if row.kind == "dense":
        out = dense
    elif row.kind == "dense_plus":
        dense_plus(dense, out, x, y, args.epochs, args.threads)
        epochs = args.epochs
    elif row.kind == "compress":
        from onnx_admm.api import compress
        from onnx_admm.converters.modelio import save_json
        from onnx_admm.recipe import CompressConfig

        recipe = {**row.recipe, "train": {"batch_size": 128, "threads": args.threads, "device": args.device,
                                          "epochs": args.epochs, **row.recipe.get("train", {})}}
        config = CompressConfig.from_dict(recipe)
        train = Dataset({"input": x}, y, {"input"})
        result = compress(dense, train, config, metric_floor=0)  # a row records its figure, even a failing one
        result.save(out)
        # The run's JSON report beside the model: per-stage choices (reconstruction.select_metric) for later study.
        save_json(result.report, out.with_suffix(".report.json"))
        epochs = sum(v for stage in result.stages for v in stage.epochs.values())
        structure = result.report.get("structure")
        density = {layer["name"]: round(1 - layer["sparsity"], 5) for layer in result.report["layers"]}
        stages = len(result.stages)
        extra_info = {"lr": config.lr}  # the product's default for the row, or the row's own
        # compress resets the kernel's peak at each phase (onnx_admm.memory): its report has the run's peak.
        compress_peak = result.report["peak_rss_mb"]
    elif row.kind == "onnxsim":
        info = peers.run(row.recipe, row.sparsity, dense, out, x, steps=2 if args.quick else peers.FINETUNE_STEPS)
        density = info.pop("density", None)
        epochs = info.pop("epochs", 0)
        stages = 1
        extra_info = info
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
    # --quick checks the plumbing: two timed runs a model instead of twenty.
    report = validate(dense, out, test, batch_size=64, threads=1, latency_batches=2 if args.quick else 20)
    stats = report.compressed
    extra = {}
    if structure:  # onnxruntime latency, measured in the compress run (interleaved, median)
        lat = structure["latency"]
        extra = {"latency_ms_b1": lat["batch_1"]["compressed_ms"], "latency_ms_b64": lat["batch_64"]["compressed_ms"],
                 "dense_latency_ms_b1": lat["batch_1"]["original_ms"],
                 "dense_latency_ms_b64": lat["batch_64"]["original_ms"]}
    if density is not None:
        extra.update(density=density, stages=stages)
    return {
        **extra, **extra_info,
        "id": row.id, "method": row.method, "target": row.target,
        "top1": stats.accuracy, "drop_pt": 100 * (report.original.accuracy - stats.accuracy),
        "ratio": report.compression_ratio, "bytes": stats.bytes, "bytes_gzip": stats.gzip_bytes,
        "storage_bits": _storage_bits(out), "epochs": epochs, "wall_s": round(wall, 1),
        "peak_rss_mb": round(max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, compress_peak), 1),
    }


def _storage_bits(path: Path) -> int | None:
    from onnx_admm.storage import weight_storage_bits

    return weight_storage_bits(path)


# ---------------------------------------------------------------- outputs


def aggregate(results: list[dict]) -> list[dict]:
    """One line per (method, target): mean top-1 over seeds, half the spread, per-layer density of seed 0."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        groups.setdefault((r["method"], r["target"]), []).append(r)
    out = []
    for (method, target), members in groups.items():
        top1 = [m["top1"] for m in members]
        first = members[0]
        out.append({**first, "top1": sum(top1) / len(top1), "spread": (max(top1) - min(top1)) / 2,
                    "n": len(members), "drop_pt": sum(m["drop_pt"] for m in members) / len(members)})
    return out


def write_outputs(results: list[dict], out: Path, args: argparse.Namespace, plot: bool = True) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    subset = f", {args.train} training images" if args.train else ""
    lines = [
        f"Fashion-MNIST LeNet-5, {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, "
        f"`python samples/lenet5_fashion_mnist/bench.py{' --quick' if args.quick else ''} --epochs {args.epochs:g}"
        f"{' --train ' + str(args.train) if args.train else ''} --seeds {' '.join(map(str, args.seeds))}`"
        f"{subset}; every training row {args.epochs:g} epochs; top-1 on the 10,000 test images in onnxruntime "
        "(mean over seeds, +- half the spread); no row selects on them.", "",
        "| method | target | top-1 | drop (pt) | seeds | kept per layer (conv1, conv2, fc1, fc2) | ratio | gzip bytes | "
        "storage bits | wall s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in aggregate(results):
        ratio = f"{r['ratio']:.1f}x" if r.get("ratio") else "-"
        spread = f" +- {100 * r['spread']:.2f}" if r["n"] > 1 else ""
        density = ", ".join(f"{100 * v:.3g}%" for v in r["density"].values()) if r.get("density") else "-"
        lines.append(f"| {r['method']} | {r['target']} | {100 * r['top1']:.2f}%{spread} | {r['drop_pt']:.2f} | {r['n']} | "
                     f"{density} | {ratio} | {r['bytes_gzip']:,} | {r['storage_bits'] or '-'} | {r['wall_s']} |")
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
    if not plot:
        return
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
    for r in aggregate(results):
        if r.get("storage_bits") and dense_bits and r["id"] != "dense-plus":
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


def select_rows(table, pattern: str, done: set[str]) -> list[Row]:
    """The rows to run: those whose id matches ``pattern`` and is not in ``done``; onnxsim's rows only when it
    imports (one line says so otherwise, so a run without the extra still completes)."""
    todo = [row for row in table if fnmatch.fnmatchcase(row.id, pattern) and row.id not in done]
    peer = [row for row in todo if row.kind == "onnxsim"]
    if peer and not peers.available():
        logger.warning("%s (%d rows)", peers.NOTE, len(peer))
        todo = [row for row in todo if row.kind != "onnxsim"]
    return todo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=HERE, help="where results.json/RESULTS.md/results.png go")
    parser.add_argument("--work", type=Path, help="models and scratch (default: OUT/work)")
    parser.add_argument("--only", default="*", help="run rows whose id matches this glob")
    parser.add_argument("--force", action="store_true", help="rerun rows already in results.json")
    parser.add_argument("--quick", action="store_true", help="128 training images, 1 dense epoch, in-process")
    parser.add_argument("--epochs", type=float, default=10, help="total training epochs of every training row")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds of the pruning rows")
    parser.add_argument("--train", type=int, help="train on a fixed seeded subset of this many images (default: all)")
    parser.add_argument("--dense-epochs", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: run one row, print its JSON
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.quick:
        args.dense_epochs, args.epochs = 1, 1
    work = args.work or args.out / "work"
    work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    data = load_fashion_mnist(args.data_dir)
    if args.quick:
        data = {"train_x": data["train_x"][:QUICK_TRAIN], "train_y": data["train_y"][:QUICK_TRAIN],
                "test_x": data["test_x"][:QUICK_TEST], "test_y": data["test_y"][:QUICK_TEST]}
    dense = train_dense(work, data, args.dense_epochs, args.threads)
    table = {r.id: r for r in rows(args.epochs, tuple(args.seeds))}
    if args.row:
        print(json.dumps(run_row(table[args.row], work, dense, data, args)))
        return 0
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() and not args.force else []
    for row in select_rows(table.values(), args.only, {r["id"] for r in results}):
        logger.info("row %s ...", row.id)
        if args.quick:
            result = run_row(row, work, dense, data, args)
        else:
            child = [sys.executable, __file__, "--row", row.id, "--data-dir", str(args.data_dir), "--out", str(args.out),
                     "--work", str(work), "--epochs", str(args.epochs), "--threads", str(args.threads),
                     "--seeds", *map(str, args.seeds), *(["--train", str(args.train)] if args.train else []),
                     "--device", args.device, "--dense-epochs", str(args.dense_epochs)]
            proc = subprocess.run(child, check=True, capture_output=True, text=True)
            result = json.loads(proc.stdout.strip().splitlines()[-1])
        results = [r for r in results if r["id"] != row.id] + [result]
        results.sort(key=lambda r: list(table).index(r["id"]) if r["id"] in table else len(table))
        # after every row, so an interrupted run keeps its rows (--quick draws the figure once, at the end: a
        # drawing costs more than a quick row)
        write_outputs(results, args.out, args, plot=not args.quick)
        logger.info("row %s: top-1 %.4f, ratio %s", row.id, result["top1"], result["ratio"])
    write_outputs(results, args.out, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
