"""A character-level sequence-to-sequence transformer, the kind a name-transliteration ("romanizer") model
is, trained here on a synthetic romanization task (nothing downloaded) and exported by both PyTorch exporters.

``seq2seq``: inputs ``src`` int64 [N, 12] (source letter ids 1-30, 0 = padding) and ``tgt`` int64 [N, 16]
(the decoder's teacher-forced input: BOS, then the target shifted right by one, padded with 0); output
``logits`` float [N, 16, 34]: per target position the next target token (0 = padding, 1 = BOS, 2 = EOS,
3-33 letters). Token embeddings plus learned positions on both sides, a ``torch.nn.Transformer`` (d_model
64, 4 heads, 2 encoder and 2 decoder layers, feed-forward 128, batch first, no dropout), a causal decoder
mask and a source key padding mask computed from ``src == 0`` inside ``forward``, so both masks are part of
the exported graph (as in a real romanizer's export), and a Linear head. The decoder is called with
``tgt_is_causal=True`` (see ``forward``), so both exporters write the causal mask as computed in the graph
(Shape -> Expand -> Trilu of a ones matrix, from scaled_dot_product_attention's ``is_causal``).

The task: each of the 30 source letters maps to one or two target letters through a fixed table drawn from a
seeded RNG; the target is the concatenation of the source word's letters' mappings, then EOS, then padding.
Source words have 3-12 letters; a target that would not fit in 15 letters (plus EOS) is resampled, so every
sample's target fits the 16 decoder positions. A few hundred Adam steps (well under a minute on one core)
give a high teacher-forced token accuracy, which ``build`` logs.

``build(path, dynamo=...)`` writes the TorchScript (``dynamo=False``) or the dynamo export, with a dynamic
batch axis both ways; ``feeds(n, seed)`` gives what a user feeds it (source words and the teacher-forced
decoder input of their true targets), never labels. ``agreement`` measures a compressed model against its
original in onnxruntime: per-token top-1 agreement on the non-padding target positions, and the share of
samples whose whole argmax sequence, up to the original's EOS, is the original's.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

Feeds = dict[str, np.ndarray]

SRC_LEN, TGT_LEN = 12, 16
LETTERS = 30  # source letters 1..30
SRC_VOCAB = LETTERS + 1  # + padding
PAD, BOS, EOS = 0, 1, 2
TGT_LETTERS = 31  # target letters 3..33
TGT_VOCAB = 3 + TGT_LETTERS
TABLE_SEED = 1234  # the romanization table is fixed for every build and every feeds() call


def _table() -> list[list[int]]:
    """Each source letter's target letters (one or two, about a third of them two, as digraphs like 'sh')."""
    rng = np.random.default_rng(TABLE_SEED)
    return [[int(t) + 3 for t in rng.integers(0, TGT_LETTERS, 1 + int(rng.random() < 0.35))]
            for _ in range(LETTERS)]


