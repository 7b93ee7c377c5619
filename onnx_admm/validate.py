"""Original vs compressed model in onnxruntime: outputs, agreement, accuracy, size, nonzeros, latency.

Used by the ``validate`` command and at the end of ``compress``. Both models run in onnxruntime on
the same held-out feeds; the report compares what a user deploys, not the torch copy we trained.

Latency: a fixed intra-op thread count, one inter-op thread, sequential execution,
warm-up runs first, then the two models timed in interleaved turns (alternating which goes first),
and the median per batch reported in milliseconds.
"""

from __future__ import annotations

import itertools
import logging
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnx_admm.converters.errors import UserError, ort_message
from onnx_admm.converters.graphinfo import graph_inputs
from onnx_admm.converters.scores import find_score_output, other_probabilities
from onnx_admm.converters.modelio import load_model, require_model_file, save_model, scratch_dir
from onnx_admm.data import LABELS, Dataset, required_batch_size
from onnx_admm.sources import PluginData, as_data
from onnx_admm.gate import retained
from onnx_admm.memory import INFERENCE_SHARE, activation_bytes, default_budget_mb, describe_mb, fit_batch, inference_bytes
from onnx_admm.comparison import Comparison, OutputDiff
from onnx_admm.recipe import DEFAULT_BATCH_SIZE, check_threads
from onnx_admm.storage import count_weights, gzip_size, model_files
from onnx_admm.train import describe_score

logger = logging.getLogger(__name__)

_WARMUP_RUNS = 3
# From this many held-out samples on, one predicted class for all of them is worth a warning.
CONSTANT_REFERENCE_SAMPLES = 8
# Latency is timed on the first full batches, at most this many, kept aside during the comparison (each
# costs a batch of memory; onnxruntime's time hardly depends on the values).
_TIMING_FEEDS = 2

# Ops that turn constant stored data into a weight at run time. A weight stored through one of them
# (e.g. int8 DequantizeLinear) is counted as the decoded tensor its consumer reads. Future encoders
# add their decoding ops here (a codebook encoding: "Cast", "Gather").


@dataclass(frozen=True)
class ModelStats:
    """What one model costs and scores.

    ``bytes``/``gzip_bytes`` cover the model file and its external data files. ``parameters`` and
    ``nonzeros`` count the compressible weights (not biases, not norm parameters).
    """

    path: str
    files: tuple[str, ...]
    bytes: int
    gzip_bytes: int
    parameters: int
    nonzeros: int
    accuracy: float | None
    latency_ms: float | None


