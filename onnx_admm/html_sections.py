"""The sections of the HTML report page: each a function of the report that returns escaped HTML.

``onnx_admm.html_report`` puts them in a page. Every helper here escapes what it takes from the report
(``html.escape``) and writes "n/a" for a figure the report does not hold, so a report without a
structure section, labels or ADMM phases still gives a whole page that says what is missing.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from html import escape
from typing import Any

from onnx_admm.converters.errors import UserError
from onnx_admm.svgplot import PALETTE, LineChart, Panel, Series, bar_panels, line_chart


# ---- formatting: every helper returns escaped HTML, "n/a" for a missing figure ----

def _pct(x: Any, digits: int = 2) -> str:
    return "n/a" if not isinstance(x, (int, float)) else f"{100 * x:.{digits}f}%"


def _num(x: Any) -> str:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return "n/a" if x is None else escape(str(x))
    return f"{x:,}" if isinstance(x, int) else f"{x:.4g}"


def _drop(drop: Any) -> str:
    return "n/a" if not isinstance(drop, (int, float)) else f"{100 * drop:.2f} pt"


def _points(drop: Any) -> str:
    """An accuracy drop (a fraction) in percentage points, as a change: 0.0611 -> "-6.11 pt"."""
    return "" if not isinstance(drop, (int, float)) else f"{-100 * drop:+.2f} pt"


def _shape(shape: Any) -> str:
    return escape("\u00d7".join(map(str, shape))) if isinstance(shape, list) else escape(str(shape))


def _ms(x: Any) -> str:
    return "n/a" if not isinstance(x, (int, float)) else f"{x:.3f} ms"


def _times(a: Any, b: Any) -> str:
    """How many times smaller ``b`` is than ``a``."""
    ok = all(isinstance(v, (int, float)) for v in (a, b)) and b
    return f"{a / b:.2f}x" if ok else ""


def _table(head: Sequence[str] | None, rows: Iterable[Sequence[str]], numeric: Sequence[int] = ()) -> str:
    """A table of already-escaped cells (``head`` None: a key-value table without a header row);
    ``numeric`` columns are right-aligned."""
    out = ["<table>"]
    if head is not None:
        out += ["<tr>", *(f"<th>{escape(h)}</th>" for h in head), "</tr>"]
    for row in rows:
        out.append("<tr>" + "".join(f'<td class="n">{c}</td>' if k in numeric else f"<td>{c}</td>"
                                    for k, c in enumerate(row)) + "</tr>")
    out.append("</table>")
    return "".join(out)


def _none(text: str) -> str:
    return f'<p class="muted">{escape(text)}</p>'


# ---- sections ----

def header(report: dict) -> str:
    """The title line and the headline figures as cards."""
    m, gate = report.get("metrics") or {}, report.get("gate") or {}
    task = m.get("task") or {}
    tool = report.get("tool") or {}
    cards = [
        (_times(report["original"]["bytes"], report["compressed"]["bytes"]), "smaller file"),
        (f"{report['compression_ratio']:.1f}x" if report.get("compression_ratio") else "n/a", "fewer nonzero weights"),
        (_pct(task.get("value")), escape(str(task.get("metric", "task metric")))),
    ]
    if m.get("compressed_accuracy") is not None:
        cards.append((_pct(m["compressed_accuracy"]), f"accuracy (original {_pct(m.get('original_accuracy'))})"))
    passed = gate.get("passed")
    verdict = "n/a" if passed is None else '<span class="pass">passed</span>' if passed else '<span class="fail">failed</span>'
    cards.append((verdict, "gate"))
    cards_html = "".join(f"<div class=\"card\"><b>{value}</b><span>{label}</span></div>" for value, label in cards)
    output = report.get("output")
    return (f"<h1>onnx-admm report</h1><p class=\"muted\">{escape(str(output)) if output else 'no model written'}"
            f" &middot; onnx-admm {escape(str(tool.get('version', '?')))} &middot; schema_version "
            f"{escape(str(report.get('schema_version')))} &middot; {_num(report.get('wall_s'))} s</p>"
            f"<div class=\"cards\">{cards_html}</div>")


def _summary(report: dict) -> str:
    orig, comp, m = report["original"], report["compressed"], report.get("metrics") or {}
    params, bits = report.get("params") or {}, report.get("storage_bits") or {}
    task = m.get("task") or {}
    rows = [
        ("file bytes", _num(orig.get("bytes")), _num(comp.get("bytes")), _times(orig.get("bytes"), comp.get("bytes"))),
        ("gzip bytes", _num(orig.get("bytes_gzip")), _num(comp.get("bytes_gzip")),
         _times(orig.get("bytes_gzip"), comp.get("bytes_gzip"))),
        ("nonzero weights", _num(params.get("total")), _num(params.get("nonzero")),
         _times(params.get("total"), params.get("nonzero"))),
        ("weight storage bits (nonzeros x value bits + index bits)", _num(bits.get("original")),
         _num(bits.get("compressed")), _times(bits.get("original"), bits.get("compressed"))),
        (f"task metric: {escape(str(task.get('metric', 'n/a')))} (against the original)", "100.00%",
         _pct(task.get("value")), ""),
        *((f"beside it: positive-set F1 on {escape(repr(name))}", "100.00%", _pct(value), "")
          for name, value in (task.get("others") or {}).items()),
        ("accuracy (labels)", _pct(m.get("original_accuracy")), _pct(m.get("compressed_accuracy")),
         _points(report.get("accuracy_drop")) if m.get("original_accuracy") is not None else ""),
        ("top-1 agreement with the original", "100.00%", _pct(m.get("agreement")), ""),
    ]
    structure = report.get("structure") or {}
    for key, figures in (structure.get("latency") or {}).items():
        rows.append((f"latency, {escape(key.replace('_', ' '))} (onnxruntime)", _ms(figures.get("original_ms")),
                     _ms(figures.get("compressed_ms")), _times(figures.get("original_ms"), figures.get("compressed_ms"))))
    if not structure.get("latency"):
        v = report.get("validation") or {}
        batch = escape(str(v.get("latency_batch_size", "?")))
        rows.append((f"latency, batch {batch} (onnxruntime)", _ms((v.get("original") or {}).get("latency_ms")),
                     _ms((v.get("compressed") or {}).get("latency_ms")), ""))
    for key in ("macs", "params"):
        if key in structure:
            label = "parameters in the graph"
            if key == "macs":
                samples, uncounted = structure[key].get("samples", 1), structure[key].get("uncounted_nodes")
                label = (f"MACs ({samples} sample{'s' if samples != 1 else ''}"
                         + (f"; {uncounted} nodes of unknown shape not counted)" if uncounted else ")"))
            rows.append((label, _num(structure[key]["original"]), _num(structure[key]["compressed"]),
                         _times(structure[key]["original"], structure[key]["compressed"])))
    rows.append(("largest output difference |original - compressed|", "", _num(m.get("max_abs_diff")), ""))
    activations = _activations(report.get("activations"))
    figure = bar_panels(["original", "compressed"], [
        Panel("file bytes", [orig.get("bytes"), comp.get("bytes")], orig.get("bytes") or 1, _bytes, PALETTE[0], "size"),
        Panel("gzip bytes", [orig.get("bytes_gzip"), comp.get("bytes_gzip")], orig.get("bytes_gzip") or 1, _bytes,
              PALETTE[1], "size"),
    ], title="file size")
    return _table(("", "original", "compressed", "change"), rows, numeric=(1, 2, 3)) + figure + activations


def _activations(act: dict | None) -> str:
    """``--activations int8``: the float-activation and int8 compressed models and onnxruntime's
    quantize_static of the original, side by side."""
    if not act:
        return ""
    names = {"compressed_fp32": "compressed, float activations", "compressed_int8": "compressed, int8 activations",
             "quantize_static": "onnxruntime quantize_static of the original"}
    batches = sorted({b for key in names for b in (act.get(key) or {}).get("latency_ms", {})}, key=int)
    rows = []
    for key, label in names.items():
        row = act.get(key) or {}
        latency = row.get("latency_ms") or {}
        if row.get("error"):
            label = f"{label} (failed: {row['error']})"
        rows.append((escape(label), _pct(row.get("accuracy")), _pct(row.get("agreement")), _num(row.get("bytes")),
                     *(_ms(latency.get(b)) for b in batches)))
    head = ("model", "accuracy", "agreement", "bytes", *(f"latency, batch {b}" for b in batches))
    return (f"<h3>Integer activations</h3><p class=\"muted\">{_num(act.get('calibration_samples'))} calibration "
            f"samples; latency: the median of {_num(act.get('runs'))} runs on {_num(act.get('threads'))} thread(s)"
            f"</p>" + _table(head, rows, numeric=tuple(range(1, len(head)))))


def _bytes(n: float) -> str:
    return f"{n / 1024:,.1f} KiB" if n >= 1024 else f"{n:,.0f} B"


def _gate(report: dict) -> str:
    gate = report.get("gate") or {}
    if not gate:
        return _none("the report holds no gate verdict")
    passed = gate.get("passed")
    verdict = '<b class="pass">passed</b>' if passed else '<b class="fail">failed</b>'
    floor, drop = gate.get("floor"), gate.get("max_accuracy_drop")
    rows = [
        ("verdict", verdict),
        ("metric", escape(str(gate.get("metric", "n/a")))),
        ("retained (the compressed model's share of the original's figure)", _pct(gate.get("retained"))),
        # %g: a floor of 0.999 must not read as 100%
        ("floor (--metric-floor)", "off" if not floor else f"{100 * floor:g}%"),
        ("accuracy drop (points: accuracy with labels, else the task metric)", _drop(report.get("accuracy_drop"))),
        ("max accuracy drop (--max-accuracy-drop)", "not asked" if drop is None else _drop(drop)),
        ("model written to", escape(str(report.get("output"))) if report.get("output") else "not written"),
    ]
    return _table(None, rows)


def _layers(report: dict) -> str:
    layers = report.get("layers") or []
    if not layers:
        return _none("no compressible layer")
    names = [str(layer["name"]) for layer in layers]
    density = [None if layer.get("sparsity") is None else 1 - layer["sparsity"] for layer in layers]
    bits = [layer.get("stored_bits_per_weight") for layer in layers]
    top = max([32.0, *(b for b in bits if isinstance(b, (int, float)))])
    figure = bar_panels(names, [
        Panel("kept density (nonzeros / weights)", density, 1.0, lambda v: _pct(v, 2 if v < 0.1 else 1),
              PALETTE[0], "density"),
        Panel("stored bits per weight (fp32 = 32)", bits, top, lambda v: f"{v:.2f}", PALETTE[1], "bits"),
    ], title="per-layer density and storage")
    rows = [(escape(str(layer["name"])), escape(str(layer.get("op_type", ""))), _shape(layer.get("shape")),
             _shape(layer.get("stored_shape")), _num(layer.get("params")), _num(layer.get("nonzero")),
             _pct(None if layer.get("sparsity") is None else 1 - layer["sparsity"]),
             escape(str(layer.get("encoding") or "")), escape(str(layer.get("quantization") or "-")),
             _num(layer.get("levels")) if layer.get("levels") is not None else "-",
             _num(layer.get("stored_bits_per_weight")), _num(layer.get("residual")),
             escape(str(layer.get("note") or ""))) for layer in layers]
    head = ("layer", "op", "shape", "stored shape", "weights", "nonzero", "kept", "encoding", "quantization",
            "levels", "bits/weight", "residual", "note")
    return figure + _table(head, rows, numeric=(4, 5, 6, 9, 10, 11))


def _residuals(report: dict) -> str:
    stages = report.get("stages") or []
    series, marks, x = [], [], 0
    for k, stage in enumerate(stages):
        residual = stage.get("mean_residual") or []
        if residual:
            marks.append((x + 0.5, f"stage {k + 1}"))  # the boundary, between two stages' points
            series.append(Series(f"stage {k + 1} (target {_pct(stage.get('target'), 1)})",
                                 [(x + i + 1, r) for i, r in enumerate(residual)], PALETTE[k % len(PALETTE)]))
            x += len(residual)
    intro = ("<p>Primal residual ||W - Z|| / ||W|| at each Z/U update: how far the weights still are from "
             "the constraint set. It should fall within a stage.</p>")
    if not series:
        return intro + _none("no ADMM phase ran (masked retraining only), so there are no residuals")
    top = max(r for s in series for _, r in s.points if r is not None)
    out = intro + line_chart(series, LineChart("mean residual per Z/U update, every stage", "Z/U update (all stages)",
                                               "residual", marks=marks, y_range=(0, top * 1.1 or 1)))
    per_layer = [Series(str(layer["name"]), list(enumerate(layer["residual_history"], 1)), PALETTE[k % len(PALETTE)])
                 for k, layer in enumerate(report.get("layers") or []) if layer.get("residual_history")]
    if per_layer:
        top = max(r for s in per_layer for _, r in s.points if r is not None)
        out += line_chart(per_layer, LineChart("residual per layer, last stage", "Z/U update (last stage)",
                                               "residual", y_range=(0, top * 1.1 or 1)))
    return out


def _selection(report: dict) -> str:
    points: list[dict] = []
    marks = []
    for k, stage in enumerate(report.get("stages") or []):
        if stage.get("history"):
            marks.append((len(points) + 0.5, f"stage {k + 1}"))
        points += stage.get("history") or []
    if not points:
        return _none("no epoch history in the report")
    metric = ((report.get("score") or {}).get("metric")) or "metric"

    def values(key: str, phase: str | None = None) -> list[tuple[float, float | None]]:
        return [(i + 1, p.get(key) if phase is None or p.get("phase") == phase else None) for i, p in enumerate(points)]

    series = [Series(f"{metric}, selection split (ADMM epochs)", values("metric", "admm"), PALETTE[0]),
              Series(f"{metric}, selection split (retraining epochs)", values("metric", "retrain"), PALETTE[2]),
              Series("training batches' metric", values("train_metric"), "#8c959f", dashed=True, markers=False)]
    chart = LineChart("selection metric per epoch", "epoch (all stages)", "metric",
                      y_fmt=lambda v: f"{100 * v:.0f}%", marks=marks)
    return ("<p>The metric on the selection split (part of the training data, never the held-out data) after "
            "each epoch; each stage keeps its best retraining state.</p>" + line_chart(series, chart))


def _stages(report: dict) -> str:
    rows = []
    for k, stage in enumerate(report.get("stages") or []):
        epochs = stage.get("epochs") or {}
        residual = stage.get("mean_residual") or []
        rows.append((str(k + 1), _pct(stage.get("target")), _pct(stage.get("sparsity")),
                     f"{1 / (1 - stage['sparsity']):.1f}x" if (stage.get("sparsity") or 0) < 1 else "n/a",
                     _pct(stage.get("val_metric")), _num(epochs.get("admm")), _num(epochs.get("retrain")),
                     f"{residual[0]:.3g} &rarr; {residual[-1]:.3g}" if residual else "-",
                     _refit(stage.get("reconstruction")), escape(str(stage.get("rolled_back") or "no"))))
    if not rows:
        return _none("no stage")
    return _table(("stage", "target sparsity", "sparsity", "ratio", "selection metric", "ADMM epochs",
                   "retrain epochs", "residual first \u2192 last", "refit", "rolled back"), rows,
                  numeric=(1, 2, 3, 4, 5, 6))


def _refit(reconstruction: dict | None) -> str:
    """The stage's reconstruction in a few words: layers refit, output error left, where retraining started."""
    if not reconstruction:
        return "off"
    ratio = reconstruction.get("error_ratio")
    text = f"{reconstruction['layers']} of {reconstruction['pruned_layers']} layers"
    if ratio is not None:
        text += f", error x{ratio:.2f}"
    if reconstruction.get("start"):
        text += f", from {reconstruction['start']}"
    rounding = reconstruction.get("rounding")
    if rounding:  # k-bit layers rounded by GPTQ, and their output error against nearest rounding's
        text += f"; GPTQ {rounding['layers']} of {rounding['quantized_layers']} k-bit layers"
        if rounding.get("error_ratio") is not None:
            text += f", error x{rounding['error_ratio']:.2f}"
    return escape(text)


