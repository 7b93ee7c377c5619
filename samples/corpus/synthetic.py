"""Two imbalanced-output corpus models trained here on synthetic data (nothing downloaded), and the task
measures that read them: a CTC captcha reader and a two-input 1-D event detector.

Per-position distillation is dominated by the majority of positions in both (blank time steps, background),
which is what issue 22 is about:

- ``captcha_ctc``: grayscale 32x100 images of 4-6 digits drawn from 5x7 glyph bitmaps (random glyph size,
  spacing, offsets, ink level, noise and a clutter line); a ResNet-style conv trunk, a bidirectional LSTM
  over the 25 columns and a Linear head to 11 classes (blank = 0), trained with CTC; exported with the
  TorchScript exporter as [T=25, N, 11] log-probabilities, dynamic batch. About three quarters of the
  time steps are blank.
- ``detector_1d``: a [N, 4, 2048] signal and a [N, 2, 2048] auxiliary input with 2-5 events of 16-64
  positions each (a sine burst in the signal, a raised level in the auxiliary channel; about 7% of the
  positions); a dilated Conv1d encoder and a ConvTranspose1d decoder give a [N, 2048, 1] Sigmoid map,
  and a strided head a [N, 32, 3] detection tensor per 64-position segment (Sigmoid confidence that an
  event's centre lies in it, its centre offset and its width in segment units), TorchScript.

Builders cache the exported model in the work folder (the file name carries the variant) and return
representative inputs from the generator, never labels. ``captcha_agreement`` and ``detector_agreement``
measure a compressed model against its original in onnxruntime with onnx_admm.metrics (greedy CTC
sequence match, positive-set F1), for samples/corpus/objective.py and tests/test_corpus.py.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from onnx_admm.metrics import PositiveSet, SequenceMatch

from glyphs import render_lines

logger = logging.getLogger(__name__)

Feeds = dict[str, np.ndarray]

# ----------------------------------------------------------------------------------------------------
# captcha_ctc
# ----------------------------------------------------------------------------------------------------

CAPTCHA_HEIGHT, CAPTCHA_WIDTH, CAPTCHA_CLASSES = 32, 100, 11  # class 0 is the CTC blank, digit d is d + 1


def render_captchas(n: int, seed: int) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """``n`` captcha images [n, 1, 32, 100] (float32, about zero mean), their digit strings (class ids 1-10)
    and frame labels [n, 25]: each glyph's class at the output step under its centre, blank elsewhere
    (centres are >= 11 px, 2 steps, apart)."""
    return render_lines(n, seed, CAPTCHA_HEIGHT, CAPTCHA_WIDTH, glyph_widths=(10, 14), glyph_heights=(17, 24),
                        step=4)


class _Block(nn.Module):
    """A ResNet basic block (two 3x3 convs with BatchNorm, a 1x1 projection when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: tuple[int, int] = (1, 1)) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                                  nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.skip = (nn.Identity() if cin == cout and stride == (1, 1)
                     else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.skip(x))