@dataclass(frozen=True)
class ValidationReport:
    """The A/B comparison of an original model and its compressed version."""

    original: ModelStats
    compressed: ModelStats
    outputs: tuple[OutputDiff, ...]
    score_output: str | None
    # Fraction of the score output's positions whose prediction agrees (``onnx_admm.train.predictions``):
    # top-1 per sample, time step or pixel, or the 0.5-thresholded probability per element.
    agreement: float | None
    samples: int
    batch_size: int
    latency_batch_size: int | None
    threads: int
    # How the score output was read: its kind, loss and metric (``onnx_admm.train.describe_score``), its
    # shape per batch and, for an inner tensor, the integer graph output it feeds.
    score: dict | None = None
    # The task metric of the compressed model against the original (``onnx_admm.metrics``): ``metric``
    # (its name), ``value`` (the headline figure, 1 = the original's own) and the figures behind it.
    task: dict | None = None

    @property
    def compression_ratio(self) -> float | None:
        """Original weights / compressed nonzero weights, counting removed weights as zeros."""
        return self.original.parameters / self.compressed.nonzeros if self.compressed.nonzeros else None

    @property
    def size_ratio(self) -> float | None:
        """Original bytes / compressed bytes."""
        return self.original.bytes / self.compressed.bytes if self.compressed.bytes else None

    @property
    def accuracy_drop(self) -> float | None:
        """Original accuracy minus compressed accuracy, an absolute fraction (0.01 = 1 point)."""
        if self.original.accuracy is None or self.compressed.accuracy is None:
            return None
        return self.original.accuracy - self.compressed.accuracy

    @property
    def drop(self) -> float | None:
        """The accuracy drop with labels, else 1 - the task metric against the original (the gate's drop)."""
        if self.accuracy_drop is not None:
            return self.accuracy_drop
        if self.task is not None and self.task.get("value") is not None:
            return 1.0 - self.task["value"]
        return None

    def constant_reference(self) -> str | None:
        """A warning when the original gives every held-out sample the same class: agreement with it (and
        the gate that reads it) then turns on near ties, and the data is often not what the model expects."""
        if (self.task or {}).get("reference_classes") != 1 or self.samples < CONSTANT_REFERENCE_SAMPLES:
            return None
        return (f"the original model predicts the same class for all {self.samples} held-out samples, so "
                f"{self.task['metric']} says little about the compressed one; check that the data is what the "
                "model expects (layout, scaling, channel order) or give labels")

    def empty_reads(self) -> str | None:
        """A warning when the original decodes every held-out sample to an empty sequence (every step the
        blank): sequence match is then 1 for any model that reads nothing either, a destroyed one included."""
        task = self.task or {}
        if task.get("metric") != "sequence match" or task.get("reference_symbols") != 0:
            return None
        return (f"the original reads nothing on the {self.samples} held-out samples (every time step is the blank, "
                f"class {task['blank']}), so {task['metric']} says nothing about the compressed model; give data the "
                "original reads (layout, scaling, channel order), or name the blank with [train] blank if it is "
                "another class")

    def no_positives(self) -> str | None:
        """A warning when the original marks no positive on the held-out samples: a positive-set metric is
        then 1 by definition (nothing to find, nothing found) and the gate cannot tell a detector that finds
        nothing any more."""
        task = self.task or {}
        if task.get("metric") != "positive-set F1" or task.get("positive_fraction") != 0:
            return None
        return (f"the original marks no positive on the {self.samples} held-out samples (no probability above 0.5), "
                f"so {task['metric']} says nothing about the compressed model; give data on which the original "
                "detects something, or labels")

    def unmeasured(self) -> str | None:
        """A warning when nothing measures the task: no labels, and no output the tool reads as scores. The
        gate's floor then has no figure, so a model the run destroyed would pass it (a segmentation map of
        raw logits, a detector's concatenated boxes and scores)."""
        if self.original.accuracy is not None or (self.task or {}).get("value") is not None:
            return None
        return ("no output reads as class scores ([N, C] scores, a Softmax/LogSoftmax/Sigmoid map or a linear "
                "head's per-position logits) and there are no labels, so nothing measures the task and the gate "
                "cannot tell a broken model: the report compares the outputs' values only (outputs[]); name the "
                "score tensor with [train] output = \"name\" where one exists, or give labels")

    def warnings(self) -> list[str]:
        """What makes the task metric say little or nothing on these samples (the checks above), for the
        report and ``validate``'s output."""
        return [note for note in (self.constant_reference(), self.no_positives(), self.empty_reads(),
                                  self.unmeasured()) if note]

    @property
    def retained(self) -> tuple[str, float] | None:
        """(metric, the compressed model's share of the original's figure): what the gate's floor reads."""
        return retained(self.original.accuracy, self.compressed.accuracy, self.task)

    def to_dict(self) -> dict:
        """A JSON-ready dict of every field plus the derived ratios."""
        result = asdict(self)
        result["original"]["files"] = list(self.original.files)
        result["compressed"]["files"] = list(self.compressed.files)
        result["outputs"] = [asdict(diff) for diff in self.outputs]
        result["compression_ratio"] = self.compression_ratio
        result["size_ratio"] = self.size_ratio
        result["accuracy_drop"] = self.accuracy_drop
        return result


