"""The JSON report as a contract: its schema version, and reading a report back.

``compress --report`` writes ``schema_version`` into every report. A reader (``onnx-admm report``, a
pipeline) checks it before it trusts any field: a report of another version may name or mean its
fields differently, and reading one silently would show wrong figures. The version grows when a field
is removed, renamed or changes meaning; new fields alone keep it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from onnx_admm.converters.errors import UserError
from onnx_admm.converters.files import read_text

SCHEMA_VERSION = 1
# The version of ``onnx-admm analyze``'s JSON (kind "onnx-admm sensitivity"), under the same rule.
SENSITIVITY_SCHEMA_VERSION = 1
# The versions this code reads; older ones join here when a reader for them is kept.
READABLE_VERSIONS: tuple[int, ...] = (SCHEMA_VERSION,)


def _versions() -> str:
    return ", ".join(str(v) for v in READABLE_VERSIONS)


def check_version(report: Any, source: str | Path = "the report") -> dict:
    """``report`` itself, once it is a dict whose ``schema_version`` is one of READABLE_VERSIONS.

    Raises:
        UserError: one line naming the version found (or its absence) and the versions read.
    """
    if not isinstance(report, dict):
        raise UserError(f"{source} is not an onnx-admm report (a JSON object was expected); "
                        f"pass the file compress --report wrote")
    version = report.get("schema_version")
    if "schema_version" not in report:
        raise UserError(f"{source} has no schema_version: it is not a compress report of this onnx-admm "
                        f"(reads schema_version {_versions()}); write it again with compress --report")
    # bool is an int in Python: true must not pass for version 1.
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        raise UserError(f"{source} has schema_version {json.dumps(version)}, which this onnx-admm does not read "
                        f"(reads schema_version {_versions()}); use the onnx-admm that wrote it")
    return report


def load_report(path: str | Path) -> dict:
    """The report at ``path``, parsed and version-checked, or a one-line UserError."""
    text = read_text(path, "report", "pass the JSON file compress --report wrote")
    try:
        report = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"the report {path} is not valid JSON ({exc.msg} at line {exc.lineno}); "
                        f"is it truncated?") from None
    return check_version(report, path)
