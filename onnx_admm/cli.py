"""The ``onnx-admm`` command line: a thin click layer over the Python API.

Exit codes: 0 success; 1 bad input or a failed check; 2 usage error; 3 accuracy gate; 4 internal error (a
bug: one line, the traceback with -v); 130 interrupted by Ctrl-C, 143 by SIGTERM (compress saves the last
completed stage first). A signal
that arrives after the command has ended leaves its status as it was (``console``).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click

from onnx_admm.converters.errors import UserError
from onnx_admm import __version__
from onnx_admm.cli_analyze import analyze
from onnx_admm.gate import DEFAULT_FLOOR
from onnx_admm.schedule import ALLOCATIONS
from onnx_admm.signals import deferred, exit_status, ignore_signals, interrupts, pending_interrupt, signal_name

EXIT_GATE = 3  # AccuracyGateFailed.exit_status
EXIT_INTERNAL = 4
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


# What the commands import (torch, onnx, onnxruntime, onnx2torch and their C extensions), loaded before
# any command runs.
_LIBRARIES = ("onnx_admm.api", "onnx_admm.analyze", "onnx_admm.check", "onnx_admm.inspection", "onnx_admm.validate")


class _Command(click.Command):
    """Turn UserError into a one-line message and exit status 1, never a traceback."""

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        # Option callbacks import the libraries they check against (--device: torch and onnx): an interrupt
        # inside an extension's module init there segfaulted or aborted the process (1 child in 100 under
        # load). Parsing is otherwise instant, so signals wait for its end and land in the command's handling.
        with deferred():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx: click.Context) -> Any:
        # An interrupt raised inside an extension's initialisation can abort the process from C++ (std::terminate)
        # or leave a module half-built: the libraries load with signals held, which land when they are loaded.
        with deferred():
            for name in _LIBRARIES:
                importlib.import_module(name)
        try:
            return super().invoke(ctx)
        except UserError as exc:
            raise click.ClickException(str(exc)) from None


@contextmanager
def _signals_end_the_run() -> Iterator[None]:
    """Ctrl-C or SIGTERM inside the block ends the process with 130 or 143 and one line.

    Without it click would answer Ctrl-C with "Aborted!" and status 1, and SIGTERM would kill the process
    without a word. An interrupt that an extension's import swallowed, or turned into another error (a
    RecursionError in numpy's import machinery), counts as the interrupt it was.
    """
    try:
        yield
        interrupt = pending_interrupt()
    except KeyboardInterrupt as exc:
        interrupt = exc
        pending_interrupt()  # its signal is on the list too: taken off, it cannot stop a later run in this process
    except Exception as exc:
        interrupt = pending_interrupt()
        if interrupt is None:
            if isinstance(exc, (click.ClickException, click.exceptions.Exit, click.exceptions.Abort)):
                raise
            _internal_error(exc)
    if interrupt is not None:
        with deferred(deliver=False):  # a second signal must not cut the line short
            click.echo(f"interrupted by {signal_name(interrupt)}", err=True)
            sys.exit(exit_status(interrupt))


def _internal_error(exc: Exception) -> None:
    """End the run on an exception no input check foresaw: one line and status 4, so a pipeline tells a bug
    from bad input (1); with -v the traceback first, for the report."""
    import traceback

    from onnx_admm.converters.errors import first_line

    ctx = click.get_current_context(silent=True)
    if ctx is not None and ctx.find_root().params.get("verbose"):
        click.echo("".join(traceback.format_exception(exc)).rstrip(), err=True)
    kind, line = type(exc).__name__, first_line(exc)
    click.echo(f"internal error: {kind if line == kind else f'{kind}: {line}'} (a bug in onnx-admm, not in the input: "
               "rerun with -v for the traceback and report it with the command)", err=True)
    sys.exit(EXIT_INTERNAL)


@contextmanager
def _warnings_logged() -> Iterator[None]:
    """Library warnings (torch's, onnx2torch's UserWarnings) go to the log at INFO, shown with -v.

    Printed raw they would land on stderr in the middle of the progress display. The logger is
    ``py.warnings``, as ``logging.captureWarnings`` names it; the message keeps its category and origin.
    """
    logger = logging.getLogger("py.warnings")
    previous = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        logger.info("%s: %s (%s:%s)", category.__name__, message, filename, lineno)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous


class _Group(click.Group):
    """The command group. Signals are handled from the moment ``main`` runs: click's own ``main`` turns a
    KeyboardInterrupt into "Aborted!", so parsing (``make_context``) and the command (``invoke``) each get
    the handling inside it as well. Library warnings go to the log for the whole run."""

    command_class = _Command

    def main(self, *args: Any, **kwargs: Any) -> Any:
        # The handling outermost: a signal that lands while the handlers are being installed is caught too.
        with _signals_end_the_run(), interrupts(), _warnings_logged():
            return super().main(*args, **kwargs)

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        with _signals_end_the_run():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx: click.Context) -> Any:
        with _signals_end_the_run():
            return super().invoke(ctx)


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="onnx-admm")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def main(verbose: int) -> None:
    """Compress ONNX models with ADMM and write the result back into the original graph."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--filters", is_flag=True,
              help="Also list what filter pruning would cut: each layer's filters (a recurrent layer's hidden units, "
                   "attention heads) with the weights that lose them together, or why a layer keeps them.")