def _left_alone(report: dict) -> str:
    alone = report.get("left_alone") or {}
    if not alone:
        return _none("nothing: every compressible weight took its target")
    return _table(("weight", "why it was left alone"), ((escape(str(k)), escape(str(v))) for k, v in alone.items()))


def _warnings(report: dict) -> str:
    warnings = report.get("warnings") or []
    if not warnings:
        return _none("none")
    return "<ul>" + "".join(f"<li>{escape(str(w))}</li>" for w in warnings) + "</ul>"


def _details(report: dict) -> str:
    score, batch = report.get("score") or {}, report.get("batch") or {}
    rows = [(escape(key), escape(str(score[key]))) for key in ("tensor", "kind", "loss", "metric", "per")
            if score.get(key) is not None]
    rows.append(("batch", escape(str(batch.get("note", "n/a")))))
    rows.append(("trained outputs", escape(", ".join(map(str, report.get("trained_outputs") or [])) or "-")))
    if report.get("passed_through"):
        rows.append(("passed through unchanged", escape(", ".join(map(str, report["passed_through"])))))
    if report.get("dequantized"):
        rows.append(("dequantized nodes", escape(json.dumps(report["dequantized"]))))
    if report.get("unfused"):
        rows.append(("onnxruntime's fused nodes, imported as standard ops", escape(json.dumps(report["unfused"]))))
    rows += [("wall time", f"{_num(report.get('wall_s'))} s"), ("peak memory", f"{_num(report.get('peak_rss_mb'))} MB")]
    out = _table(None, rows)
    structure = report.get("structure") or {}
    if structure.get("kept_channels"):
        channels = structure.get("channels") or {}
        out += "<h3>Filters kept</h3>" + _table(("weight", "filters kept", "of"), (
            (escape(str(name)), _num(kept), _num(channels.get(name))) for name, kept in structure["kept_channels"].items()
        ), numeric=(1, 2)) + f'<p class="muted">{escape(str(structure.get("note", "")))}</p>'
    nm = report.get("nm") or {}
    if nm.get("layers"):
        out += "<h3>N:M sparsity</h3>" + _table(("weight", "pattern", "axis", "fullest run", "holds"), (
            (escape(str(layer["name"])), escape(str(layer["pattern"])), _num(layer["axis"]),
             _num(layer["max_nonzeros_per_run"]), "yes" if layer["holds"] else '<b class="fail">no</b>')
            for layer in nm["layers"]), numeric=(2, 3))
        out += "".join(f"<p>{escape(p)}: {escape('; '.join(r))}</p>" for p, r in (nm.get("runtimes") or {}).items())
    return out