def open_session(path: str | Path, threads: int = 1, exact: bool = False, fused: bool = True) -> ort.InferenceSession:
    """An onnxruntime CPU session with a fixed thread count and sequential execution.

    Args:
        path: The .onnx file (its external data files next to it).
        threads: Intra-op threads; inter-op is always 1.
        exact: Compute what the graph says: onnxruntime fuses a blockwise int4 DequantizeLinear and its
            MatMul into MatMulNBits at accuracy level 4, which quantizes the activations to int8 (0.5% of
            max|output| on a small MLP); exact keeps level 0, float activations (check's reference).
        fused: False turns every graph optimization off, so a QDQ graph runs as written (DequantizeLinear, the
            float op, QuantizeLinear) instead of on onnxruntime's fused int8 kernels: the quantized graph's own
            math, which those kernels leave on x86 CPUs without VNNI (check's dequantized step).

    Returns:
        The session.

    Raises:
        UserError: The file is missing or onnxruntime cannot load it.
    """
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    path = require_model_file(path)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Fatal only: onnxruntime's load warnings (unused initializers, ...) would drown the report, and a failed
    # run's error lines would go to the terminal beside the one line its exception becomes (run_session).
    options.log_severity_level = 4
    # Without the arena each run returns its memory: with it a session keeps its largest run's for its
    # whole life, about twice what the run needs (samples/eeg, batch 44: 1.4 GB against 0.7), and
    # validation holds two sessions; the speed is the same there.
    options.enable_cpu_mem_arena = False
    if exact:
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    if not fused:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own pybind exception types
        raise UserError(
            f"cannot load {path} in onnxruntime: {ort_message(exc)}; check it with onnx.checker.check_model "
            "and keep its external data files next to it"
        ) from None