def make_pairs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` samples: source ids [n, 12], decoder input [n, 16] (BOS + target shifted right) and labels
    [n, 16] (target letters, EOS, then padding)."""
    table = _table()
    rng = np.random.default_rng(seed)
    src = np.zeros((n, SRC_LEN), np.int64)
    tgt_in = np.zeros((n, TGT_LEN), np.int64)
    labels = np.zeros((n, TGT_LEN), np.int64)
    i = 0
    while i < n:
        word = rng.integers(1, LETTERS + 1, int(rng.integers(3, SRC_LEN + 1)))
        target = [t for letter in word for t in table[letter - 1]] + [EOS]
        if len(target) > TGT_LEN:  # the target must fit the decoder positions, EOS included
            continue
        src[i, :len(word)] = word
        labels[i, :len(target)] = target
        tgt_in[i, 0] = BOS
        tgt_in[i, 1:len(target)] = target[:-1]  # teacher forcing: position t sees the targets before t
        i += 1
    return src, tgt_in, labels


class Romanizer(nn.Module):
    """(src [N, S], tgt [N, T]) -> logits [N, T, TGT_VOCAB]."""

    def __init__(self, d_model: int = 64, heads: int = 4, layers: int = 2, ff: int = 128) -> None:
        super().__init__()
        self.src_embed = nn.Embedding(SRC_VOCAB, d_model, padding_idx=PAD)
        self.tgt_embed = nn.Embedding(TGT_VOCAB, d_model, padding_idx=PAD)
        self.src_pos = nn.Parameter(torch.randn(SRC_LEN, d_model) * 0.02)
        self.tgt_pos = nn.Parameter(torch.randn(TGT_LEN, d_model) * 0.02)
        self.transformer = nn.Transformer(d_model, heads, layers, layers, ff, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d_model, TGT_VOCAB)
        # A buffer, not computed in forward: the exporters then store the causal mask as a constant, as the
        # romanizer exports we imitate do (T is fixed).
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(TGT_LEN))

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        # Computed from the input inside the graph, so the exported model carries an Equal on `src` feeding
        # the attention: the part of a real seq2seq export a converter has to follow.
        src_pad = src == PAD
        memory_in = self.src_embed(src) + self.src_pos[:src.shape[1]]
        decoder_in = self.tgt_embed(tgt) + self.tgt_pos[:tgt.shape[1]]
        # tgt_is_causal=True: without it nn.TransformerDecoder compares the mask with a fresh causal one
        # (transformer._detect_is_causal_mask, bool((mask == causal).all())), a data-dependent branch that
        # torch.export (dynamo=True) refuses: GuardOnDataDependentSymNode "Eq(u0, 1)".
        out = self.transformer(memory_in, decoder_in, tgt_mask=self.causal[:tgt.shape[1], :tgt.shape[1]],
                               src_key_padding_mask=src_pad, memory_key_padding_mask=src_pad, tgt_is_causal=True)
        return self.head(out)


def train(model: Romanizer, steps: int, seed: int, batch: int = 64, lr: float = 3e-3) -> float:
    """Adam with a one-cycle schedule on cross-entropy over the non-padding positions (EOS included);
    returns the teacher-forced token accuracy on 512 held-out samples."""
    torch.manual_seed(seed)
    src, tgt_in, labels = (torch.from_numpy(a) for a in make_pairs(4096, seed))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.1)
    start = time.perf_counter()
    model.train()
    for step in range(steps):
        idx = torch.randint(0, len(src), (batch,))
        logits = model(src[idx], tgt_in[idx])
        loss = nn.functional.cross_entropy(logits.reshape(-1, TGT_VOCAB), labels[idx].reshape(-1),
                                           ignore_index=PAD)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0:
            logger.info("seq2seq step %d: loss %.3f", step, loss.item())
    model.eval()
    src, tgt_in, labels = (torch.from_numpy(a) for a in make_pairs(512, seed + 1))
    with torch.no_grad():
        predicted = model(src, tgt_in).argmax(-1)
    real = labels != PAD
    accuracy = float((predicted == labels)[real].float().mean())
    logger.info("seq2seq: %d steps in %.1f s, teacher-forced token accuracy %.4f", steps,
                time.perf_counter() - start, accuracy)
    return accuracy


def export(model: nn.Module, path: Path, dynamo: bool, opset: int = 18) -> Path:
    """Write ``model`` with the TorchScript or the dynamo exporter, dynamic batch axis."""
    path.parent.mkdir(parents=True, exist_ok=True)
    src, tgt_in, _ = (torch.from_numpy(a) for a in make_pairs(2, 0))
    names = {"input_names": ["src", "tgt"], "output_names": ["logits"]}
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()), \
            contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if dynamo:
            batch = torch.export.Dim("batch")
            torch.onnx.export(model, (src, tgt_in), str(path), opset_version=opset, dynamo=True,
                              dynamic_shapes={"src": {0: batch}, "tgt": {0: batch}}, **names)
        else:
            torch.onnx.export(model, (src, tgt_in), str(path), opset_version=opset, dynamo=False,
                              dynamic_axes={"src": {0: "batch"}, "tgt": {0: "batch"}, "logits": {0: "batch"}},
                              **names)
    return path


def build(path: Path, dynamo: bool = False, steps: int = 400, seed: int = 0, opset: int = 18) -> Path:
    """Train the romanizer and write it to ``path`` with the dynamo or the TorchScript exporter (cached: an
    existing file is kept). The same seed gives the same weights for both exports."""
    if path.exists():
        return path
    torch.manual_seed(seed)
    model = Romanizer()
    train(model, steps, seed)
    return export(model, path, dynamo, opset)


def feeds(n: int, seed: int) -> Feeds:
    """What a user feeds it: source words and the teacher-forced decoder input of their targets."""
    src, tgt_in, _ = make_pairs(n, seed)
    return {"src": src, "tgt": tgt_in}


def _until_eos(ids: np.ndarray) -> tuple[int, ...]:
    """The ids up to and including the first EOS (all of them when there is none)."""
    ends = np.flatnonzero(ids == EOS)
    return tuple(ids[:ends[0] + 1] if len(ends) else ids)


def agreement(original: Path, compressed: Path, data: Feeds, threads: int = 1) -> dict[str, float]:
    """Per-token top-1 agreement of ``compressed`` with ``original`` on the non-padding decoder positions
    (``tgt != 0``, which are the label positions, EOS included), and the share of samples whose argmax
    sequence up to the original's EOS is the original's."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = threads
    runs = [ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"]).run(None, data)[0].argmax(-1)
            for p in (original, compressed)]
    real = data["tgt"] != PAD
    same = [_until_eos(a[r]) == _until_eos(b[r]) for a, b, r in zip(*runs, real)]
    return {"token": float((runs[0] == runs[1])[real].mean()), "sequence": float(np.mean(same))}


if __name__ == "__main__":
    import argparse

    # INFO for this module only: the dynamo exporter logs its graph passes at INFO through the root logger.
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logger.setLevel(logging.INFO)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--steps", type=int, default=400)
    args = parser.parse_args()
    args.folder.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    np.savez(args.folder / "train.npz", **feeds(256, 10))
    np.savez(args.folder / "test.npz", **feeds(128, 20))
    torch.manual_seed(0)
    model = Romanizer()
    train(model, args.steps, 0)
    for dynamo in (False, True):
        name = "seq2seq_dynamo.onnx" if dynamo else "seq2seq_ts.onnx"
        try:
            export(model, args.folder / name, dynamo)
            logger.info("wrote %s", args.folder / name)
        except Exception as error:  # record why an exporter fails, and go on with the other one
            logger.error("%s export failed: %s: %s", name, type(error).__name__, error)