def _config(report: dict) -> str:
    config = report.get("config")
    if not config:
        return _none("the report holds no configuration")
    return ("<p>The configuration the run resolved (recipe and flags together). Saved as <code>recipe.toml</code> "
            "it reproduces the run: <code>onnx-admm compress MODEL -o OUT --data DATA --recipe recipe.toml</code>.</p>"
            f"<pre>{escape(recipe_toml(config))}</pre>")


def recipe_toml(config: dict) -> str:
    """The report's ``config`` (``CompressConfig.to_dict``) written as a TOML recipe."""
    lines = []
    for table, values in config.items():
        if table == "rules":
            for rule in values:
                lines += ["[[rules]]", *(f"{k} = {_toml_value(v)}" for k, v in rule.items()), ""]
        elif isinstance(values, dict):
            lines += [f"[{table}]", *(f"{k} = {_toml_value(v)}" for k, v in values.items()), ""]
        else:
            raise UserError(f"the report's config.{table} is not a table; is the report edited by hand?")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    return repr(value)


# The sections, in page order: (id, heading, maker). Tests look for each id.
SECTIONS = (
    ("summary", "Original vs compressed", _summary),
    ("gate", "Gate", _gate),
    ("layers", "Layers", _layers),
    ("residuals", "ADMM residuals", _residuals),
    ("selection", "Selection metric per epoch", _selection),
    ("stages", "Stages", _stages),
    ("left-alone", "Left alone", _left_alone),
    ("warnings", "Warnings", _warnings),
    ("details", "Score, batch and structure", _details),
    ("config", "Recipe", _config),
)
