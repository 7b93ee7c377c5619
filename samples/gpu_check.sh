#!/usr/bin/env bash
# GPU check: the digits sample compressed on the CPU, on one GPU and (with two GPUs) on two under torchrun;
# prints each run's epoch time and throughput and the speed-up over the CPU.
#
#   bash samples/gpu_check.sh [WORK]          # WORK: where models and reports go (default: a temporary folder)
#
# Environment: CPU_THREADS (default 2: the CPU row is a 2-core machine's), RECIPE (default the digits
# recipe), GPU_CHECK_DRY_RUN=1 runs every row on the CPU (the GPU rows with --device cpu, torchrun with gloo)
# to check this script itself on a machine without a GPU.
# Exit status: 0 when every run passed; 1 when no CUDA GPU is visible (nothing is run) or a run failed.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DIGITS="$HERE/digits"
WORK="${1:-$(mktemp -d)}"
CPU_THREADS="${CPU_THREADS:-2}"
RECIPE="${RECIPE:-$DIGITS/recipe.toml}"
PYTHON="${PYTHON:-python}"
mkdir -p "$WORK"

gpus=$("$PYTHON" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
device=cuda
if [[ "${GPU_CHECK_DRY_RUN:-0}" == 1 ]]; then
    echo "gpu_check: dry run: every row on the CPU" >&2
    gpus=2
    device=cpu
elif [[ "$gpus" == 0 ]]; then
    echo "gpu_check: no CUDA GPU visible to torch ($("$PYTHON" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)")); run this on a machine with a GPU (or set GPU_CHECK_DRY_RUN=1 to check the script on the CPU)" >&2
    exit 1
fi

# One compress run: NAME, then the command's prefix (python -m, or torchrun ...), then extra flags.
run() {
    local name="$1" launcher="$2"
    shift 2
    echo "gpu_check: $name" >&2
    # shellcheck disable=SC2086  # the launcher is several words on purpose
    $launcher onnx_admm.cli compress "$DIGITS/model.onnx" --data "$DIGITS/train.npz" --val-data "$DIGITS/test.npz" \
        --recipe "$RECIPE" -o "$WORK/$name.onnx" --report "$WORK/$name.json" -q "$@"
}

run cpu "$PYTHON -m" --device cpu --threads "$CPU_THREADS"
run gpu "$PYTHON -m" --device "$device" --threads "$CPU_THREADS"
names=(cpu gpu)
if [[ "$gpus" -ge 2 ]]; then
    # Half the batch per process keeps the recipe's global batch (README "Several processes").
    batch=$("$PYTHON" -c "import sys, tomllib; print(tomllib.load(open(sys.argv[1], 'rb')).get('train', {}).get('batch_size', 64) // 2)" "$RECIPE")
    run gpu2 "$PYTHON -m torch.distributed.run --standalone --nproc-per-node 2 -m" --device "$device" \
        --threads "$CPU_THREADS" --batch-size "$batch"
    names+=(gpu2)
else
    echo "gpu_check: one GPU: no 2-process row" >&2
fi

"$PYTHON" - "$WORK" "${names[@]}" <<'EOF'
"""The rows: epoch seconds (mean over every training epoch in the report), samples per second, speed-up."""
import json
import sys
from pathlib import Path

work, names = Path(sys.argv[1]), sys.argv[2:]
rows = {}
for name in names:
    report = json.loads((work / f"{name}.json").read_text())
    epochs = [e for stage in report["stages"] for e in stage["history"]]
    seconds = sum(e["seconds"] for e in epochs)
    samples = sum(e["samples"] for e in epochs) * report["distributed"]["world_size"]
    metrics = report["metrics"]  # top-1 with labels (the digits have them), else the task metric
    top1 = metrics["compressed_accuracy"] if metrics["compressed_accuracy"] is not None else metrics["task"]["value"]
    rows[name] = (seconds / len(epochs), samples / seconds, top1, report["compression_ratio"])
base = rows["cpu"][1]
print(f"{'run':6} {'epoch s':>8} {'samples/s':>10} {'speed-up':>9} {'top-1':>7} {'ratio':>6}")
for name, (epoch, rate, top1, ratio) in rows.items():
    print(f"{name:6} {epoch:8.3f} {rate:10.0f} {rate / base:8.2f}x {top1:7.4f} {ratio:5.1f}x")
EOF