def inspect(model: str, as_json: bool, filters: bool) -> None:
    """List the compressible weights of MODEL, its score output, and anything that cannot be imported."""
    from onnx_admm.converters.modelio import json_safe
    from onnx_admm.inspection import format_inspection, inspect_model

    info = inspect_model(model, filters=filters)
    click.echo(json.dumps(json_safe(info), indent=2, allow_nan=False) if as_json else format_inspection(info))


def _load_feeds(model_path: str, data: str | None, n: int = 8) -> dict | None:
    if data is None:
        return None
    from onnx_admm.converters.graphinfo import graph_inputs
    from onnx_admm.converters.modelio import load_model
    from onnx_admm.data import LABELS
    from onnx_admm.sources import resolve_data

    specs = graph_inputs(load_model(model_path))
    feeds = resolve_data(data, specs).take(n).as_feed()
    feeds.pop(LABELS, None)
    return feeds


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--data", type=str, help="Inputs (.npz keyed by graph input names); synthesized when omitted.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def check(model: str, data: str | None, as_json: bool) -> None:
    """Pre-flight: import MODEL, compare torch with onnxruntime, and prove write-back. Exit 0 only if all pass."""
    from onnx_admm.converters.modelio import json_safe
    from onnx_admm.check import check as run_check

    report = run_check(model, _load_feeds(model, data))
    click.echo(json.dumps(json_safe(report.to_dict()), indent=2, allow_nan=False) if as_json else report.format())
    if not report.passed:
        sys.exit(1)


@main.command()
@click.argument("original", type=click.Path(dir_okay=False))
@click.argument("compressed", type=click.Path(dir_okay=False))
@click.option("--data", required=True, type=str, help="Held-out inputs (.npz; optional `labels`).")
@click.option("--batch-size", type=click.IntRange(min=1),
              help="Samples per onnxruntime run [default: 64, lowered to what the models' activations allow].")
@click.option("--threads", default=1, show_default=True, type=click.IntRange(min=1), help="onnxruntime threads.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Write the JSON report here.")
@click.option("--metric-floor", type=float, default=DEFAULT_FLOOR, show_default=True,
              help="Exit 3 when COMPRESSED keeps less than this share of ORIGINAL's figure (accuracy with labels, "
                   "else the task metric against ORIGINAL); 0 turns it off.")
@click.option("--max-accuracy-drop", type=float,
              help="Exit 3 when the drop (accuracy with labels, else 1 - the task metric) exceeds this fraction.")
