"""Build the bundled digits sample: a small CNN trained on scikit-learn's digits, exported to ONNX.

Writes, next to this file:
- ``model.onnx``: TorchScript exporter, opset 17, input ``input`` float32 [N, 1, 8, 8] in [0, 1],
  output ``logits`` float32 [N, 10], dynamic batch.
- ``train.npz`` / ``test.npz``: keys ``input`` (float32 [N, 1, 8, 8]) and ``labels`` (int64 [N]); a
  stratified 80/20 split with seed 0. Compressed npz, since the pixels are multiples of 1/16.

Everything is seeded, and scikit-learn bundles the data, so a rerun needs no network and gives the
same split (and, on the same torch build, the same weights). Run: ``python samples/digits/make_sample.py``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

HERE = Path(__file__).resolve().parent
SEED = 0
EPOCHS = 40
BATCH = 64


def make_model() -> nn.Module:
    """conv 16 3x3 → relu → conv 32 3x3 → relu → flatten → fc 64 → relu → fc 10 (38k weights)."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def load_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The digits as float32 [N, 1, 8, 8] in [0, 1] with int64 labels: train and test (80/20, seed 0)."""
    digits = load_digits()
    # Pixels are integers 0..16 in the bundled data.
    images = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    labels = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=0.2, random_state=SEED, stratify=labels
    )
    return x_train, y_train, x_test, y_test


def train(model: nn.Module, x: np.ndarray, y: np.ndarray) -> None:
    """Adam with a cosine schedule; a few seconds on two cores."""
    generator = torch.Generator().manual_seed(SEED)
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    steps = EPOCHS * -(-len(xs) // BATCH)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    model.train()
    for _ in range(EPOCHS):
        order = torch.randperm(len(xs), generator=generator)
        for start in range(0, len(xs), BATCH):
            batch = order[start : start + BATCH]
            loss = nn.functional.cross_entropy(model(xs[batch]), ys[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    model.eval()


def export(model: nn.Module, path: Path) -> None:
    """TorchScript exporter, opset 17 (what onnx2torch reads as is), batch axis dynamic."""
    with warnings.catch_warnings():
        # The legacy-exporter DeprecationWarning: opset 17 and one self-contained file are wanted here.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (torch.zeros(2, 1, 8, 8),),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
        )


def onnx_accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of the exported file in onnxruntime (the number the README quotes)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"input": x})
    return float((logits.argmax(axis=1) == y).mean())


def main() -> None:
    torch.manual_seed(SEED)
    x_train, y_train, x_test, y_test = load_split()
    model = make_model()
    train(model, x_train, y_train)
    export(model, HERE / "model.onnx")
    np.savez_compressed(HERE / "train.npz", input=x_train, labels=y_train)
    np.savez_compressed(HERE / "test.npz", input=x_test, labels=y_test)
    print(f"train {len(y_train)}, test {len(y_test)}")
    print(f"onnxruntime accuracy: train {onnx_accuracy(HERE / 'model.onnx', x_train, y_train):.4f}, "
          f"test {onnx_accuracy(HERE / 'model.onnx', x_test, y_test):.4f}")
    for name in ("model.onnx", "train.npz", "test.npz"):
        print(f"{name}: {(HERE / name).stat().st_size} bytes")


if __name__ == "__main__":
    main()
