"""The compress report as one self-contained HTML page: ``onnx-admm report`` and ``compress --html``.

The page is meant to be mailed, attached to a CI run or opened from an air-gapped machine, so it holds
everything inline: one ``<style>``, SVG figures drawn by ``onnx_admm.svgplot``, no script, no font,
no image, no URL (a Content-Security-Policy forbids any load, should one slip in). Every text taken from
the report goes through ``html.escape``: layer names, notes and warnings come from the model file and
the command line. Missing sections (no structure, no N:M, an older field absent) are said, not hidden.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from html import escape
from pathlib import Path

from onnx_admm.converters.errors import UserError
from onnx_admm.converters.modelio import save_text
from onnx_admm.html_sections import SECTIONS, header
from onnx_admm.report_schema import check_version
from onnx_admm.signals import deferred

logger = logging.getLogger(__name__)

Files = Iterable[tuple[str, Path]]  # (label, path), as onnx_admm.outputs takes them

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:#1b1f24;
margin:0;background:#f6f7f9}
main{max-width:1080px;margin:0 auto;padding:20px 20px 40px}
h1{font-size:22px;margin:4px 0}h2{font-size:17px;margin:0 0 10px}
section{background:#fff;border:1px solid #dde1e6;border-radius:6px;padding:14px 18px;margin:14px 0;
overflow-x:auto}
table{border-collapse:collapse;margin:6px 0;font-size:13px}
td,th{padding:3px 8px;border-bottom:1px solid #eceef1;text-align:left;vertical-align:top}
th{background:#f0f2f5;font-weight:600}td.n{text-align:right;font-variant-numeric:tabular-nums}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:12px 0}
.card{background:#fff;border:1px solid #dde1e6;border-radius:6px;padding:8px 14px;min-width:150px}
.card>b{display:block;font-size:20px}.card>span{color:#59636e;font-size:12px}
.pass{color:#1a7f37}.fail{color:#cf222e}.muted{color:#59636e}
pre{background:#f6f8fa;border:1px solid #eceef1;padding:10px;overflow-x:auto;font-size:12.5px}
code{font-size:12.5px}
svg{display:block;margin:8px 0;font:12px system-ui,sans-serif}svg text{fill:#1b1f24}svg .muted{fill:#59636e}
svg .grid{stroke:#eceef1}svg .axis{stroke:#b0b7bf}svg .frame{fill:none;stroke:#b0b7bf}
svg .mark{stroke:#8c959f;stroke-dasharray:3 3}
/* a white halo, so that a label stays readable where a curve crosses it */
svg .label{paint-order:stroke;stroke:#fff;stroke-width:3px;stroke-linejoin:round}
"""


def render(report: dict) -> str:
    """The HTML page of a compress report (version-checked first)."""
    check_version(report)
    try:
        body = [header(report)]
        for key, heading, make in SECTIONS:
            body.append(f'<section id="{key}"><h2>{escape(heading)}</h2>{make(report)}</section>')
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        # Only a report edited by hand (or a writer's bug) lacks a field its version promises: one line, not
        # a traceback; the debug log keeps the trace.
        logger.debug("rendering the report", exc_info=True)
        raise UserError(f"the report lacks or mangles a field of schema_version {report['schema_version']} "
                        f"({type(exc).__name__}: {exc}); write it again with compress --report") from None
    title = f"onnx-admm report: {Path(str(report.get('output') or 'model')).name}"
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">"
            f"<meta name=\"viewport\" content=\"width=device-width\"><title>{escape(title)}</title>"
            f"<style>{_CSS}</style></head><body><main>{''.join(body)}</main></body></html>\n")


def write_html(report: dict, path: str | Path) -> Path:
    """Render ``report`` and write it to ``path`` atomically (a temporary file beside it, then a rename);
    a signal during the write takes effect once the file is whole."""
    text = render(report)
    with deferred():
        written = save_text(text, path)
    logger.info("wrote the HTML report %s (%d bytes)", written, len(text.encode()))
    return written


def default_html_path(report_path: str | Path) -> Path:
    """``run.report.json`` -> ``run.report.html``, beside it."""
    return Path(report_path).with_suffix(".html")


def check_html_output(path: str | Path, inputs: Files, outputs: Files = ()) -> Path:
    """``path`` can be written and is none of ``inputs`` (label, path) or ``outputs``; checked before
    any work, with the words and rules of every other output (``onnx_admm.outputs``)."""
    # preflight loads torch: imported here so that rendering a report does not.
    from onnx_admm.outputs import check_collisions
    from onnx_admm.preflight import check_writable

    path = Path(path)
    check_writable(path, "the HTML report")
    check_collisions([("the HTML report", path), *outputs], [(label, Path(p)) for label, p in inputs])
    return path


def check_compress_html(path: str | Path, model: str | Path, output: str | Path, report: str | Path | None,
                        stages: str | Path | None, data: object, val_data: object,
                        protect: dict[str, str | Path | None]) -> Path:
    """``compress --html``: the page's path against the run's inputs and its other outputs (the model,
    the gate-failed model, the report, the stage files)."""
    from onnx_admm.outputs import RunFiles, input_files

    files = RunFiles.plan(Path(model).name, output, report, stages, gated=True)
    path = check_html_output(path, input_files(model, data, val_data, protect), files.outputs())
    if files.stage_file_of(path):
        raise UserError(f"the HTML report {path} is named like a --save-stages file; choose another name")
    return path


def write_compress_html(report: dict, path: str | Path) -> Path:
    """``compress --html``: write the page after the model and the JSON report, whose names a failure here
    gives, since they stay in place."""
    try:
        return write_html(report, path)
    except UserError as exc:
        raise UserError(f"the compressed model is saved ({report.get('output') or 'not written: the gate failed'}), "
                        f"but the HTML report is not: {exc}") from None
