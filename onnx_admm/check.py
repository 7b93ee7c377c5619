"""Pre-flight check for pipelines: can this model be imported, trained and written back faithfully?

Steps, each PASS/FAIL with the measured figure:
1. import through the normalize pass and onnx2torch (saying which outputs are trained and which are
   passed through, and any baked batch size made dynamic);
2. the torch module matches onnxruntime on the given (or synthesized) inputs;
3. one backward pass reaches every trainable parameter;
4. perturbed weights written back run in onnxruntime exactly like the torch module holding them
   (when they do not within the tolerance, the torch module's own float32-vs-float64 difference at those
   weights tells float amplification, allowed up to ``AMPLIFIED`` times it, from a write-back fault);
5. unchanged weights written back leave every tensor byte-identical (and graph I/O and node names).

A model quantized by onnxruntime's quantizer is imported as its float form (``converters.quantized``):
steps 2-5 run on that float graph (what compress writes into), and one more step compares it with the
quantized file in onnxruntime: their mean difference within ``QUANTIZED_RTOL`` of the output's mean magnitude
(the activation rounding the float form no longer does). That step is gated only on inputs the user gives: synthesized
N(0, 1) inputs fall outside the ranges the quantizer calibrated on, where the quantized model saturates
(measured: 34% of max|output| on the digits CNN, 6% on its test images), so there the figure is shown
but does not fail the check.

A model exported with a fixed batch b is checked at a batch size that differs from b (3 for b = 1,
else 2b): the torch module runs it at once, while onnxruntime runs the original, which only takes b,
in chunks of b whose outputs are concatenated along each output's batch axis. When only part of the
graph converts, onnxruntime is asked for the trained tensors themselves (added as outputs of a copy).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch

from onnx_admm.converters.branches import fold_branches, weighted_ifs
from onnx_admm.converters.errors import UserError, first_line
from onnx_admm.converters.graphinfo import constant_sources, tensor_value
from onnx_admm.converters.importer import ImportedModel, import_model, join_chunks
from onnx_admm.converters.inputs import synthesize_inputs
from onnx_admm.converters.modelio import load_model, save_model, scratch_dir
from onnx_admm.converters.encoders import QuantSpec
from onnx_admm.converters.writeback import write_back
from onnx_admm.quantizers import quantize
from onnx_admm.signs import Binary

logger = logging.getLogger(__name__)

# torch vs onnxruntime on the same float32 weights: kernels differ in summation order, so allow a
# small absolute error plus a relative one scaled by the output magnitude.
ATOL = 1e-4
RTOL = 1e-4
# A float16 output: the same summation-order differences come in float16's steps (eps 9.8e-4, float32's 1.2e-7).
HALF_ATOL, HALF_RTOL = 1e-3, 1e-2
# The float form of an onnxruntime-quantized model against the quantized file, mean |difference| over mean
# |output|: int8 activation rounding moved the outputs of the test models (LeNet-5, a transformer layer, dynamic /
# QDQ / QOperator) by up to 6% of max|output|, a QDQ text detector's map by 4% on the mean (40% at one pixel).
QUANTIZED_RTOL = 0.1
# Beyond this mean |difference| over mean |output| between a quantized file's fused int8 kernels and its graph
# run as written, the dequantized step says the kernels are off on this CPU (saturation without VNNI).
KERNEL_NOTE = 0.02
# Perturbed weights can make a model amplify float32 rounding (a LayerNorm over a near-zero variance):
# onnxruntime's float32 result may then differ from torch's by a few times torch's own float32-vs-float64
# error; a write-back fault (a wrong, transposed or misplaced tensor) differs by far more.
AMPLIFIED = 10.0
# Sizes tried, smallest first, for the dynamic dims other than the batch of synthesized inputs: a network
# that downsamples by 32 and upsamples back to add the two (a detector's FPN) runs only at multiples of 32.
PROBE_SIZES = (8, 32, 64, 128)


@dataclass
class Step:
    name: str
    passed: bool
    detail: str
    value: float | None = None
    # Measured but not judged (e.g. the quantized comparison on synthesized inputs): shown as SKIP,
    # never as PASS, and it does not fail the check.
    skipped: bool = False

    @property
    def status(self) -> str:
        return "SKIP" if self.skipped else "PASS" if self.passed else "FAIL"


@dataclass
class CheckReport:
    model: str
    steps: list[Step] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.steps) and all(s.passed for s in self.steps)

    def to_dict(self) -> dict:
        return {"model": self.model, "passed": self.passed, "steps": [asdict(s) for s in self.steps]}

    def format(self) -> str:
        lines = [f"check {self.model}"]
        lines += [f"  {s.status}  {s.name:<22} {s.detail}" for s in self.steps]
        lines.append("all checks passed" if self.passed else "check FAILED")
        return "\n".join(lines)


def _difference(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """|x - y| in float64, 0 where both are NaN or equal infinities: a NaN both runtimes compute at the same place
    (a MeanVarianceNormalization of a constant channel is 0 / 0 in onnxruntime) is agreement, not a fault."""
    x, y = np.atleast_1d(np.asarray(x, np.float64)), np.atleast_1d(np.asarray(y, np.float64))  # a scalar output too
    with np.errstate(invalid="ignore"):
        diff = np.abs(x - y)
    diff[(np.isnan(x) & np.isnan(y)) | (np.isinf(x) & (x == y))] = 0.0
    return diff


def max_abs_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """Largest absolute difference over paired float outputs (0.0 when there are none; ``_difference``)."""
    diffs = [float(np.max(_difference(x, y))) if x.size else 0.0
             for x, y in zip(a, b) if np.issubdtype(np.asarray(x).dtype, np.floating)]
    return max(diffs, default=0.0)


def within_tolerance(reference: list[np.ndarray], other: list[np.ndarray],
                     extra: list[float] | None = None, half: bool = False) -> tuple[bool, float]:
    """Outputs agree within ATOL + RTOL * max|reference| (HALF_ATOL / HALF_RTOL for float16 outputs, and for every
    output where ``half``: a model that computes in float16 inside float32 inputs and outputs; + ``extra[i]`` on
    output i; non-float outputs must be equal)."""
    ok = True
    for i, (ref, got) in enumerate(zip(reference, other)):
        if ref.shape != got.shape:
            return False, float("inf")
        if np.issubdtype(ref.dtype, np.floating):
            finite = np.abs(ref[np.isfinite(ref)])
            scale = float(np.max(finite)) if finite.size else 0.0
            slack = extra[i] if extra is not None else 0.0
            in_half = half or np.float16 in (ref.dtype, np.asarray(got).dtype)
            atol, rtol = (HALF_ATOL, HALF_RTOL) if in_half else (ATOL, RTOL)
            ok &= bool(np.all(_difference(ref, got) <= atol + rtol * scale + slack))
        else:
            ok &= bool(np.array_equal(ref, got))
    return ok, max_abs_diff(reference, other)


def check(model_path: str | Path, feeds: dict[str, np.ndarray] | None = None, seed: int = 0) -> CheckReport:
    """Run every step; stops after the first failure that makes the rest meaningless.

    Args:
        model_path: the ONNX file (external data next to it).
        feeds: inputs keyed by graph input name; synthesized from the graph when None.
        seed: seed for synthesized inputs and perturbations.
    """
    model_path = Path(model_path)
    report = CheckReport(str(model_path))
    original = load_model(model_path)
    try:
        chooser = weighted_ifs(original)[:1] if feeds is None else []
        if chooser:
            raise UserError(f"If {chooser[0].name!r} chooses the network that runs from the inputs: pass --data "
                            "with the inputs you will compress with (they choose its branch)")
        # An If that reads weights is checked as the branch the inputs take (converters.branches).
        original, folding = fold_branches(original, [feeds] if feeds is not None else [])
        imported = import_model(original)
    except UserError as exc:
        report.steps.append(Step("import", False, str(exc)))
        return report
    n_params = sum(p.numel() for p in imported.module.parameters() if p.requires_grad)
    batch = check_batch_size(imported)
    report.steps.append(Step("import", True, "; ".join(_import_facts(imported, n_params, batch, feeds is None))))
    synthesized = feeds is None
    if feeds is None:
        feeds = _synthesized_feeds(_with_dynamic_batch(original, imported), model_path, imported, batch, seed)
    elif imported.ort_batch is not None:
        feeds = _whole_chunks(feeds, imported)
    with scratch_dir() as tmp:
        graph, graph_path = original, model_path
        if folding is not None:
            graph_path = Path(tmp) / "folded.onnx"
            save_model(graph, graph_path)
            report.steps.append(Step("If folded", True, "checked as " + "; ".join(folding.describe())))
        if imported.dequantized:
            graph, graph_path = imported.original, Path(tmp) / "dequantized.onnx"
            save_model(graph, graph_path)
            report.steps.append(_check_dequantized(graph_path, model_path, feeds, imported, gated=not synthesized))
        reference = trained_outputs_in_onnxruntime(graph, graph_path, feeds, imported, Path(tmp))
        ok, diff = within_tolerance(reference, imported.run(feeds), half=_computes_in_half(imported))
        report.steps.append(Step("torch vs onnxruntime", ok, f"max abs diff {diff:.3g}", diff))
        report.steps.append(_check_backward(imported, feeds))
        report.steps.append(_check_perturbed(imported, feeds, Path(tmp), seed))
        report.steps.append(_check_binary(imported, feeds, Path(tmp)))
        report.steps.append(_check_unchanged(graph, Path(tmp)))
    return report


def _synthesized_feeds(model: onnx.ModelProto, path: Path, imported: ImportedModel, batch: int,
                       seed: int) -> dict[str, np.ndarray]:
    """Synthesized inputs the model at ``path`` runs on in onnxruntime: its dynamic dims other than the
    batch at the first of ``PROBE_SIZES`` that runs; when none does, a UserError asking for --data."""
    failure, tried = None, []
    for size in PROBE_SIZES:
        feeds = synthesize_inputs(model, batch=batch, seed=seed, other=size)
        if tried and all(feeds[name].shape == shape for name, shape in tried[0][1].items()):
            # No dynamic dim besides the batch: onnxruntime's line says what is wrong, with the shapes, or the
            # synthesized values are (an unknown category of a OneHotEncoder).
            raise UserError(f"{failure}; if the values matter (categories, token ids), pass inputs the model runs on "
                            "with --data (an .npz keyed by input name)")
        tried.append((size, {name: array.shape for name, array in feeds.items()}))
        try:
            run_batched(path, feeds, imported)
        except UserError as exc:
            failure = failure or exc
            continue
        if size != PROBE_SIZES[0]:
            logger.info("synthesized inputs: the dynamic dims at %d (onnxruntime failed at %s)", size,
                        ", ".join(str(s) for s, _ in tried[:-1]))
        return feeds
    sizes = ", ".join(str(size) for size, _ in tried)
    raise UserError(f"{failure}; synthesized inputs with dynamic dims at {sizes} do not fit this model: pass inputs "
                    "it runs on with --data (an .npz keyed by input name)")


def _check_dequantized(float_path: Path, quantized_path: Path, feeds: dict[str, np.ndarray],
                       imported: ImportedModel, gated: bool) -> Step:
    """The float form against the quantized file, both in onnxruntime; fails only when ``gated`` (module doc).
    Gated on the mean difference relative to the mean magnitude: the quantizer's own rounding can move a single
    element far (a text detector's map: 0.4 at one pixel, as far from the float model it was made from), a
    wrong scale or zero point moves every element.

    The quantized file is run as its graph says (no fusions: DequantizeLinear, the float op, QuantizeLinear),
    and as onnxruntime deploys it. On x86 CPUs without VNNI the fused int8 kernels sum pairs of 8-bit products
    in 16 bits and saturate (onnxruntime's quantize_static digits CNN: 0.106 x mean|output| off its own graph on
    an AVX2 AMD EPYC); the float form follows the graph, and the step says how far the kernels are off it."""
    ours = run_batched(float_path, feeds, imported)
    graph = run_batched(quantized_path, feeds, imported, fused=False)
    deployed = run_batched(quantized_path, feeds, imported)
    ok, worst, widest, kernels = True, 0.0, 0.0, 0.0
    for a, b, c in zip(ours, graph, deployed):
        rel = relative_mean_diff(b, a)
        if rel is not None:
            widest = max(widest, float(np.abs(a.astype(np.float64) - b).max()) / (float(np.max(np.abs(b))) or 1.0))
            worst = max(worst, rel)
            ok &= rel <= QUANTIZED_RTOL
            kernels = max(kernels, relative_mean_diff(b, c) or 0.0)
    replaced = "; ".join(imported.dequantized[:3]) + (f" (+{len(imported.dequantized) - 3} more)"
                                                      if len(imported.dequantized) > 3 else "")
    limit = f"tolerance {QUANTIZED_RTOL}" if gated else "not gated on synthesized inputs: pass --data to check it"
    off = (f"; onnxruntime's fused int8 kernels on this CPU are {kernels:.3g} x mean|output| off the graph's own "
           "math (8-bit products saturate on x86 CPUs without VNNI)" if kernels > KERNEL_NOTE else "")
    return Step("dequantized", ok or not gated, f"float form vs quantized file: mean abs diff {worst:.3g} x "
                                                f"mean|output| ({limit}), max {widest:.3g} x max|output|; replaced "
                                                f"{replaced}{off}", worst, skipped=not gated)


def relative_mean_diff(reference: object, other: object) -> float | None:
    """Mean |difference| over mean |reference| of a float output (None for another kind, or an empty one): a
    fault that moves every element shows in it, rounding that moves a few elements far does not."""
    if not (isinstance(reference, np.ndarray) and np.issubdtype(reference.dtype, np.floating) and reference.size):
        return None
    diff = float(np.abs(reference.astype(np.float64) - np.asarray(other, np.float64)).mean())
    return diff / (float(np.mean(np.abs(reference))) or 1.0)


def check_batch_size(imported: ImportedModel) -> int:
    """The batch ``check`` synthesizes: 2, or for a fixed batch b a multiple of b that is not b."""
    b = imported.ort_batch
    return 2 if b is None else (3 if b == 1 else 2 * b)


def _import_facts(imported: ImportedModel, n_params: int, batch: int, synthesized: bool) -> list[str]:
    facts = [f"{len(imported.weights)} trainable tensors ({n_params} values), "
             f"{len(imported.compressible())} compressible weights"]
    if imported.dequantized:
        facts.append(f"quantized by onnxruntime: imported as its float form ({len(imported.dequantized)} "
                     "replacements, see inspect)")
    if imported.passed_through:
        facts.append(f"trains {', '.join(imported.output_names)}; passes through {', '.join(imported.passed_through)} "
                     "(computed from them by the unconverted part of the graph)")
    if imported.baked_batch is not None:
        where = f"checked at batch {batch}" if synthesized else "checked on the given inputs"
        facts.append(f"fixed batch {imported.baked_batch} made dynamic, {where} (onnxruntime in chunks of "
                     f"{imported.baked_batch})")
    if imported.fixed_batch is not None:
        where = f"checked on {batch} samples" if synthesized else "checked on the given inputs"
        facts.append(f"runs only at its fixed batch {imported.fixed_batch} ({imported.fixed_batch_reason}): torch "
                     f"and onnxruntime run in chunks of {imported.fixed_batch}, {where}")
    return facts


def _with_dynamic_batch(original: onnx.ModelProto, imported: ImportedModel) -> onnx.ModelProto:
    """The original's graph inputs, with the baked batch dims symbolic (what ``synthesize_inputs`` reads)."""
    if imported.ort_batch is None:
        return original
    view = onnx.ModelProto()
    view.graph.input.extend(original.graph.input)
    for tensor in original.graph.initializer:
        view.graph.initializer.add(name=tensor.name)  # names only: graph_inputs skips initializers
    for value in view.graph.input:
        if value.name in imported.batch_axes:
            dim = value.type.tensor_type.shape.dim[imported.batch_axes[value.name]]
            dim.Clear()
            dim.dim_param = "batch"
    return view


def _whole_chunks(feeds: dict[str, np.ndarray], imported: ImportedModel) -> dict[str, np.ndarray]:
    """Given inputs cut to a whole number of fixed batches, so onnxruntime can run every sample."""
    b = imported.ort_batch
    n = min(len(feeds[name]) for name in imported.batch_axes if name in feeds)
    if n < b:
        raise UserError(f"the model runs in onnxruntime only at its fixed batch size {b}; pass at least {b} samples")
    return {k: v[: n - n % b] if k in imported.batch_axes else v for k, v in feeds.items()}


def trained_outputs_in_onnxruntime(
    model: onnx.ModelProto, path: Path, feeds: dict[str, np.ndarray], imported: ImportedModel, tmp: Path
) -> list[np.ndarray]:
    """What onnxruntime computes for ``imported.output_names`` on ``model`` (saved at ``path``).

    Tensors that are not graph outputs are exposed through a copy saved in ``tmp``; a baked batch
    runs in chunks of that batch (module doc).
    """
    if [o.name for o in model.graph.output] != imported.output_names:
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        del probe.graph.output[:]
        probe.graph.output.extend(imported.normalized.graph.output)
        path = tmp / "probe.onnx"
        save_model(probe, path)
    return run_batched(path, feeds, imported)


def run_batched(path: Path, feeds: dict[str, np.ndarray], imported: ImportedModel,
                fused: bool = True) -> list[np.ndarray]:
    """All outputs of the model at ``path``, run in chunks of the fixed batch size when there is one
    (``fused``: validate.open_session's)."""
    from onnx_admm.validate import open_session, run_session

    session = open_session(path, 1, exact=True, fused=fused)
    names = [o.name for o in session.get_outputs()]
    b = imported.ort_batch
    if b is None:
        return list(run_session(session, path, names, feeds).values())
    n = min(len(feeds[name]) for name in imported.batch_axes if name in feeds)
    chunks = [list(run_session(session, path, names,
                               {k: v[i:i + b] if k in imported.batch_axes else v for k, v in feeds.items()}).values())
              for i in range(0, n, b)]
    return [join_chunks([c[j] for c in chunks], imported.batch_axes.get(name, 0))
            if isinstance(chunks[0][j], np.ndarray) else sum((list(c[j]) for c in chunks), [])  # ZipMap: lists
            for j, name in enumerate(names)]


def _check_backward(imported: ImportedModel, feeds: dict[str, np.ndarray]) -> Step:
    if not imported.weights:
        return Step("backward", False, "the model has no trainable tensor (no constant weight feeds a converted op)")
    module = imported.module
    module.zero_grad(set_to_none=True)
    args = [torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in imported.input_names]
    outputs = [o for o in module(*args) if o.is_floating_point()]
    if not outputs:
        return Step("backward", False, "the model has no float output to train on")
    outputs = [o for o in outputs if o.requires_grad]
    if not outputs:
        return Step("backward", False, "no output the model trains on depends on a trainable tensor")
    sum(o.float().pow(2).mean() for o in outputs).backward()
    missing = [e.onnx_name for e in imported.weights if imported.parameter(e).grad is None]
    module.zero_grad(set_to_none=True)
    if missing:
        return Step("backward", False, f"no gradient reaches {len(missing)} tensors, e.g. {missing[0]}")
    return Step("backward", True, f"gradients reach all {len(imported.weights)} trainable tensors")


def _computes_in_half(imported: ImportedModel) -> bool:
    """Whether a trained weight is float16 or bfloat16 (onnxconverter-common's float16 conversion keeps float32
    inputs and outputs with ``keep_io_types``): the graph then rounds in half precision's steps inside."""
    return any(imported.parameter(e).dtype in (torch.float16, torch.bfloat16) for e in imported.weights)


def _check_perturbed(imported: ImportedModel, feeds: dict[str, np.ndarray], tmp: Path, seed: int) -> Step:
    generator = torch.Generator().manual_seed(seed)

    def perturb(entry, p: torch.Tensor) -> None:
        p.add_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.1 * (p.std() if p.numel() > 1 else 1.0))
        if entry.compressible:  # zero most of it, so the sparse encoder is exercised too
            keep = torch.rand(p.shape, generator=generator) < 0.1
            p.mul_(keep.to(p.dtype))

    return _check_written("perturbed write-back", imported, feeds, tmp, perturb)