def validate(
    original: str | Path,
    compressed: str | Path,
    data: object,
    *,
    batch_size: int | None = None,
    threads: int = 1,
    latency_batches: int = 20,
    score_output: str | None = None,
    scratch: str | Path | None = None,
    blank: int | None = None,
    budget_mb: float | None = None,
) -> ValidationReport:
    """Run both models in onnxruntime on the same feeds and compare them.

    A model whose graph fixes the batch dim of a batched input runs at that size only: then it is
    used instead of ``batch_size`` and an incomplete last batch is left out (logged). The data are
    streamed batch by batch (an .npz is memory-mapped, a plugin is read as it yields), never held whole.

    Args:
        original: The original .onnx file.
        compressed: The compressed .onnx file (same graph inputs and outputs).
        data: Held-out inputs, with labels for accuracy: any form ``onnx_admm.sources.as_data`` takes (an
            .npz path, a dict of arrays, an iterable of dicts, a Dataset, a plugin).
        batch_size: Samples per onnxruntime run; None: DEFAULT_BATCH_SIZE, lowered to what the two models'
            estimated activations allow (``onnx_admm.memory``). A given size is kept (a warning when it is
            estimated too large).
        threads: onnxruntime intra-op threads for both models.
        latency_batches: Timed runs per model (0 skips latency).
        score_output: Output used for agreement and accuracy (default: ``find_score_output``).
        scratch: folder for temporary copies (default: the system's temporary folder).
        blank: the CTC blank class of a per-time-step score output (default: the original's most
            frequent class when it covers at least half of the steps; see ``onnx_admm.metrics``).
        budget_mb: the memory a batch may take in onnxruntime (default: ``memory.default_budget_mb``).

    Returns:
        The report.

    Raises:
        UserError: A model does not load or run, or the two models' inputs/outputs differ.
    """
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    check_threads("threads (--threads)", threads)
    original, compressed = Path(original), Path(compressed)
    models = load_model(original), load_model(compressed)
    _check_same_io(*models)
    specs = graph_inputs(models[0])
    data = as_data(data, specs)
    if isinstance(data, PluginData):
        # Streamed: the first dict says which inputs have a sample axis, then the rest follow it.
        chunks = data.chunks()
        first = next(chunks, None)
        if first is None:
            raise UserError(f"{data.what} yielded no data")
        batched, total, axes = first.batched, None, first.axes
        plugin, chunks = data, itertools.chain([first], chunks)
        data = _Stream(lambda size, drop: plugin.batches(size, drop_last=drop, chunks=chunks))
    else:
        batched, total, axes = data.batched, len(data), data.axes
    # An input with its samples on another axis (a state [2, N, H]) fixes its first dim, not the batch.
    fixed = required_batch_size(specs, batched - set(axes))
    if fixed is None:
        batch_size = _fit_batch(batch_size, models, budget_mb or default_budget_mb())
    elif fixed != batch_size:
        left_out = total % fixed if total is not None else None
        # Only the samples left out are worth a warning; the batch size itself is the graph's to choose.
        (logger.warning if left_out != 0 else logger.info)(
            "the graph fixes the batch size to %d: validating at batch %d, leaving out the last %s sample(s)",
            fixed, fixed, left_out if left_out is not None else "incomplete batch's",
        )
        batch_size = fixed
    if fixed is not None and total is not None and total < fixed:
        raise UserError(f"the graph runs only at batch size {fixed}, but the data holds {total} samples; pass more")
    score = find_score_output(models[0], score_output)
    others = other_probabilities(models[0], score)
    sessions = open_session(original, threads), open_session(compressed, threads)
    names = [out.name for out in sessions[0].get_outputs()]

    comparison = Comparison(names, score.name if score else None, score.kind if score else "logits", blank,
                            tuple(o.name for o in others))
    timing_feeds: list[dict[str, np.ndarray]] = []
    # A graph input that is itself named "labels" is an input, not class ids.
    has_labels = LABELS not in {spec.name for spec in specs}
    with scratch_dir(scratch) as tmp:
        # Inner tensors (the score, probabilities beside it) are read from copies that also output them;
        # latency is timed on the files.
        compared, paths = sessions, (original, compressed)
        inner = [s.name for s in ([score] if score is not None else []) + others if s.internal]
        if inner:
            paths = tuple(_with_outputs(model, inner, Path(tmp) / f"{i}.onnx") for i, model in enumerate(models))
            compared = tuple(open_session(path, threads) for path in paths)
        run_names = names + inner
        samples = 0
        for feed in data.batches(batch_size, drop_last=fixed is not None):
            labels = feed.pop(LABELS, None) if has_labels else None
            results = [run_session(session, path, run_names, feed) for session, path in zip(compared, paths)]
            count = _feed_samples(feed, batched, labels)
            comparison.add(results, labels, count)
            # Time full batches only, unless the data is smaller than one batch.
            if len(timing_feeds) < _TIMING_FEEDS and (count == batch_size or not timing_feeds and not samples):
                timing_feeds.append(feed)
            samples += count
    if fixed is not None and samples < fixed:
        raise UserError(f"the graph runs only at batch size {fixed}, but the data holds fewer samples; pass more")
    latency_batch_size = min(batch_size, samples)
    latencies = _latencies(sessions, timing_feeds, latency_batches) if latency_batches > 0 else (None, None)

    stats = [
        _model_stats(path, model, accuracy, latency)
        for path, model, accuracy, latency in zip((original, compressed), models, comparison.accuracies(), latencies)
    ]
    report = ValidationReport(
        original=stats[0],
        compressed=stats[1],
        outputs=comparison.diffs(),
        score_output=score.name if score else None,
        agreement=comparison.agreement(),
        samples=samples,
        batch_size=batch_size,
        latency_batch_size=latency_batch_size if latency_batches > 0 else None,
        threads=threads,
        score=None if score is None else {"tensor": score.name, "feeds": score.feeds, "shape": comparison.score_shape,
                                          **describe_score(score.kind, comparison.score_shape)},
        task=comparison.summary(),
    )
    logger.info("validated %s against %s on %d samples", compressed, original, samples)
    return report


class _Stream:
    """A plugin's batches for one pass, in the ``batches(size, drop_last=)`` shape of a Dataset."""

    def __init__(self, batches) -> None:
        self._batches = batches

    def batches(self, batch_size: int, *, drop_last: bool = False):
        return self._batches(batch_size, drop_last)


def _feed_samples(feed: dict[str, np.ndarray], batched: set[str], labels: np.ndarray | None) -> int:
    if labels is not None:
        return len(labels)
    return next((len(feed[name]) for name in sorted(batched) if name in feed), 1)