def validate(original: str, compressed: str, data: str, batch_size: int | None, threads: int, report_path: str | None,
             metric_floor: float, max_accuracy_drop: float | None) -> None:
    """Run ORIGINAL and COMPRESSED in onnxruntime on the same inputs: the task metric, accuracy, size, latency."""
    from onnx_admm.converters.graphinfo import graph_inputs
    from onnx_admm.converters.modelio import load_model, save_json
    from onnx_admm.sources import resolve_data
    from onnx_admm.outputs import RunFiles, input_files
    from onnx_admm.gate import Gate
    from onnx_admm.tables import format_table
    from onnx_admm.validate import validate as run_validate

    gate = Gate(max_accuracy_drop, metric_floor)
    if report_path:
        RunFiles.plan(original, None, report_path).check(
            input_files(original, label="the original model") + input_files(compressed, label="the compressed model")
            + input_files(None, protect={"the data": data}))
    dataset = resolve_data(data, graph_inputs(load_model(original)))
    report = run_validate(original, compressed, dataset, batch_size=batch_size, threads=threads)
    click.echo(format_table(report))
    for note in report.warnings():
        logging.getLogger("onnx_admm.validate").warning("%s", note)
    verdict, failure = gate.judge(report.drop, report.retained)
    if report_path:
        save_json({**report.to_dict(), "warnings": report.warnings(), "gate": verdict}, report_path)
    if failure is not None:
        click.echo(failure, err=True)
        sys.exit(EXIT_GATE)


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(),
              help="Compressed ONNX file to write; a folder (existing, or ending in /) gets MODEL's name + .admm.onnx.")
@click.option("--data", required=True, type=str, help="Training data: .npz or package.module:function plugin.")
@click.option("--val-data", type=str, help="Held-out data (default: val_fraction of --data).")
@click.option("--recipe", type=click.Path(dir_okay=False), help="TOML recipe; flags override it.")
@click.option("--sparsity", type=float, help="Global target sparsity in [0, 1) (0.975 = 40x).")
@click.option("--stages", type=click.IntRange(min=1), help="Progressive stages to the target.")
@click.option("--structure", callback=lambda ctx, param, value: _check_structure(value),
              help="What the pruning removes: unstructured, filter, channel, column, block (filter pruning also "
                   "removes the filters from the graph; the others store zeros), or an N:M pattern such as 2:4 (N of every M weights along the input "
                   "axis; no --sparsity needed).")
@click.option("--block", "block", type=str, help="Block size RxC for --structure block, e.g. 64x64.")
@click.option("--bits", type=click.IntRange(2, 8), help="Quantize weights to k-bit levels (the int container's range).")
@click.option("--binary", is_flag=True, help="Binarize weights to {-a, +a} (with pruning {-a, 0, +a}).")
@click.option("--ternary", is_flag=True, help="Ternarize weights to {-a, 0, +a}.")
@click.option("--clusters", type=click.IntRange(2, 256), help="Cluster weights to a k-means codebook of N values.")
@click.option("--activations", type=click.Choice(["float", "int8"]),
              help="int8: write a QDQ model (activations calibrated on the training data) that onnxruntime runs "
                   "with integer kernels; the report compares it with quantize_static.")
@click.option("--ranges", type=click.Choice(["minmax", "fit"]),
              help="How the calibration data sets the int8 activation ranges: minmax (default, as quantize_static) "
                   "or fit (each clipped where the int8 outputs come closest to the float ones on that data).")
@click.option("--sparse-weights/--dense-weights", default=None,
              help="Store pruned weights as sparse initializers where smaller (default), or every weight dense "
                   "in its own shape, for tools that read no sparse initializer (onnx's full_check).")
@click.option("--per-channel/--per-tensor", default=None,
              help="One quantization scale per output channel or per tensor (default: per channel, ternary "
                   "levels per tensor).")
@click.option("--epochs", type=click.FloatRange(min=0, min_open=True),
              help="Total training budget in epochs; the tool splits it over stages and phases.")
@click.option("--allocation", type=click.Choice(ALLOCATIONS),
              help="How a global --sparsity is split over layers (default lamp; sensitivity: from each layer's "
                   "measured accuracy drop, as the analyze command measures it).")
@click.option("--round-to", type=click.IntRange(min=1),
              help="Filter pruning keeps a multiple of N filters per layer, the nearest to its share where that "
                   "is within an eighth of the layer's filters, else of N/2, N/4 ... (8 or 16: onnxruntime runs "
                   "such channel counts faster; default 8; 1 keeps the exact share).")