class CaptchaReader(nn.Module):
    """[N, 1, 32, 100] -> [25, N, 11] log-probabilities (seq-first, what CTC training and its exports use)."""

    def __init__(self, width: int = 32, hidden: int = 64) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(1, width // 2, 3, 1, 1, bias=False), nn.BatchNorm2d(width // 2), nn.ReLU(), nn.MaxPool2d(2),
            _Block(width // 2, width, (2, 1)), nn.MaxPool2d(2),  # [N, width, 4, 25]
            _Block(width, width), nn.MaxPool2d((4, 1)))  # [N, width, 1, 25]
        self.rnn = nn.LSTM(width, hidden, bidirectional=True)
        self.head = nn.Linear(2 * hidden, CAPTCHA_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = self.trunk(x).squeeze(2).permute(2, 0, 1)  # [T, N, width]
        return torch.log_softmax(self.head(self.rnn(seq)[0]), -1)


def _train(model: nn.Module, steps: int, samples: int, batch: int, lr: float, seed: int,
           loss_of: Callable[[torch.Tensor], torch.Tensor], what: str) -> None:
    """Adam with a one-cycle schedule, ``steps`` steps of ``batch`` random samples; ``loss_of(indices)``."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.15)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        loss = loss_of(torch.randint(0, samples, (batch,), generator=g))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 200 == 0:
            logger.info("%s step %d: loss %.3f", what, step, loss.item())
    model.eval()


def _fit_captcha(model: CaptchaReader, steps: int, samples: int, seed: int, aligned: bool = False) -> None:
    """Adam on CTC, or with ``aligned`` on frame-wise cross-entropy to the frame labels: a stand-in the
    tests use, since CTC sits on its all-blank plateau for the first few hundred steps; it gives the same
    peaky, mostly blank outputs."""
    images, texts, frames = render_captchas(samples, seed)
    x, frames = torch.from_numpy(images), torch.from_numpy(frames)
    targets = [torch.from_numpy(t).long() for t in texts]
    ctc = nn.CTCLoss(blank=0, zero_infinity=True)

    def loss_of(idx: torch.Tensor) -> torch.Tensor:
        logp = model(x[idx])
        if aligned:
            return nn.functional.nll_loss(logp.permute(1, 2, 0), frames[idx])
        batch = [targets[int(i)] for i in idx]
        return ctc(logp, torch.cat(batch), torch.full((len(idx),), logp.shape[0], dtype=torch.long),
                   torch.tensor([len(t) for t in batch]))

    # The rates measured: 3e-3 reads 99% after 600 CTC steps, 6e-3 69% after 250 aligned steps.
    _train(model, steps, samples, 64, 6e-3 if aligned else 3e-3, seed, loss_of, "captcha")


def _export(module: nn.Module, examples: tuple[torch.Tensor, ...], path: Path, inputs: list[str], outputs: list[str],
            batch_axes: dict[str, int]) -> Path:
    """TorchScript export (opset 17) with the batch axis of each named input/output dynamic."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        warnings.simplefilter("ignore")  # the legacy exporter's DeprecationWarning, tracer warnings
        torch.onnx.export(module.eval(), examples, str(path), dynamo=False, opset_version=17, input_names=inputs,
                          output_names=outputs, dynamic_axes={k: {v: "N"} for k, v in batch_axes.items()})
    return path


def captcha_ctc(steps: int = 600, samples: int = 4000, feeds: int = 2048, width: int = 16, hidden: int = 32,
                aligned: bool = False):
    """The builder of the captcha reader (``width`` trunk channels, ``hidden`` LSTM units per direction)
    trained ``steps`` CTC steps (batch 64; frame-wise steps with ``aligned``) on ``samples`` images; its
    representative inputs are ``feeds`` other rendered images."""
    def build(work: Path) -> tuple[Path, Feeds]:
        path = work / f"captcha_ctc.w{width}h{hidden}{'.aligned' if aligned else ''}.{steps}x{samples}.onnx"
        if not path.exists():
            torch.manual_seed(0)
            model = CaptchaReader(width, hidden)
            started = time.perf_counter()
            _fit_captcha(model, steps, samples, seed=0, aligned=aligned)
            logger.info("captcha reader trained in %.0f s", time.perf_counter() - started)
            _export(model, (torch.zeros(2, 1, CAPTCHA_HEIGHT, CAPTCHA_WIDTH),), path, ["image"], ["log_probs"],
                    {"image": 0, "log_probs": 1})
        return path, {"image": render_captchas(feeds, seed=1)[0]}

    return build


# ----------------------------------------------------------------------------------------------------
# detector_1d
# ----------------------------------------------------------------------------------------------------

SIGNAL_LENGTH, SEGMENT = 2048, 64  # 32 detection segments


def make_events(n: int, seed: int, length: int = SIGNAL_LENGTH) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``n`` samples of (signal [n, 4, L], aux [n, 2, L], event mask [n, L], detection targets [n, L / 64, 3]).

    An event is a sine burst (period 8) in signal channels 0-1 and a raised level in aux channel 0;
    channels 2-3 carry bursts of another period that are not events (distractors). Detection targets
    per segment: 1 where an event's centre lies in it, the centre's offset in the segment (0-1) and the
    event's width in segments."""
    rng = np.random.default_rng(seed)
    t = np.arange(length)
    signal = rng.normal(0, 0.6, (n, 4, length)).astype(np.float32)
    aux = rng.normal(0, 0.5, (n, 2, length)).astype(np.float32)
    mask = np.zeros((n, length), np.float32)
    boxes = np.zeros((n, length // SEGMENT, 3), np.float32)
    for i in range(n):
        starts = []
        for _ in range(int(rng.integers(2, 6))):
            for _ in range(20):  # non-overlapping, with a gap
                w, s = int(rng.integers(16, 65)), int(rng.integers(0, length - 64))
                if all(s + w + 16 < a or b + 16 < s for a, b in starts):
                    starts.append((s, s + w))
                    break
        for s, e in starts:
            phase = rng.uniform(0, 2 * np.pi)
            signal[i, 0, s:e] += 1.2 * np.sin(2 * np.pi * t[s:e] / 8 + phase)
            signal[i, 1, s:e] += 1.2 * np.cos(2 * np.pi * t[s:e] / 8 + phase)
            aux[i, 0, s:e] += 1.0
            mask[i, s:e] = 1
            centre = (s + e) / 2
            seg = int(centre // SEGMENT)
            boxes[i, seg] = (1.0, centre / SEGMENT - seg, (e - s) / SEGMENT)
        for _ in range(int(rng.integers(1, 4))):
            s, w = int(rng.integers(0, length - 64)), int(rng.integers(16, 65))
            signal[i, 2, s:s + w] += 1.2 * np.sin(2 * np.pi * t[s:s + w] / 5)
            signal[i, 3, s:s + w] += 1.2 * np.cos(2 * np.pi * t[s:s + w] / 5)
    return signal, aux, mask, boxes


class EventDetector(nn.Module):
    """(signal [N, 4, L], aux [N, 2, L]) -> (map [N, L, 1] Sigmoid, detections [N, L / 64, 3])."""

    def __init__(self, width: int = 24) -> None:
        super().__init__()
        c = nn.Conv1d
        self.encoder = nn.Sequential(
            c(6, width, 7, 2, 3), nn.ReLU(), c(width, width, 3, 1, 2, dilation=2), nn.ReLU(),
            c(width, 2 * width, 3, 2, 1), nn.ReLU(), c(2 * width, 2 * width, 3, 1, 4, dilation=4), nn.ReLU(),
            c(2 * width, 2 * width, 3, 1, 8, dilation=8), nn.ReLU())  # [N, 2w, L / 4]
        self.decoder = nn.Sequential(nn.ConvTranspose1d(2 * width, 16, 4, 4), nn.ReLU(), c(16, 16, 3, 1, 1),
                                     nn.ReLU(), c(16, 1, 1))
        self.boxes = nn.Sequential(c(2 * width, width, SEGMENT // 4, SEGMENT // 4), nn.ReLU(), c(width, 3, 1))

    def forward(self, signal: torch.Tensor, aux: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(torch.cat([signal, aux], 1))
        seg_map = torch.sigmoid(self.decoder(h)).permute(0, 2, 1)
        raw = self.boxes(h)
        detections = torch.cat([torch.sigmoid(raw[:, :1]), raw[:, 1:]], 1).permute(0, 2, 1)
        return seg_map, detections


def _fit_detector(model: EventDetector, steps: int, samples: int, seed: int) -> None:
    signal, aux, mask, boxes = (torch.from_numpy(a) for a in make_events(samples, seed))
    bce = nn.functional.binary_cross_entropy

    def loss_of(idx: torch.Tensor) -> torch.Tensor:
        seg_map, det = model(signal[idx], aux[idx])
        target = boxes[idx]
        hit = target[..., 0] > 0
        return (bce(seg_map[..., 0], mask[idx]) + bce(det[..., 0], target[..., 0])
                + nn.functional.smooth_l1_loss(det[..., 1:][hit], target[..., 1:][hit]))

    _train(model, steps, samples, 32, 3e-3, seed, loss_of, "detector")


def detector_1d(steps: int = 300, samples: int = 2000, feeds: int = 2048, width: int = 24):
    """The builder of the event detector (``width`` channels in its first layers) trained ``steps`` steps
    (batch 32) on ``samples`` signals; its representative inputs are ``feeds`` other generated signals."""
    def build(work: Path) -> tuple[Path, Feeds]:
        path = work / f"detector_1d.w{width}.{steps}x{samples}.onnx"
        if not path.exists():
            torch.manual_seed(0)
            model = EventDetector(width)
            started = time.perf_counter()
            _fit_detector(model, steps, samples, seed=0)
            logger.info("detector trained in %.0f s", time.perf_counter() - started)
            example = (torch.zeros(2, 4, SIGNAL_LENGTH), torch.zeros(2, 2, SIGNAL_LENGTH))
            _export(model, example, path, ["signal", "aux"], ["map", "detections"],
                    {"signal": 0, "aux": 0, "map": 0, "detections": 0})
        signal, aux, _, _ = make_events(feeds, seed=1)
        return path, {"signal": signal, "aux": aux}

    return build


# ----------------------------------------------------------------------------------------------------
# the compressed model against the original, in onnxruntime
# ----------------------------------------------------------------------------------------------------

def run_onnx(path: Path, feeds: Feeds, batch_axis: int = 0) -> list[np.ndarray]:
    """Every output of ``path`` in onnxruntime (one thread, batches of 64), joined on ``batch_axis``."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    n = len(next(iter(feeds.values())))
    chunks = [session.run(None, {k: v[i:i + 64] for k, v in feeds.items()}) for i in range(0, n, 64)]
    return [np.concatenate([c[j] for c in chunks], axis=batch_axis) for j in range(len(chunks[0]))]


def captcha_agreement(original: Path, compressed: Path, images: np.ndarray) -> dict:
    """onnx_admm.metrics' greedy-decoded sequence match (``value``) and character error rate of the
    compressed reader against the original, blank 0, plus ``empty``: the compressed reads that are empty."""
    # The reader's output is seq-first, [T, N, C]: its batch is axis 1.
    reference = run_onnx(original, {"image": images}, batch_axis=1)[0].argmax(-1)
    candidate = run_onnx(compressed, {"image": images}, batch_axis=1)[0].argmax(-1)
    metric = SequenceMatch(blank=0)
    metric.add(reference, candidate, batch=len(images))
    return {**metric.summary(), "empty": float(np.mean((candidate == 0).all(0)))}


def detector_agreement(original: Path, compressed: Path, feeds: Feeds) -> dict:
    """onnx_admm.metrics' positive-set F1 (``value``), precision and recall of the compressed map (> 0.5)
    against the original's, and ``detections_f1``: the same for the detection confidences."""
    (ref_map, ref_det), (out_map, out_det) = run_onnx(original, feeds), run_onnx(compressed, feeds)
    seg, det = PositiveSet(binary=True), PositiveSet(binary=True)
    seg.add(ref_map > 0.5, out_map > 0.5, batch=len(ref_map))
    det.add(ref_det[..., 0] > 0.5, out_det[..., 0] > 0.5, batch=len(ref_det))
    return {**seg.summary(), "detections_f1": det.value, "positives": float((out_map > 0.5).mean())}
