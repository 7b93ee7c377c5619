"""Memory: the process's peak resident set per phase, and the batch size a model's activations allow.

Peak RSS. On Linux the kernel keeps the peak (``VmHWM`` in ``/proc/self/status``) and resets it to
the current RSS when "5" is written to ``/proc/self/clear_refs``; ``PeakMemory`` reads and resets it
at every phase boundary, so each phase gets its own peak. Where that file cannot be written (another
OS, a locked-down container) it falls back to ``resource.getrusage``'s ``ru_maxrss``, a peak that
only grows: a phase then reads the peak of the run so far, and the report's ``method`` says so. The
reset also resets what ``getrusage`` and ``/usr/bin/time -v`` read as the process's maximum RSS (the
kernel keeps one peak): the run's peak is the largest phase peak (``PeakMemory.peak_mb``).

Batch size. A training step holds, per sample, the inputs, every activation the forward pass saves
for the backward pass, their gradients while the backward pass runs and the teacher's forward pass
(``training_bytes``); onnxruntime holds the activations of one forward pass per model
(``inference_bytes``). Both are estimated up front from the ONNX graph's inferred shapes
(``activation_bytes``: no run needed); ``fit_batch`` gives the largest batch within the budget
(default ``default_budget_mb``: a quarter of the memory available at start, at most
``MAX_BUDGET_MB``), which compress uses as the chunk a training step's samples go through. The
estimate errs high (every tensor a node computes counted as alive at once in the training step; on
samples/eeg at width 32, 43 MB estimated per sample against 26.5 MB measured; in onnxruntime, 23 MB
against about 12.5 at width 64): a smaller chunk costs some speed, an out-of-memory kill costs the run.
"""

from __future__ import annotations

import logging
import resource
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

logger = logging.getLogger(__name__)

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_MEMINFO = Path("/proc/meminfo")

# The automatic batch budget: this fraction of the memory available when the run starts, at most
# MAX_BUDGET_MB (a batch larger than that rarely trains faster per sample on a CPU, and the machine
# is often shared), at least MIN_BUDGET_MB.
BUDGET_FRACTION = 0.25
MAX_BUDGET_MB = 1024.0
MIN_BUDGET_MB = 64.0
# Validation runs in this share of the budget: onnxruntime's time per sample hardly improves past a few
# samples per run, so a large validation batch buys nothing.
INFERENCE_SHARE = 0.5

METHOD_RESET = "VmHWM per phase (/proc/self/status, reset through /proc/self/clear_refs)"
METHOD_MONOTONE = ("ru_maxrss (resource.getrusage): the peak of the run up to the end of each phase, since the "
                   "per-phase reset (/proc/self/clear_refs) is not available here")


def _status_kb(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _maxrss_mb() -> float:
    # ru_maxrss is in KiB on Linux, in bytes on macOS.
    scale = 1024 * 1024 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def current_rss_mb() -> float | None:
    """The resident set now (``VmRSS``), or None where /proc is missing."""
    kb = _status_kb("VmRSS")
    return None if kb is None else kb / 1024


def peak_rss_mb() -> float:
    """The peak resident set since the last reset (``VmHWM``), else the run's peak (``ru_maxrss``)."""
    kb = _status_kb("VmHWM")
    return kb / 1024 if kb is not None else _maxrss_mb()


def reset_peak() -> bool:
    """Reset the kernel's peak to the current RSS; False where that is not permitted."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return _status_kb("VmHWM") is not None


class PeakMemory:
    """The peak RSS of each phase of a run: ``mark(name)`` records the peak since the previous mark.

    Created at the start of the run (the first phase's peak counts from there, imports included).
    """

    def __init__(self) -> None:
        self.resets = reset_peak()
        self.peaks: dict[str, float] = {}

    @property
    def method(self) -> str:
        return METHOD_RESET if self.resets else METHOD_MONOTONE

    def mark(self, phase: str) -> float:
        """Record ``phase``'s peak in MB and start the next phase's count."""
        peak = peak_rss_mb() if self.resets else _maxrss_mb()
        self.peaks[phase] = peak
        if self.resets:
            self.resets = reset_peak()
        logger.debug("peak RSS of %s: %.0f MB", phase, peak)
        return peak

    @property
    def peak_mb(self) -> float:
        """The run's peak so far: the largest phase peak, or the current phase's."""
        return max([*self.peaks.values(), peak_rss_mb() if self.resets else _maxrss_mb()])

    def to_dict(self) -> dict:
        """The report's ``memory``: ``peak_rss_mb`` per phase, in order, and the ``method``."""
        return {"peak_rss_mb": dict(self.peaks), "method": self.method}


def available_mb() -> float | None:
    """``MemAvailable`` of /proc/meminfo in MB, or None where it is missing."""
    try:
        for line in _MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def default_budget_mb() -> float:
    """The automatic batch budget: BUDGET_FRACTION of the available memory, within [MIN, MAX]_BUDGET_MB."""
    available = available_mb()
    if available is None:
        return MAX_BUDGET_MB
    return min(MAX_BUDGET_MB, max(MIN_BUDGET_MB, BUDGET_FRACTION * available))


@dataclass(frozen=True)
class Activations:
    """Per-sample bytes of a graph's tensors, from its inferred shapes.

    ``inputs``: the graph inputs; ``total``: every tensor a node computes (graph outputs included);
    ``largest``: the largest of those; ``live``: the most bytes alive at once when each tensor is freed
    after its last reader, in the graph's node order (what a runtime's memory planner holds);
    ``unknown``: how many computed tensors have no usable shape (not counted: the estimate is low by
    what they hold).
    """

    inputs: int
    total: int
    largest: int
    live: int
    unknown: int


def activation_bytes(model: onnx.ModelProto) -> Activations:
    """Per-sample bytes of the tensors of ``model``, whose first axis is the sample axis.

    A tensor counts per sample when its first dim is the graph's batch dim (symbolic, or the fixed
    size the inputs share); the bytes of one sample are the product of the other dims times the
    element size. Shapes come from ONNX shape inference (the model is not run).
    """
    light, weights = _without_large_weights(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False)
    except Exception as exc:  # shape inference raises assorted errors on exporters' odd graphs
        logger.debug("shape inference failed (%s); using the shapes the graph declares", exc)
        inferred = light
    graph = inferred.graph
    initializers = {t.name for t in graph.initializer} | weights
    inputs = [v for v in graph.input if v.name not in initializers]
    batch_dims = {_first_dim(v) for v in inputs} - {None}
    typed = {v.name: v for v in (*graph.value_info, *graph.output)}

    def per_sample(value: onnx.ValueInfoProto | None) -> int | None:
        if value is None or not value.type.HasField("tensor_type"):
            return None
        tensor = value.type.tensor_type
        dims = tensor.shape.dim if tensor.HasField("shape") else None
        if not dims or _first_dim(value) not in batch_dims:
            return None
        rest = [d.dim_value if d.HasField("dim_value") else None for d in dims[1:]]
        if any(d is None for d in rest):
            return None
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)).itemsize
        return int(np.prod(rest, dtype=np.int64)) * itemsize

    input_bytes = sum(per_sample(v) or 0 for v in inputs)
    last_read = {name: i for i, node in enumerate(graph.node) for name in node.input}
    kept = {v.name for v in graph.output}
    sizes, unknown, alive, live = {}, 0, 0, 0
    for i, node in enumerate(graph.node):
        for name in node.output:
            if not name:
                continue
            size = per_sample(typed.get(name))
            if size is None:
                unknown += 1
                continue
            sizes[name] = size
            alive += size
        live = max(live, alive)
        # Freed after their last reader, or at once when nothing reads them; graph outputs stay.
        for name in {*node.input, *node.output}:
            if name in sizes and name not in kept and last_read.get(name, i) <= i:
                alive -= sizes.pop(name)
    values = [per_sample(typed.get(name)) for node in graph.node for name in node.output if name]
    values = [v for v in values if v is not None]
    return Activations(input_bytes, sum(values), max(values, default=0), live, unknown)


