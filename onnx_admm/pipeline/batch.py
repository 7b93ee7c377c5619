"""The batch a training step and a validation run can afford (``onnx_admm.memory`` estimates the bytes),
the tensor batches a phase reads from the data, and the equal number of steps every process of a
data-parallel run takes from a loader plugin's stream (``even_steps``)."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from dataclasses import dataclass
from typing import Any

from onnx_admm.converters.importer import ImportedModel
from onnx_admm.data import LABELS, Feed
from onnx_admm.distributed import World
from onnx_admm.memory import (INFERENCE_SHARE, activation_bytes, default_budget_mb, describe_mb, fit_batch,
                              inference_bytes, training_bytes)
from onnx_admm.recipe import DEFAULT_BATCH_SIZE
from onnx_admm.train import Batch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchChoice:
    """The training and validation batches, and the memory estimate that chose them (``onnx_admm.memory``)."""

    requested: int  # train.batch_size, or DEFAULT_BATCH_SIZE when it is not given
    explicit: bool  # train.batch_size was given: it is used as is, in one piece
    train: int  # samples per optimizer step
    chunk: int | None  # the step's samples go through the model in chunks of this many (None: whole)
    validation: int
    budget_mb: float | None  # None: no estimate (a CUDA device without train.batch_memory_mb)
    train_per_sample: int  # estimated bytes per sample of a training step
    validation_per_sample: int  # of an onnxruntime run

    def describe(self) -> dict[str, Any]:
        mb = 2**20
        return {"requested": self.requested, "explicit": self.explicit, "chunk": self.chunk, "budget_mb": self.budget_mb,
                "estimated_train_mb_per_sample": self.train_per_sample / mb,
                "estimated_train_mb": (self.chunk or self.train) * self.train_per_sample / mb,
                "estimated_validation_mb_per_sample": self.validation_per_sample / mb}

def choose_batch(imported: ImportedModel, cfg, teacher: bool) -> tuple[BatchChoice, list[str]]:
    """The batch a training step and a validation run can afford, and the warnings about it.

    A default batch whose activations exceed ``train.batch_memory_mb`` (a real EEG detector's 7,500-sample
    inputs took 15 GB at batch 64) goes through the model in chunks that fit, its gradients accumulated
    into one step: the memory of the smaller batch, the optimisation of the default one (same steps,
    learning rate and Z/U periods). A batch the user chose is used whole, with a warning when it is
    estimated too large. The validation runs at the largest batch the budget allows.
    """
    requested, explicit = cfg.batch_size or DEFAULT_BATCH_SIZE, cfg.batch_size is not None
    act = activation_bytes(imported.original)
    per_train, per_val = training_bytes(act, teacher), inference_bytes(act)
    budget = cfg.batch_memory_mb
    if budget is None and cfg.device == "cpu":
        budget = default_budget_mb()
    if budget is None:  # the host's memory says nothing about a GPU's
        return BatchChoice(requested, explicit, requested, None, requested, None, per_train, per_val), []
    fits = fit_batch(requested, per_train, budget)
    chunk = fits if fits < requested and not explicit else None
    warnings = []
    need = (f"about {describe_mb(requested * per_train)} per training step ({describe_mb(per_train)} per sample, "
            f"estimated from the graph's shapes), over the budget of {describe_mb(budget * 2**20)} "
            "(train.batch_memory_mb)")
    if fits < requested and explicit:
        warnings.append(f"train.batch_size {requested} needs {need}; kept as given: lower --batch-size "
                        f"(train.batch_size) to {fits} if the run runs out of memory")
    elif chunk is not None:
        warnings.append(f"the default batch {requested} needs {need}; training at batch {chunk}: each step's "
                        f"{requested} samples go through in chunks of {chunk}, their gradients accumulated. Set "
                        "--batch-size (train.batch_size) to train at a batch of your own in one piece, or "
                        "train.batch_memory_mb to change the budget")
    validation = fit_batch(requested, per_val, budget * INFERENCE_SHARE)
    for line in warnings:
        logger.warning("%s", line)
    if validation < requested:
        logger.info("validating at batch %d (%s per sample in onnxruntime)", validation, describe_mb(per_val))
    return BatchChoice(requested, explicit, requested, chunk, validation, budget, per_train, per_val), warnings


def _tensor(array: np.ndarray) -> torch.Tensor:
    array = np.ascontiguousarray(array)
    # A batch that is a view of a read-only memory-mapped file (unshuffled .npz data): torch wants memory
    # it may write to, so that batch alone is copied.
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def to_batches(feeds, input_names: list[str], device: torch.device, chunk: int | None = None,
                batched: set[str] = frozenset(), steps: bool = False):
    """Batches of tensors from feeds; with ``chunk``, each feed split into chunks of at most that many samples
    (along the inputs in ``batched``): yielded one by one, or with ``steps`` as one list per feed (the chunks
    of one training step, ``onnx_admm.train.train_epoch``).

    On a GPU each batch is copied from pinned memory without waiting, one batch ahead of the one the caller
    works on, so the copy of the next batch overlaps the computation on this one.
    """
    gpu = device.type == "cuda"

    def batches():
        for feed in feeds:
            parts = [_batch(part, input_names, device, gpu) for part in _split_feed(feed, chunk, batched)]
            if steps:
                yield parts
            else:
                yield from parts

    return one_ahead(batches()) if gpu else batches()


def one_ahead(items):
    """``items`` in order, each one fetched before the previous one is handed out."""
    items = iter(items)
    done = object()
    upcoming = next(items, done)
    while upcoming is not done:
        current, upcoming = upcoming, next(items, done)
        yield current


def _batch(feed, input_names: list[str], device: torch.device, gpu: bool = False) -> Batch:
    inputs = tuple(_on(_tensor(feed[n]), device, gpu) for n in input_names)
    labels = feed.get(LABELS)
    return Batch(inputs, None if labels is None else _on(_tensor(labels), device, gpu))


def _on(tensor: torch.Tensor, device: torch.device, gpu: bool) -> torch.Tensor:
    # A copy from pinned host memory may run while the device computes; torch's host allocator keeps the
    # pinned block alive until the copy has finished.
    return tensor.pin_memory().to(device, non_blocking=True) if gpu else tensor.to(device)


def _split_feed(feed, chunk: int | None, batched: set[str]):
    n = feed_samples(feed, batched)
    if chunk is None or n <= chunk:
        yield feed
        return
    for start in range(0, n, chunk):
        yield {k: (v[start:start + chunk] if k in batched or k == LABELS else v) for k, v in feed.items()}


def even_steps(feeds: Iterable[Feed], world: World, batch_size: int, batched: set[str], label: str) -> Iterator[Feed]:
    """This process's whole batches of ``feeds`` (its round-robin share of a loader plugin's stream), as
    many as every other process has.

    Each step all-reduces its gradients, so a process that stepped once more than another would wait for
    it forever: before each step the processes agree that every one still holds a whole batch
    (``World.every``), and all end the epoch as soon as one has none. A final partial batch ends it too:
    every process then steps on ``batch_size`` samples, as on an .npz shard, and a step split into chunks
    makes as many gradient all-reduces everywhere. What was left over is read to its end, so that the
    count of the dropped tail is true, and logged once per epoch by rank 0.
    """
    feeds = iter(feeds)
    steps = 0
    while True:
        feed = next(feeds, None)
        if not world.every(feed is not None and feed_samples(feed, batched) == batch_size):
            break
        steps += 1
        yield feed
    left = [feed_samples(f, batched) for f in itertools.chain([] if feed is None else [feed], feeds)]
    # Every rank reaches this collective: the agreement above ended the loop on all of them at once.
    ranks = world.gather((steps + len(left), sum(left)))
    dropped = sum(n for _, n in ranks)
    if world.main and dropped:
        logger.info("%s: the loader plugin's stream gave the ranks %s batches; each took %d steps and dropped "
                    "the rest, %d batches (%d samples) in all", label, ", ".join(str(b) for b, _ in ranks), steps,
                    sum(b for b, _ in ranks) - steps * world.size, dropped)


def feed_samples(feed: Feed, batched: set[str]) -> int:
    """The samples in ``feed``: the length of its batched inputs or labels (a Dataset has one or the other)."""
    rows = [len(feed[k]) for k in (*sorted(batched), LABELS) if k in feed]
    return rows[0] if rows else 0
