"""A tiny Whisper-style speech/captcha recognizer, exported as the two ONNX files such models ship as: an
encoder and a one-step decoder with a key/value cache, trained here on a synthetic task (nothing downloaded).

``encoder``: input ``features`` float [N, 80, 100] (log-mel-like: 80 bins, 100 frames); two Conv1d (kernel 3,
the second with stride 2) each followed by GELU, learned positions, two pre-norm
``nn.TransformerEncoderLayer`` (d_model 64, 4 heads, feed-forward 128, batch first, no dropout) and a final
LayerNorm; output ``encoder_out`` float [N, 50, 64].

``decoder``: inputs ``tokens`` int64 [N, 1] (one step), ``encoder_out`` float [N, 50, 64], ``past_key`` and
``past_value`` float [N, 2, 4, P, 16] (layers, heads, past length P >= 0, head size); outputs ``logits``
float [N, 1, 40] and ``present_key`` / ``present_value`` [N, 2, 4, P + 1, 16]. Written by hand: token
embedding plus a learned position picked by P (read from ``past_key``'s shape inside the graph), per layer
a pre-norm self-attention whose Linear k/v of the step are concatenated (``torch.cat``) to the cache, then
``scaled_dot_product_attention``, a pre-norm cross-attention on ``encoder_out``, a pre-norm GELU MLP; a final
LayerNorm and an untied Linear head. Training uses the full-sequence path of the same weights (causal
self-attention over the teacher-forced tokens).

The task: a sample is 4 tokens (ids 3-39; 0 padding, 1 BOS, 2 EOS), each spoken in its own 25-frame
segment of the features as the token's fixed random 80-bin template modulated by a token-specific sinusoid
over time, plus noise. The decoder sees BOS, t1..t4 and predicts t1..t4, EOS.

``build(folder)`` trains both jointly and writes ``encoder.onnx`` / ``decoder.onnx`` (TorchScript exporter,
opset 17, dynamic batch and past length) and tries ``encoder.dynamo.onnx`` / ``decoder.dynamo.onnx``
(``dynamo=True``; a failure is logged and the key is left out). ``feeds_encoder(n, seed)`` gives features;
``feeds_decoder(n, seed, past, folder)`` runs the encoder ONNX on fresh features, then the decoder ONNX
greedily for ``past`` steps from BOS, and returns the next step's inputs (real encoder outputs, the greedy
token, caches of length ``past``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

logger = logging.getLogger(__name__)

Feeds = dict[str, np.ndarray]

BINS, FRAMES, D, HEADS, FF, LAYERS, VOCAB = 80, 100, 64, 4, 128, 2, 40
HEAD = D // HEADS
SEQ = 4  # tokens per sample
PAD, BOS, EOS = 0, 1, 2
MAX_POS = 16
TEMPLATE_SEED = 4321


def _templates() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(TEMPLATE_SEED)
    return rng.normal(size=(VOCAB, BINS)).astype(np.float32), rng.uniform(0.05, 0.4, VOCAB).astype(np.float32)


def make_samples(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` samples: features [n, 80, 100] and token sequences [n, 4] (ids 3..39)."""
    spectra, freqs = _templates()
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, VOCAB, (n, SEQ))
    feats = rng.normal(0, 0.3, (n, BINS, FRAMES)).astype(np.float32)
    seg = FRAMES // SEQ
    t = np.arange(seg, dtype=np.float32)
    for i in range(n):
        for j, tok in enumerate(tokens[i]):
            phase = rng.uniform(0, 2 * math.pi)
            feats[i, :, j * seg:(j + 1) * seg] += spectra[tok][:, None] * np.sin(freqs[tok] * t + phase)[None]
    return feats, tokens.astype(np.int64)


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(BINS, D, 3, padding=1)
        self.conv2 = nn.Conv1d(D, D, 3, stride=2, padding=1)
        self.pos = nn.Parameter(torch.randn(1, FRAMES // 2, D) * 0.02)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(D, HEADS, FF, dropout=0.0, batch_first=True, norm_first=True)
            for _ in range(2))
        self.norm = nn.LayerNorm(D)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.conv1(features))
        x = F.gelu(self.conv2(x)).transpose(1, 2) + self.pos
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


class DecoderLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln1, self.ln2, self.ln3 = nn.LayerNorm(D), nn.LayerNorm(D), nn.LayerNorm(D)
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))
        self.cq, self.ck, self.cv, self.co = (nn.Linear(D, D) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(D, FF), nn.Linear(FF, D)

    @staticmethod
    def _heads(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], x.shape[1], HEADS, HEAD).transpose(1, 2)

    @staticmethod
    def _merge(x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], D)

    def forward(self, x: torch.Tensor, enc: torch.Tensor, past_k: torch.Tensor | None,
                past_v: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.ln1(x)
        q, k, v = self._heads(self.q(h)), self._heads(self.k(h)), self._heads(self.v(h))
        if past_k is not None:
            k = torch.cat([past_k, k], dim=2)
            v = torch.cat([past_v, v], dim=2)
            a = F.scaled_dot_product_attention(q, k, v)
        else:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(self._merge(a))
        h = self.ln2(x)
        c = F.scaled_dot_product_attention(self._heads(self.cq(h)), self._heads(self.ck(enc)),
                                           self._heads(self.cv(enc)))
        x = x + self.co(self._merge(c))
        x = x + self.fc2(F.gelu(self.fc1(self.ln3(x))))
        return x, k, v


class Decoder(nn.Module):
    """``forward`` is the one-step decoder with cache (what is exported); ``full`` the teacher-forced path."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.pos = nn.Embedding(MAX_POS, D)
        self.layers = nn.ModuleList(DecoderLayer() for _ in range(LAYERS))
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, VOCAB)

    def full(self, tokens: torch.Tensor, enc: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos(torch.arange(tokens.shape[1], device=tokens.device))
        for layer in self.layers:
            x, _, _ = layer(x, enc, None, None)
        return self.head(self.norm(x))

    def forward(self, tokens: torch.Tensor, encoder_out: torch.Tensor, past_key: torch.Tensor,
                past_value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        position = torch.zeros_like(tokens) + past_key.shape[3]  # the step's position is the cache length
        x = self.embed(tokens) + self.pos(position)
        keys, values = [], []
        for i, layer in enumerate(self.layers):
            x, k, v = layer(x, encoder_out, past_key[:, i], past_value[:, i])
            keys.append(k)
            values.append(v)
        return self.head(self.norm(x)), torch.stack(keys, 1), torch.stack(values, 1)


def train(encoder: Encoder, decoder: Decoder, steps: int = 300, seed: int = 0, batch: int = 64,
          lr: float = 2e-3) -> float:
    """Teacher-forced joint training; returns the last batch's token accuracy (EOS included)."""
    feats, tokens = (torch.from_numpy(a) for a in make_samples(steps * batch // 4, seed))
    tgt_in = torch.cat([torch.full((len(tokens), 1), BOS), tokens], 1)
    labels = torch.cat([tokens, torch.full((len(tokens), 1), EOS)], 1)
    params = list(encoder.parameters()) + list(decoder.parameters())
    opt = torch.optim.Adam(params, lr)
    gen = torch.Generator().manual_seed(seed)
    start, acc = time.perf_counter(), 0.0
    for step in range(steps):
        idx = torch.randint(0, len(feats), (batch,), generator=gen)
        logits = decoder.full(tgt_in[idx], encoder(feats[idx]))
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), labels[idx].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        acc = (logits.argmax(-1) == labels[idx]).float().mean().item()
        if step % 50 == 0 or step == steps - 1:
            logger.info("step %d loss %.3f acc %.3f (%.1fs)", step, loss.item(), acc, time.perf_counter() - start)
    return acc


def _example_decoder_inputs(past: int = 3) -> tuple[torch.Tensor, ...]:
    return (torch.full((2, 1), BOS, dtype=torch.int64), torch.randn(2, FRAMES // 2, D),
            torch.randn(2, LAYERS, HEADS, past, HEAD), torch.randn(2, LAYERS, HEADS, past, HEAD))


def _export(model: nn.Module, args: tuple, path: Path, dynamo: bool, names: dict, axes: dict,
            shapes: dict | None, opset: int) -> Path:
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()), \
            contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(model, args, str(path), opset_version=opset, dynamo=True, dynamic_shapes=shapes,
                              **names)
        else:
            torch.onnx.export(model, args, str(path), opset_version=opset, dynamo=False, dynamic_axes=axes,
                              **names)
    return path


def export_encoder(encoder: Encoder, path: Path, dynamo: bool, opset: int = 17) -> Path:
    feats = torch.from_numpy(make_samples(2, 0)[0])
    batch = torch.export.Dim("batch")
    return _export(encoder, (feats,), path, dynamo, {"input_names": ["features"], "output_names": ["encoder_out"]},
                   {"features": {0: "batch"}, "encoder_out": {0: "batch"}}, {"features": {0: batch}}, opset)


def export_decoder(decoder: Decoder, path: Path, dynamo: bool, opset: int = 17) -> Path:
    names = {"input_names": ["tokens", "encoder_out", "past_key", "past_value"],
             "output_names": ["logits", "present_key", "present_value"]}
    axes = {"tokens": {0: "batch"}, "encoder_out": {0: "batch"}, "past_key": {0: "batch", 3: "past"},
            "past_value": {0: "batch", 3: "past"}, "logits": {0: "batch"},
            "present_key": {0: "batch", 3: "present"}, "present_value": {0: "batch", 3: "present"}}
    batch, past = torch.export.Dim("batch"), torch.export.Dim("past", max=MAX_POS - 1)
    shapes = {"tokens": {0: batch}, "encoder_out": {0: batch}, "past_key": {0: batch, 3: past},
              "past_value": {0: batch, 3: past}}
    return _export(decoder, _example_decoder_inputs(), path, dynamo, names, axes, shapes, opset)


def build(folder: Path | str, steps: int = 300, seed: int = 0, opset: int = 17) -> dict[str, Path]:
    """Train encoder and decoder jointly and write both exports; returns name -> path of what was written
    (``encoder``, ``decoder``, and ``encoder.dynamo`` / ``decoder.dynamo`` where the dynamo export worked)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    encoder, decoder = Encoder(), Decoder()
    acc = train(encoder, decoder, steps, seed)
    logger.info("teacher-forced token accuracy %.3f", acc)
    encoder.eval()
    decoder.eval()
    paths: dict[str, Path] = {}
    for dynamo in (False, True):
        suffix = ".dynamo" if dynamo else ""
        for name, fn, model in (("encoder", export_encoder, encoder), ("decoder", export_decoder, decoder)):
            try:
                paths[name + suffix] = fn(model, folder / f"{name}{suffix}.onnx", dynamo, opset)
            except Exception as exc:  # noqa: BLE001 - a failed export is a result to record
                logger.warning("%s export (dynamo=%s) failed: %s: %s", name, dynamo, type(exc).__name__,
                               str(exc).splitlines()[0] if str(exc) else "")
    return paths


def feeds_encoder(n: int, seed: int) -> Feeds:
    """What a user feeds the encoder: features only, never labels."""
    return {"features": make_samples(n, seed)[0]}


def feeds_decoder(n: int, seed: int, past: int, folder: Path | str = "/tmp/whisper", threads: int = 1) -> Feeds:
    """The decoder's inputs at step ``past``: real encoder outputs (encoder ONNX in ``folder``), the greedy
    token after ``past`` decoder steps from BOS (decoder ONNX) and the caches of those steps."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = threads
    folder = Path(folder)
    enc_sess = ort.InferenceSession(str(folder / "encoder.onnx"), opts, providers=["CPUExecutionProvider"])
    dec_sess = ort.InferenceSession(str(folder / "decoder.onnx"), opts, providers=["CPUExecutionProvider"])
    enc = enc_sess.run(None, feeds_encoder(n, seed))[0]
    tokens = np.full((n, 1), BOS, np.int64)
    key = np.zeros((n, LAYERS, HEADS, 0, HEAD), np.float32)
    value = key.copy()
    for _ in range(past):
        logits, key, value = dec_sess.run(None, {"tokens": tokens, "encoder_out": enc, "past_key": key,
                                                 "past_value": value})
        tokens = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
    return {"tokens": tokens, "encoder_out": enc, "past_key": key, "past_value": value}