def _check_binary(imported: ImportedModel, feeds: dict[str, np.ndarray], tmp: Path) -> Step:
    """Every compressible weight on binary levels (sign x mean |w| per output channel, as ``--binary`` makes
    them), stored as integers (int2 + DequantizeLinear, or the container write-back picks): a runtime that reads
    the integers otherwise fails here, before a compress does (onnxruntime 1.32 fuses DequantizeLinear + MatMul
    into MatMulNBits and misread int2 weights whose N % 4 != 0; write-back now stores those as int4)."""

    def binarize(entry, p: torch.Tensor) -> QuantSpec | None:
        if not entry.compressible or p.numel() < 2:
            return None
        out = entry.scale_axis if p.dim() >= 2 else None
        qt = quantize(Binary(per_channel=out is not None, axis=out or 0), p)
        p.copy_(qt.dequantize())
        return entry.layout.quant_spec(qt.bits, qt.scale.cpu().numpy(), qt.axis, p.dim())

    return _check_written("binary write-back", imported, feeds, tmp, binarize)


def _check_written(name: str, imported: ImportedModel, feeds: dict[str, np.ndarray], tmp: Path,
                   change: Callable[..., QuantSpec | None]) -> Step:
    """The weights changed in torch by ``change(entry, parameter)`` (which returns how it quantized them, if
    it did), written back into the original graph and run in onnxruntime: the same outputs as torch."""
    saved = {e.param: imported.parameter(e).detach().clone() for e in imported.weights}
    quant: dict[str, QuantSpec] = {}
    try:
        with torch.no_grad():
            for entry in imported.weights:
                spec = change(entry, imported.parameter(entry))
                if spec is not None:
                    quant[entry.param] = spec
        expected = imported.run(feeds)
        result = write_back(imported.original, imported.updates(quant=quant))
        path = tmp / f"{name.split()[0]}.onnx"
        save_model(result.model, path)
        refused = _checker_complaint(path, imported.original)
        if refused:
            return Step(name, False, f"onnx's checker refuses the written model: {refused}")
        got = trained_outputs_in_onnxruntime(result.model, path, feeds, imported, tmp)
        if imported.passed_through:
            run_batched(path, feeds, imported)  # the passed-through outputs still compute
        half = _computes_in_half(imported)
        ok, diff = within_tolerance(expected, got, half=half)
        amplified = ""
        if not ok:
            # Is the difference float32 rounding the changed weights amplify (LayerNorm over a tiny
            # variance, cancellation) or a write-back fault? Rounding shows up as torch's own float32
            # result against float64 at the same weights; a wrong tensor moves the outputs far more.
            noise = float32_noise(imported, feeds, expected)
            if noise is not None:
                ok = within_tolerance(expected, got, [AMPLIFIED * n for n in noise], half=half)[0]
                amplified = (f"; torch's own float32 vs float64 at these weights differ by up to {max(noise):.3g}: "
                             + ("float amplification, not a write-back fault" if ok else
                                f"more than {AMPLIFIED:g}x that, a write-back fault or onnxruntime "
                                "reading the stored weights otherwise"))
    finally:
        with torch.no_grad():
            for entry in imported.weights:
                imported.parameter(entry).copy_(saved[entry.param])
    kinds = sorted(set(result.encodings.values()))
    passed = f"; passed-through {', '.join(imported.passed_through)} run" if imported.passed_through else ""
    return Step(name, ok, f"max abs diff {diff:.3g} (encodings: {', '.join(kinds) or 'none'}){passed}{amplified}", diff)


