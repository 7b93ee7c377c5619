"""A voice-activity model laid out as silero-VAD v5's ONNX file is, trained here on synthetic audio.

``vad_if``: inputs ``input`` [N, 576] (64 samples of context + a 512-sample frame at 16 kHz; 32 + 256 at
8 kHz), ``state`` [2, N, 64] (the LSTM's h and c, samples on axis 1) and ``sr`` (an int64 scalar); outputs
``output`` [N, 1] (the probability of speech, a Sigmoid) and ``stateN`` [2, N, 64]. A TorchScript-scripted
``if sr == 16000`` chooses between two whole networks (each: an STFT as a Conv1d with a fixed basis, a
magnitude, three Conv1d + ReLU, an LSTMCell, a 1x1 Conv1d and a Sigmoid), so the export is one If whose
branches compute everything. Like silero's file, each branch holds its own weights as Constant nodes named
``If_0_then_branch__Inline_0__<parameter>`` (the export leaves them as initializers of the top graph; the
builder moves them), and the LSTM's W, R and B are Unsqueeze / Slice / Concat of those constants inside the
branch, computed at run time.

Audio: "speech" frames are noise shaped by a slow envelope plus two to four harmonics of a 100-250 Hz
pitch; "silence" frames are low noise with, in a third of them, a steady hum. Each network is trained for its
sample rate (Adam, a few hundred steps, seconds), and both ship in the one file; the builder's inputs are
16 kHz frames of both kinds with a zero state, as a user running silero would feed it.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

FRAMES = {16000: (512, 64), 8000: (256, 32)}  # samples per frame, samples of context
HIDDEN = 64


def make_audio(n: int, rate: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` frames with their context [n, frame + context] (float32 in [-1, 1]) and labels (1: speech)."""
    frame, context = FRAMES[rate]
    rng = np.random.default_rng(seed)
    t = np.arange(frame + context) / rate
    x = np.zeros((n, frame + context), np.float32)
    labels = rng.integers(0, 2, n)
    for i in range(n):
        if labels[i]:
            pitch = rng.uniform(100, 250)
            envelope = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(2, 6) * t + rng.uniform(0, 6.3))
            voiced = sum(rng.uniform(0.1, 0.3) / k * np.sin(2 * np.pi * k * pitch * t + rng.uniform(0, 6.3))
                         for k in range(1, int(rng.integers(3, 6))))
            x[i] = envelope * (voiced + rng.uniform(0.05, 0.2) * rng.standard_normal(len(t)))
        else:
            x[i] = rng.uniform(0.002, 0.03) * rng.standard_normal(len(t))
            if rng.random() < 1 / 3:
                x[i] += rng.uniform(0.02, 0.08) * np.sin(2 * np.pi * rng.choice([50.0, 60.0]) * t)
    return np.clip(x, -1, 1).astype(np.float32), labels