@click.option("--reconstruct/--no-reconstruct", default=None,
              help="After each hard projection, refit the kept weights of every pruned layer to its outputs on "
                   "training samples (default on; without labels, to the original's layer outputs).")
@click.option("--admm-epochs", type=click.IntRange(min=0), help="ADMM epochs per stage (instead of --epochs).")
@click.option("--retrain-epochs", type=click.IntRange(min=0), help="Masked retraining epochs per stage.")
@click.option("--batch-size", type=click.IntRange(min=1))
@click.option("--lr", type=float, help="Learning rate (default 0.02 when pruning single weights, unstructured or N:M, "
                                           "with labels; 0.01 without labels, for levels alone or whole "
                                           "filters/channels; 0.03 with binary weights).")
@click.option("--rho", type=float, help="Initial ADMM rho (default: chosen from lr, momentum and steps per Z/U update).")
@click.option("--seed", type=int)
@click.option("--threads", type=click.IntRange(min=1), help="torch threads (and onnxruntime threads for validation).")
@click.option("--device", type=str, callback=lambda ctx, param, value: _check_device(value),
              help="cpu or cuda[:N] (under torchrun: cuda, each process on cuda:LOCAL_RANK).")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]),
              help="Forward passes of training under autocast in this dtype (default fp32; fp16 scales the loss).")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Write the JSON report here.")
@click.option("--max-accuracy-drop", type=click.FloatRange(min=0),
              help="Exit 3 when the drop exceeds this fraction; the model is then written as OUT's stem + .gate-failed.onnx.")
@click.option("--metric-floor", type=float, default=DEFAULT_FLOOR, show_default=True,
              help="Exit 3 when the compressed model keeps less than this share of the original's figure on the "
                   "held-out split (accuracy with labels, else the task metric against the original: top-1 "
                   "agreement, CTC sequence match, positive-set F1); 0 turns it off.")
@click.option("--keep-failed/--discard-failed", default=True, show_default=True,
              help="Whether a model that fails the gate (--max-accuracy-drop, --metric-floor) is written "
                   "(under its .gate-failed name).")
@click.option("--save-stages", type=click.Path(file_okay=False), help="Also save every stage's model in this folder.")
@click.option("-q", "--quiet", is_flag=True,
              help="No progress and no summary table (warnings and errors still go to stderr).")
@click.option("--html", "html_path", type=click.Path(dir_okay=False),
              help="Also write the report as one self-contained HTML page here (see the report command).")