# Initializers up to this size stay in the copy shape inference reads (a Reshape's shape, a Slice's
# bounds are needed by value); larger ones become typed inputs.
_SMALL_INITIALIZER = 4096


def _without_large_weights(model: onnx.ModelProto) -> tuple[onnx.ModelProto, set[str]]:
    """The graph with its large initializers declared as typed inputs (their shapes, not their values), and
    their names: shape inference serialises the model it reads, which would copy every weight twice."""
    graph = model.graph
    large = [t for t in graph.initializer if t.ByteSize() > _SMALL_INITIALIZER]
    names = {t.name for t in large}
    light = onnx.ModelProto(ir_version=model.ir_version, opset_import=model.opset_import, functions=model.functions)
    light.graph.name = graph.name
    light.graph.node.extend(graph.node)
    light.graph.input.extend(graph.input)
    declared = {i.name for i in graph.input}
    light.graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, t.dims)
                             for t in large if t.name not in declared)
    light.graph.output.extend(graph.output)
    light.graph.value_info.extend(graph.value_info)
    light.graph.initializer.extend(t for t in graph.initializer if t.name not in names)
    light.graph.sparse_initializer.extend(graph.sparse_initializer)
    return light, names


def _first_dim(value: onnx.ValueInfoProto) -> str | int | None:
    tensor = value.type.tensor_type if value.type.HasField("tensor_type") else None
    if tensor is None or not tensor.HasField("shape") or not tensor.shape.dim:
        return None
    dim = tensor.shape.dim[0]
    if dim.HasField("dim_param"):
        return dim.dim_param
    return dim.dim_value if dim.HasField("dim_value") else None


def training_bytes(act: Activations, teacher: bool) -> int:
    """Per-sample bytes of one training step: the batch's inputs (the feed and its tensor), the forward
    activations autograd keeps (about every tensor the graph computes: an op saves its input or output),
    the gradients the backward pass holds at once (two of the largest tensors), and the teacher's forward
    pass, whose intermediates are freed as it goes (its live set)."""
    return 2 * act.inputs + act.total + 2 * act.largest + (act.live if teacher else 0)


def inference_bytes(act: Activations) -> int:
    """Per-sample bytes of one onnxruntime run without its memory arena (``validate.open_session``): the
    feed, the live set of the memory plan and a convolution's workspace (im2col, about two of the largest
    tensors). Measured on samples/eeg at width 64: 15.7 MB per sample, estimated 20."""
    return act.inputs + act.live + 2 * act.largest


def fit_batch(requested: int, per_sample: int, budget_mb: float) -> int:
    """The largest batch up to ``requested`` whose ``per_sample`` bytes fit ``budget_mb`` (at least 1)."""
    if per_sample <= 0:
        return requested
    return max(1, min(requested, int(budget_mb * 2**20 // per_sample)))


def describe_mb(nbytes: float) -> str:
    return f"{nbytes / 2**20:,.0f} MB"