def _checker_complaint(path: Path, original: onnx.ModelProto) -> str | None:
    """What onnx's checker says against the written model at ``path``, unless it says the same against the
    original (a graph output declared without a shape, say: onnxruntime runs such files, so the write-back
    is not judged by it)."""
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        complaint = first_line(exc)
        try:
            onnx.checker.check_model(original)
        except onnx.checker.ValidationError as before:
            return None if first_line(before) == complaint else complaint
        except ValueError:  # a proto over 2 GB: only its file could be checked
            return complaint
        return complaint
    return None


def float32_noise(imported: ImportedModel, feeds: dict[str, np.ndarray], float32: list[np.ndarray]) -> list[float] | None:
    """Per output, max |float32 - float64| of the torch module at its current weights (None when the
    module does not run in float64)."""
    module = imported.module
    args = [torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in imported.input_names]
    args = [a.double() if a.is_floating_point() else a for a in args]
    try:
        module.double()
        with torch.no_grad():
            wide = [o.detach().numpy() for o in module(*args)]
    except (RuntimeError, TypeError, ValueError) as exc:  # a converter that builds float32 tensors itself
        logger.info("float64 run of the module failed (%s): no rounding estimate", exc)
        return None
    finally:
        module.float()
    return [float(np.max(np.abs(a.astype(np.float64) - w))) if np.issubdtype(a.dtype, np.floating) and a.size else 0.0
            for a, w in zip(float32, wide)]