def compress(model: str, output: str, data: str, val_data: str | None, recipe: str | None, sparsity: float | None,
             stages: int | None, structure: str | None, block: str | None, bits: int | None, binary: bool,
             ternary: bool, clusters: int | None, activations: str | None, ranges: str | None,
             sparse_weights: bool | None, per_channel: bool | None,
             epochs: float | None,
             allocation: str | None, round_to: int | None, reconstruct: bool | None, admm_epochs: int | None, retrain_epochs: int | None, batch_size: int | None,
             lr: float | None, rho: float | None, seed: int | None, threads: int | None, device: str | None,
             precision: str | None, report_path: str | None, max_accuracy_drop: float | None, metric_floor: float, keep_failed: bool,
             save_stages: str | None, quiet: bool, html_path: str | None) -> None:
    """Prune and/or quantize MODEL with progressive ADMM and write the compressed ONNX file to OUTPUT."""
    from onnx_admm.api import AccuracyGateFailed, CompressInterrupted
    from onnx_admm.api import compress as run_compress
    from onnx_admm.html_report import check_compress_html, write_compress_html
    from onnx_admm.distributed import PeerFailed, World
    from onnx_admm.recipe import CompressConfig

    if html_path:  # before any training, like every other output
        check_compress_html(html_path, model, output, report_path, save_stages, data, val_data, {"the recipe": recipe})

    config = CompressConfig.from_toml(recipe) if recipe else CompressConfig()
    if (sparsity is not None or stages is not None) and config.prune.targets is not None:
        # --sparsity/--stages replace the recipe's explicit stage list; its last entry stays the target.
        config = dataclasses.replace(config, prune=dataclasses.replace(
            config.prune, targets=None, sparsity=config.prune.targets[-1]))
    quant_flags = [f for f, on in (("--bits", bits is not None), ("--binary", binary), ("--ternary", ternary),
                                    ("--clusters", clusters is not None)) if on]
    if len(quant_flags) > 1:
        raise click.UsageError(f"choose one of {', '.join(quant_flags)}")
    if quant_flags:
        # A quantization flag replaces the recipe's quantization choice.
        config = dataclasses.replace(config, quantize=dataclasses.replace(
            config.quantize, bits=1 if binary else bits, ternary=ternary, clusters=clusters))
    config = config.replace(
        train={"batch_size": batch_size, "lr": lr, "seed": seed, "threads": threads, "device": device,
               "precision": precision, "epochs": epochs},
        admm={"epochs": admm_epochs, "retrain_epochs": retrain_epochs, "rho": rho},
        prune={"sparsity": sparsity, "stages": stages, "structure": structure, "block": _parse_block(block),
               "allocation": allocation, "round_to": round_to, "reconstruct": reconstruct},
        quantize={"per_channel": per_channel},
        output={"activations": activations, "ranges": ranges, "sparse_weights": sparse_weights},
    )
    try:
        # The library draws the progress (stderr: bars on a terminal, a line per epoch in logs); stdout
        # keeps the results.
        result = run_compress(model, data, config, val_data=val_data, progress="off" if quiet else "auto",
                              output=output, report_path=report_path, save_stages=save_stages,
                              max_accuracy_drop=max_accuracy_drop, metric_floor=metric_floor,
                              keep_failed=keep_failed,
                              protect={"the recipe": recipe})
    except PeerFailed as exc:  # under torchrun, a rank other than 0: rank 0 says why
        sys.exit(exc.exit_status)
    except CompressInterrupted as exc:
        if World.from_env().main:  # under torchrun the others were interrupted too, and wrote nothing
            click.echo(exc.describe(), err=True)
        sys.exit(exc.exit_status)
    except AccuracyGateFailed as exc:
        if not quiet:
            click.echo(_summary(exc.result.report))
        if html_path:  # like the JSON report, written for a failed gate too
            write_compress_html(exc.result.report, html_path)
        click.echo(str(exc), err=True)
        sys.exit(EXIT_GATE)
    if html_path:
        write_compress_html(result.report, html_path)
    if not quiet and World.from_env().main:  # one table, not one per process
        click.echo(_summary(result.report))


@main.command("report")
@click.argument("report_path", metavar="REPORT", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="The HTML file to write (default: REPORT with .html instead of .json).")
def report_command(report_path: str, output: str | None) -> None:
    """Write REPORT (the JSON of compress --report) as one self-contained HTML page: figures, tables, recipe."""
    from onnx_admm.html_report import check_html_output, default_html_path, write_html
    from onnx_admm.report_schema import load_report

    target = check_html_output(output or default_html_path(report_path), [("the report", report_path)])
    write_html(load_report(report_path), target)


main.command("analyze")(analyze)


def _check_structure(value: str | None) -> str | None:
    """The recipe's own check of a structure name, as a usage error."""
    from onnx_admm.recipe import PruneConfig

    if value is not None:
        try:
            PruneConfig(structure=value)
        except UserError as exc:
            raise click.BadParameter(str(exc).replace("prune.structure ", "", 1), param_hint="--structure") from None
    return value


def _check_device(value: str | None) -> str | None:
    """A device this machine has, checked as the options are read: a usage error (exit 2) naming the fix."""
    from onnx_admm.distributed import World
    from onnx_admm.preflight import check_device

    if value is None:
        return value
    try:
        world = World.from_env()
    except UserError:  # a broken torchrun environment: compress reports it itself, in its own words
        world = World()
    try:
        check_device(value, world.size, world.local_rank)
    except UserError as exc:
        raise click.BadParameter(str(exc), param_hint="--device") from None
    return value


