"""Corpus models whose first nodes have no torch converter and need no gradient, so the imported module runs them
in onnxruntime (onnx_admm/converters/ort_nodes.py):

- ``audio_stft``: a sound classifier that computes its own spectrogram with ``torch.stft`` (an ``STFT`` node,
  exported by the dynamo exporter), then two Conv1d, a mean over time and a Linear; trained here on synthetic
  clips of four kinds (the dominant tone in one of four frequency bands, a weaker tone elsewhere, noise).
- ``sklearn_columns``: a scikit-learn ``ColumnTransformer`` (StandardScaler on the upper half of the digits'
  pixels, OneHotEncoder on the lower half's 17 grey levels) + MLP, written by skl2onnx: ArrayFeatureExtractor,
  Scaler, OneHotEncoder and Concat come ahead of the network.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

RATE, SAMPLES = 8000, 4096  # half a second at 8 kHz
BANDS = ((200.0, 500.0), (600.0, 1000.0), (1200.0, 1800.0), (2000.0, 3000.0))


def make_clips(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` clips [n, SAMPLES] (float32) and their kinds: the band of the loudest tone."""
    rng = np.random.default_rng(seed)
    t = np.arange(SAMPLES) / RATE
    kinds = rng.integers(0, len(BANDS), n)
    clips = 0.3 * rng.standard_normal((n, SAMPLES))
    for i, kind in enumerate(kinds):
        other = (kind + rng.integers(1, len(BANDS))) % len(BANDS)
        for band, amplitude in ((kind, 1.0), (other, rng.uniform(0.3, 0.7))):
            frequency = rng.uniform(*BANDS[band])
            clips[i] += amplitude * np.sin(2 * np.pi * frequency * t + rng.uniform(0, 2 * np.pi))
    return (clips * rng.uniform(0.2, 1.0, (n, 1))).astype(np.float32), kinds.astype(np.int64)


class SpectrogramClassifier(nn.Module):
    """log(1 + |STFT|^2) over 129 bins -> Conv1d 32 -> Conv1d 32 -> mean over time -> Linear to the 4 kinds."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("window", torch.hann_window(256))
        self.body = nn.Sequential(nn.Conv1d(129, 32, 3), nn.ReLU(), nn.Conv1d(32, 32, 3), nn.ReLU())
        self.head = nn.Linear(32, len(BANDS))

    def forward(self, wave: torch.Tensor) -> torch.Tensor:  # noqa: D102
        spec = torch.stft(wave, n_fft=256, hop_length=128, window=self.window, return_complex=False)
        power = torch.log1p((spec ** 2).sum(-1))
        return self.head(self.body(power).mean(-1))


def build_audio(path: Path, steps: int = 300, seed: int = 0) -> Path:
    """Train ``SpectrogramClassifier`` (Adam, batch 32) on 2,048 clips of seed ``seed``; export with dynamo."""
    torch.manual_seed(seed)
    model = SpectrogramClassifier()
    clips, kinds = (torch.from_numpy(a) for a in make_clips(2048, seed))
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(clips), (32,), generator=g)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(clips[idx]), kinds[idx]).backward()
        optimizer.step()
    model.eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (clips[:2],), str(path), dynamo=True, input_names=["wave"], output_names=["logits"],
                          dynamic_shapes=({0: torch.export.Dim("N")},), verbose=False)
    return path


def build_columns(path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """The ColumnTransformer pipeline trained on the first 1,400 digits; returns all 1,797 and their labels."""
    from skl2onnx import to_onnx
    from sklearn.compose import ColumnTransformer
    from sklearn.datasets import load_digits
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32)
    columns = ColumnTransformer([("scaled", StandardScaler(), list(range(32))),
                                 ("levels", OneHotEncoder(handle_unknown="ignore"), list(range(32, 64)))])
    pipe = make_pipeline(columns, MLPClassifier(hidden_layer_sizes=(32,), max_iter=100, random_state=0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        pipe.fit(x[:1400], y[:1400])
    path.write_bytes(to_onnx(pipe, x[:1], options={"zipmap": False},
                             target_opset={"": 17, "ai.onnx.ml": 3}).SerializeToString())
    return path, x, y