class Branch(nn.Module):
    """One sample rate's network."""

    def __init__(self, n_fft: int, width: int = 32) -> None:
        super().__init__()
        self.n_fft = n_fft
        bins = n_fft // 2 + 1
        k = np.arange(n_fft)
        f = np.arange(bins)[:, None]
        window = np.hanning(n_fft)
        basis = np.concatenate([np.cos(2 * np.pi * f * k / n_fft), -np.sin(2 * np.pi * f * k / n_fft)]) * window
        self.register_buffer("forward_basis_buffer", torch.tensor(basis[:, None, :], dtype=torch.float32))
        self.encoder = nn.Sequential(nn.Conv1d(bins, width, 3, padding=1), nn.ReLU(),
                                     nn.Conv1d(width, width, 3, stride=2, padding=1), nn.ReLU(),
                                     nn.Conv1d(width, HIDDEN, 3, stride=2, padding=1), nn.ReLU())
        self.rnn = nn.LSTMCell(HIDDEN, HIDDEN)
        self.decoder = nn.Sequential(nn.ReLU(), nn.Conv1d(HIDDEN, 1, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = nn.functional.pad(x.unsqueeze(1), (0, self.n_fft // 4), mode="reflect")
        x = nn.functional.conv1d(x, self.forward_basis_buffer, stride=self.n_fft // 2)
        cutoff = self.n_fft // 2 + 1
        magnitude = torch.sqrt(x[:, :cutoff] ** 2 + x[:, cutoff:] ** 2 + 1e-9)
        h = self.encoder(torch.log1p(magnitude)).mean(dim=2)
        hn, cn = self.rnn(h, (state[0], state[1]))
        out = self.decoder(hn.unsqueeze(-1)).squeeze(-1)
        return out, torch.stack([hn, cn])


class VadLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self._model = Branch(256)
        self._model_8k = Branch(128)

    def forward(self, x: torch.Tensor, state: torch.Tensor, sr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if bool(sr == 16000):
            out, new_state = self._model(x, state)
        else:
            out, new_state = self._model_8k(x, state)
        return out, new_state


def _fit(branch: Branch, rate: int, steps: int, seed: int) -> None:
    torch.manual_seed(seed)
    x, y = make_audio(2048, rate, seed)
    x, y = torch.from_numpy(x), torch.from_numpy(y).float()
    opt = torch.optim.Adam([p for p in branch.parameters() if p.requires_grad], lr=3e-3)
    for step in range(steps):
        idx = torch.randint(0, len(x), (64,))
        # A state carried from a previous frame: zero, or the state after a random other frame.
        state = torch.zeros(2, 64, HIDDEN)
        if step % 2:
            with torch.no_grad():
                _, state = branch(x[torch.randint(0, len(x), (64,))], state)
        out, _ = branch(x[idx], state)
        loss = nn.functional.binary_cross_entropy(out[:, 0], y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()


def _into_branches(model: onnx.ModelProto) -> onnx.ModelProto:
    """Move each top-level float initializer that one branch of the If reads into that branch as a Constant
    node named ``If_0_<then|else>_branch__Inline_0__<name>`` (silero's layout), renaming its reads there."""
    graph = model.graph
    node = next(n for n in graph.node if n.op_type == "If")
    branches = {a.name: a.g for a in node.attribute}
    readers: dict[str, set[str]] = {}
    for key, g in branches.items():
        for name in _reads(g):
            readers.setdefault(name, set()).add(key)
    kept = []
    for tensor in graph.initializer:
        owners = readers.get(tensor.name, set())
        if tensor.data_type != onnx.TensorProto.FLOAT or len(owners) != 1:
            kept.append(tensor)
            continue
        key = next(iter(owners))
        new = f"If_0_{key}__Inline_0__{tensor.name}"
        _rename(branches[key], tensor.name, new)
        value = numpy_helper.to_array(tensor)
        branches[key].node.insert(0, helper.make_node("Constant", [], [new], value=numpy_helper.from_array(value, new)))
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return model


def _reads(graph: onnx.GraphProto) -> set[str]:
    names = set()
    for n in graph.node:
        names.update(i for i in n.input if i)
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                names |= _reads(a.g)
    return names


def _rename(graph: onnx.GraphProto, old: str, new: str) -> None:
    for n in graph.node:
        for i, name in enumerate(n.input):
            if name == old:
                n.input[i] = new
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                _rename(a.g, old, new)


def build(path: Path, steps: int = 300, seed: int = 0) -> Path:
    """Train both networks and write the If-model to ``path`` (cached: an existing file is kept)."""
    if path.exists():
        return path
    torch.manual_seed(seed)
    model = VadLike().eval()
    for branch, rate in ((model._model, 16000), (model._model_8k, 8000)):
        branch.train()
        _fit(branch, rate, steps, seed)
        branch.eval()
    scripted = torch.jit.script(model)
    x = torch.from_numpy(make_audio(2, 16000, 1)[0])
    state, sr = torch.zeros(2, 2, HIDDEN), torch.tensor(16000)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(scripted, (x, state, sr), str(path), input_names=["input", "state", "sr"],
                          output_names=["output", "stateN"], opset_version=16, dynamo=False,
                          dynamic_axes={"input": {0: "batch", 1: "samples"}, "state": {1: "batch"},
                                        "output": {0: "batch"}, "stateN": {1: "batch"}})
    onnx.save(_into_branches(onnx.load(str(path))), str(path))
    return path


def feeds(n: int, seed: int, rate: int = 16000) -> dict[str, np.ndarray]:
    """What a user feeds it: frames of both kinds at ``rate``, a zero state, the rate."""
    x, _ = make_audio(n, rate, seed)
    return {"input": x, "state": np.zeros((2, n, HIDDEN), np.float32), "sr": np.array(rate, np.int64)}