def _check_unchanged(original: onnx.ModelProto, tmp: Path) -> Step:
    # A fresh import, so nothing a previous step did to the module can leak in.
    imported = import_model(original)
    result = write_back(original, imported.updates())
    path = tmp / "unchanged.onnx"
    save_model(result.model, path)
    written = load_model(path)
    problems = _structural_differences(original, written)
    if result.encodings:
        problems.append(f"{len(result.encodings)} tensors rewritten")
    if problems:
        return Step("unchanged write-back", False, "; ".join(problems[:3]))
    return Step("unchanged write-back", True, "graph I/O, node names and every tensor byte-identical")


def _tensor_bytes(model: onnx.ModelProto) -> dict[str, bytes]:
    return {name: tensor_value(model, src).tobytes() for name, src in constant_sources(model).items()}


def _structural_differences(a: onnx.ModelProto, b: onnx.ModelProto) -> list[str]:
    problems = []
    if [i.SerializeToString() for i in a.graph.input] != [i.SerializeToString() for i in b.graph.input]:
        problems.append("graph inputs differ")
    if [o.SerializeToString() for o in a.graph.output] != [o.SerializeToString() for o in b.graph.output]:
        problems.append("graph outputs differ")
    if [n.name for n in a.graph.node] != [n.name for n in b.graph.node]:
        problems.append("node names differ")
    ta, tb = _tensor_bytes(a), _tensor_bytes(b)
    changed = [k for k in ta if ta[k] != tb.get(k)]
    if changed:
        problems.append(f"{len(changed)} tensors differ, e.g. {changed[0]}")
    return problems