def _fit_batch(batch_size: int | None, models: tuple[onnx.ModelProto, ...], budget: float) -> int:
    """The batch to validate at: a given one (warned about when estimated too large), else the default,
    lowered to what both models' activations in onnxruntime allow."""
    requested = batch_size or DEFAULT_BATCH_SIZE
    per_sample = inference_bytes(activation_bytes(models[0]))
    budget *= INFERENCE_SHARE
    fits = fit_batch(requested, per_sample, budget)
    if fits < requested:
        need = (f"about {describe_mb(requested * per_sample)} in onnxruntime ({describe_mb(per_sample)} per sample, "
                f"estimated from the graph's shapes), over the budget of {describe_mb(budget * 2**20)}")
        if batch_size is not None:
            logger.warning("batch %d needs %s; kept as given: lower --batch-size to %d if it runs out of memory",
                           requested, need, fits)
        else:
            logger.warning("the default batch %d needs %s; validating at batch %d (set --batch-size to choose)",
                           requested, need, fits)
            return fits
    return requested


def _check_same_io(original: onnx.ModelProto, compressed: onnx.ModelProto) -> None:
    for what, names in (
        ("inputs", lambda m: [spec.name for spec in graph_inputs(m)]),
        ("outputs", lambda m: [out.name for out in m.graph.output]),
    ):
        if sorted(names(original)) != sorted(names(compressed)):
            raise UserError(
                f"the compressed model's graph {what} {names(compressed)} differ from the original's "
                f"{names(original)}; validate compares two versions of the same model"
            )


def _with_outputs(model: onnx.ModelProto, names: list[str], path: Path) -> Path:
    """A copy of ``model`` saved at ``path`` that also outputs its inner tensors ``names``."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(onnx.ValueInfoProto(name=name) for name in names)
    save_model(probe, path)
    return path


def run_session(session: ort.InferenceSession, path: Path, names: list[str], feed: dict[str, np.ndarray]) -> dict:
    """``session.run`` keyed by output name; an onnxruntime failure becomes a one-line UserError."""
    try:
        return dict(zip(names, session.run(names, feed)))
    except Exception as exc:  # onnxruntime raises its own pybind exception types
        shapes = {name: tuple(array.shape) for name, array in feed.items()}
        raise UserError(f"onnxruntime failed to run {path} on inputs {shapes}: {ort_message(exc)}") from None


def latency_ms(original: str | Path, compressed: str | Path, data: Dataset, batch_size: int, *, threads: int = 1,
               runs: int = 20) -> tuple[float, float]:
    """Median onnxruntime latency (ms per batch of ``batch_size``) of both models, interleaved.

    The batch is the first ``batch_size`` samples of ``data``, repeated when the data holds fewer.
    """
    feed = next(data.batches(batch_size))
    feed.pop(LABELS, None)
    if any(len(feed[name]) < batch_size for name in data.batched):
        reps = -(-batch_size // len(data))
        feed = {k: (np.concatenate([v] * reps)[:batch_size] if k in data.batched else v) for k, v in feed.items()}
    sessions = open_session(original, threads), open_session(compressed, threads)
    first, second = _latencies(sessions, [feed], runs)
    return first, second


def _latencies(
    sessions: tuple[ort.InferenceSession, ...], feeds: list[dict[str, np.ndarray]], runs: int
) -> list[float]:
    for session in sessions:
        for _ in range(_WARMUP_RUNS):
            session.run(None, feeds[0])
    times: list[list[float]] = [[] for _ in sessions]
    for i in range(runs):
        feed = feeds[i % len(feeds)]
        # Alternate which model goes first so cache and clock effects fall on both alike.
        order = range(len(sessions)) if i % 2 == 0 else reversed(range(len(sessions)))
        for j in order:
            start = time.perf_counter()
            sessions[j].run(None, feed)
            times[j].append(time.perf_counter() - start)
    return [statistics.median(t) * 1000.0 for t in times]


def _model_stats(path: Path, model: onnx.ModelProto, accuracy: float | None, latency: float | None) -> ModelStats:
    files = model_files(path)
    parameters, nonzeros = count_weights(model)
    return ModelStats(
        path=str(path),
        files=tuple(str(f) for f in files),
        bytes=sum(f.stat().st_size for f in files),
        gzip_bytes=sum(gzip_size(f) for f in files),
        parameters=parameters,
        nonzeros=nonzeros,
        accuracy=accuracy,
        latency_ms=latency,
    )
