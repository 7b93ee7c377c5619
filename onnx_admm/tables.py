"""The validation report as text: the table ``validate`` prints and the line that names the task metric."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from onnx_admm.validate import ValidationReport


def percent(x: float | None) -> str:
    """A fraction as a percentage with two decimals, "-" when unmeasured (the tables' and lines' format)."""
    return "-" if x is None else f"{100 * x:.2f}%"


def format_table(report: ValidationReport) -> str:
    """The report as a readable text table."""

    def size(n: int) -> str:
        return f"{n / 1024:,.1f} KB" if n < 1024**2 else f"{n / 1024**2:,.2f} MB"

    def ratio(a: float | None, b: float | None) -> str:
        return f"({a / b:.2f}x)" if a is not None and b else ""

    def ms(x: float | None) -> str:
        return "-" if x is None else f"{x:.3f} ms"

    o, c = report.original, report.compressed
    rows = [
        ("", "original", "compressed", "orig/comp"),
        ("size", size(o.bytes), size(c.bytes), ratio(o.bytes, c.bytes)),
        ("size gzip'd", size(o.gzip_bytes), size(c.gzip_bytes), ratio(o.gzip_bytes, c.gzip_bytes)),
        ("weights", f"{o.parameters:,}", f"{c.parameters:,}", ""),
        ("nonzero weights", f"{o.nonzeros:,}", f"{c.nonzeros:,}", ratio(o.parameters, c.nonzeros)),
        ("accuracy", percent(o.accuracy), percent(c.accuracy),
         "" if report.accuracy_drop is None else f"({0.0 - 100 * report.accuracy_drop:+.2f} pts)"),
        (f"latency/batch of {report.latency_batch_size}", ms(o.latency_ms), ms(c.latency_ms),
         ratio(o.latency_ms, c.latency_ms)),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [f"validation on {report.samples} samples, batch {report.batch_size}, {report.threads} thread(s)"]
    if report.task is not None:
        lines.append(describe_task(report.task, report.score_output, report.score))
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
    lines.append("")
    lines.append("output differences (|original - compressed|):")
    name_width = max((len(d.name) for d in report.outputs), default=0)
    for diff in report.outputs:
        if diff.max_abs is None:
            detail = "not a tensor, not compared"
        else:
            detail = f"max {diff.max_abs:.3g}  mean {diff.mean_abs:.3g}"
            if diff.r2 is not None:
                detail += f"  R^2 {diff.r2:.4f}"
        lines.append(f"  {diff.name.ljust(name_width)}  {detail}")
    return "\n".join(lines)


def describe_task(task: dict, output: str | None, score: dict | None = None) -> str:
    """One line: the task metric of the compressed model against the original, and the figures behind it."""
    how = score or {}
    via = f" (the float scores behind output {how['feeds']!r})" if how.get("feeds") else ""
    extra = []
    if task.get("error_rate") is not None and task.get("blank") is not None:
        extra.append(f"character error rate {percent(task['error_rate'])}, blank {task['blank']}")
    elif task.get("sequence_match") is not None:
        extra.append(f"whole sequences {percent(task['sequence_match'])}")
    if task.get("precision") is not None:
        extra.append(f"precision {percent(task['precision'])}, recall {percent(task['recall'])}, "
                     f"IoU {percent(task['iou'])}; {percent(task['positive_fraction'])} of the original's positions positive")
    if task["metric"] != "top-1 agreement" and task.get("agreement") is not None:
        extra.append(f"top-1 agreement {percent(task['agreement'])}{' ' + how['per'] if how.get('per') else ''}")
    elif how.get("per"):
        extra.append(how["per"])
    if task.get("others"):  # probabilities beside the score (a second head's)
        extra.append("beside it: " + ", ".join(f"positive-set F1 {percent(value)} on {name!r}"
                                                for name, value in task["others"].items()))
    if task.get("outputs"):  # no score output: each float output's fit
        extra.append(", ".join(f"{name} {task['outputs'][name]:.4f}" for name in task["outputs"]))
    detail = f" ({'; '.join(extra)})" if extra else ""
    if output is None:
        return f"task metric: {task['metric']} with the original on its float outputs: {task['value']:.4f}{detail}"
    return f"task metric: {task['metric']} with the original on {output!r}{via}: {percent(task['value'])}{detail}"