def _parse_block(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise click.BadParameter(f"expected ROWSxCOLS such as 64x64, got {text!r}", param_hint="--block")
    return int(parts[0]), int(parts[1])


def _summary(report: dict) -> str:
    from onnx_admm.tables import describe_task

    m = report["metrics"]
    lines = [f"{'layer':<40} {'shape':<20} {'sparsity':>9} {'residual':>9}"]
    for layer in report["layers"]:
        res = f"{layer['residual']:.3g}" if layer["residual"] is not None else "-"
        lines.append(f"{layer['name']:<40} {str(tuple(layer['shape'])):<20} {layer['sparsity']:>9.4f} {res:>9}")
    ratio = report["compression_ratio"]
    lines.append(f"weights: {report['params']['nonzero']} of {report['params']['total']} nonzero"
                 + (f" ({ratio:.1f}x)" if ratio else ""))
    lines.append(f"file: {report['original']['bytes']} -> {report['compressed']['bytes']} bytes "
                 f"(gzip {report['original']['bytes_gzip']} -> {report['compressed']['bytes_gzip']})")

    def pct(x):
        return "n/a" if x is None else f"{100 * x:.2f}%"

    task = m.get("task")
    # The task's own figure where it is not per-position agreement: a destroyed CTC reader still agrees on
    # most of its (blank) steps, so "agreement" alone on the last line would read as a pass.
    held = f"agreement {pct(m['agreement'])}"
    if task and task["metric"] != "top-1 agreement" and task.get("value") is not None:
        held = f"{task['metric']} " + (pct(task["value"]) if report.get("score") else f"{task['value']:.4f}")
    if m["original_accuracy"] is None and m["compressed_accuracy"] is None:
        lines.append(f"held-out (no labels): {held}")
    else:
        lines.append(f"held-out: accuracy {pct(m['original_accuracy'])} -> {pct(m['compressed_accuracy'])}, {held}")
    if report.get("passed_through"):
        lines.append(f"trained: {', '.join(report['trained_outputs'])}; passed through unchanged: "
                     f"{', '.join(report['passed_through'])} (computed by nodes onnx-admm does not convert: "
                     f"{'; '.join(report['not_converted'])})")
    nm = report.get("nm") or {}
    for pattern, runtimes in nm.get("runtimes", {}).items():
        count = sum(layer["pattern"] == pattern for layer in nm["layers"])
        lines.append(f"{pattern} sparsity on {count} weight(s); runtimes: {'; '.join(runtimes)}")
    if report.get("activations"):
        act = report["activations"]
        lines.append("int8 activations (accuracy or agreement; ms at batch " + "/".join(act["compressed_int8"]["latency_ms"])
                     + "): " + "; ".join(
                         f"{key} failed ({act[key]['error']})" if act[key].get("error") else
                         f"{key} {pct(act[key]['accuracy'] if act[key]['accuracy'] is not None else act[key]['agreement'])}"
                         f" {'/'.join(f'{ms:.3g}' for ms in act[key]['latency_ms'].values())}"
                         for key in ("compressed_fp32", "compressed_int8", "quantize_static")))
    if report.get("batch", {}).get("mode") == "fixed":
        lines.append(f"batch: {report['batch']['note']}")
    if task is not None:  # first: what the model still does is the figure a pipeline ships on
        lines.insert(0, describe_task(task, report["score"]["tensor"] if report.get("score") else None,
                                      report.get("score")))
    return "\n".join(lines)


def console() -> None:
    """The ``onnx-admm`` executable (and ``python -m onnx_admm.cli``): :func:`main`, then SIGINT and SIGTERM ignored.

    Once the command has ended, its output is complete and its status decided. The interpreter's teardown
    that follows takes a moment with torch loaded, and a signal landing in it killed the process without
    the "interrupted" line (1 child in 120 signalled at random moments). The process now exits with the
    command's status instead. Code that calls ``main`` in-process (tests, a pipeline embedding the CLI)
    keeps its own handlers.
    """
    try:
        main()
    finally:
        ignore_signals()


if __name__ == "__main__":  # python -m onnx_admm.cli, e.g. from a checkout that is not installed
    console()
