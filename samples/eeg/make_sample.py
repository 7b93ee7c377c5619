"""A 1-D EEG event detector of the shape issue 22 reported, and random data for it (the memory benchmark).

The model (``EEGDetector``): two inputs ``signal`` and ``spectrum``, each float32 [N, 15, L] (L = 7,500
samples by default); a stem per input, four dilated 1-D convs at full length, a strided encoder down
to L / 250 positions with a detection head (Linear, [N, L / 250, 3] event logits: 30 at L = 7,500) and
a ConvTranspose decoder back to full length with a Sigmoid segmentation map [N, L, 1]. TorchScript
exporter, opset 17, dynamic batch. 148k weights at the default width 32 (579k at 64, the README's
figures): small on disk, large in activations (every full-length layer holds 2 x width x L floats per
sample), which is what the issue was about.

The data are random (seeded): only memory and time are measured on them, so no labels (the original
model is the teacher). ``train.npz`` is written uncompressed, so its members can be memory-mapped.

Run: ``python samples/eeg/make_sample.py [--out DIR] [--samples 256] [--length 7500]``; then, e.g.
``onnx-admm compress DIR/model.onnx --data DIR/train.npz --sparsity 0.5 --admm-epochs 1 --retrain-epochs 1
-o DIR/out.onnx --report DIR/report.json`` and ``onnx-admm validate DIR/model.onnx DIR/out.onnx --data
DIR/train.npz``. The tests build a short version (``tests/test_memory.py``).
"""

from __future__ import annotations

import argparse
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
INPUTS = ("signal", "spectrum")
OUTPUTS = ("detection", "segmentation")
CHANNELS = 15
# The encoder's strides: L / 250 detection positions (30 at 7,500 samples).
STRIDES = (5, 5, 10)


class EEGDetector(nn.Module):
    """Two stems, dilated convs at full length, a strided encoder with a detection head, a ConvTranspose
    decoder with a segmentation head."""

    def __init__(self, width: int = 32, events: int = 3) -> None:
        super().__init__()
        self.stem_signal = nn.Conv1d(CHANNELS, width, 7, padding=3)
        self.stem_spectrum = nn.Conv1d(CHANNELS, width, 7, padding=3)
        wide = 2 * width
        self.dilated = nn.ModuleList(nn.Conv1d(wide, wide, 3, padding=d, dilation=d) for d in (1, 2, 4, 8))
        self.down = nn.ModuleList(nn.Conv1d(wide, wide, s, stride=s) for s in STRIDES)
        self.detect = nn.Linear(wide, events)
        self.up = nn.ConvTranspose1d(wide, width, STRIDES[0], stride=STRIDES[0])
        self.segment = nn.Conv1d(width, 1, 1)

    def forward(self, signal: torch.Tensor, spectrum: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([torch.relu(self.stem_signal(signal)), torch.relu(self.stem_spectrum(spectrum))], dim=1)
        for conv in self.dilated:
            x = x + torch.relu(conv(x))
        skip = x
        for k, conv in enumerate(self.down):
            x = torch.relu(conv(x))
            if k == 0:
                coarse = x
        detection = self.detect(x.transpose(1, 2))  # [N, L / 250, events]
        up = torch.relu(self.up(coarse)) + skip[:, : self.up.out_channels]
        segmentation = torch.sigmoid(self.segment(up)).transpose(1, 2)  # [N, L, 1]
        return detection, segmentation


def export(path: Path, length: int = 7500, width: int = 32, seed: int = 0) -> Path:
    """Write a seeded ``EEGDetector`` for inputs of ``length`` samples (a multiple of 250) to ``path``."""
    if length % 250:
        raise ValueError(f"length must be a multiple of 250, got {length}")
    torch.manual_seed(seed)
    module = EEGDetector(width).eval()
    example = tuple(torch.randn(2, CHANNELS, length) for _ in INPUTS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy TorchScript exporter, on purpose
        torch.onnx.export(module, example, str(path), dynamo=False, opset_version=17, input_names=list(INPUTS),
                          output_names=list(OUTPUTS), dynamic_axes={n: {0: "N"} for n in (*INPUTS, *OUTPUTS)})
    return path


def make_data(path: Path, samples: int = 256, length: int = 7500, seed: int = 0) -> Path:
    """Seeded float32 inputs (an uncompressed .npz, so each member can be memory-mapped), no labels."""
    rng = np.random.default_rng(seed)
    arrays = {name: rng.standard_normal((samples, CHANNELS, length), dtype=np.float32) for name in INPUTS}
    np.savez(path, **arrays)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--length", type=int, default=7500)
    parser.add_argument("--width", type=int, default=32)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    model = export(args.out / "model.onnx", args.length, args.width)
    data = make_data(args.out / "train.npz", args.samples, args.length)
    logger.info("wrote %s and %s", model, data)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    raise SystemExit(main())
