"""Where a run's files go, checked before any work so that no output can destroy a file.

A compress run reads the model (and its external data), the data, the validation data and the
recipe, and writes the compressed model (and its ``.data``), the model that failed the accuracy
gate, the JSON report and the ``--save-stages`` files. ``check_files`` refuses, in one line, an
output that is one of the inputs or another output (symlinks and ``..`` resolved, hard links
compared by inode), a report path ending in ``/``, and any location that cannot be written.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import onnx

from onnx_admm.converters.errors import UserError
from onnx_admm.converters.files import FOLDER, file_kind
from onnx_admm.converters.modelio import external_data_files, require_model_file
from onnx_admm.preflight import check_writable, unwritable

# A model that fails --max-accuracy-drop is written as OUT's stem + this + OUT's suffix.
GATE_FAILED = ".gate-failed"

Files = Iterable[tuple[str, Path]]


def _ends_in_separator(path: str | Path) -> bool:
    # Path() drops a trailing separator, so it must be read from the text the user gave.
    return isinstance(path, str) and path.endswith(("/", os.sep))


def model_output(output: str | Path, model_name: str = "model") -> Path:
    """``output`` names a file, or a folder (an existing one, or a path ending in a separator) that gets
    ``model_name``'s stem + ``.admm.onnx``."""
    path = Path(output)
    try:
        folder = _ends_in_separator(output) or file_kind(path) == FOLDER
    except OSError as exc:  # ENAMETOOLONG and the like: one line, as check_writable says it
        raise unwritable("the output", path, exc) from None
    return path / f"{Path(model_name).stem}.admm.onnx" if folder else path


def gate_failed_path(output: Path) -> Path:
    """Where a model that failed the accuracy gate goes: ``out.onnx`` -> ``out.gate-failed.onnx``."""
    return output.with_name(f"{output.stem}{GATE_FAILED}{output.suffix}")


def stage_path(folder: Path, output: Path, index: int) -> Path:
    """The ``--save-stages`` file of stage ``index`` (0-based): ``FOLDER/<OUT stem>.stage<index + 1>.onnx``."""
    return folder / f"{output.stem}.stage{index + 1}.onnx"


def data_file(model: Path) -> Path:
    """The external data file a saved model may get beside it (always when it outgrows protobuf)."""
    return model.with_name(model.name + ".data")


@dataclass(frozen=True)
class RunFiles:
    """The files one compress run may write; None where it writes none."""

    model: Path | None = None
    failed: Path | None = None  # the model that fails the accuracy gate
    report: Path | None = None
    stages: Path | None = None  # folder

    @classmethod
    def plan(cls, model_name: str, output: str | Path | None, report: str | Path | None = None,
             stages: str | Path | None = None, gated: bool = False, keep_failed: bool = True) -> RunFiles:
        if report is not None and _ends_in_separator(report):
            raise UserError(f"the report path {report} ends in '/', which names a folder; give a file path such as "
                            f"{report}report.json")
        model = model_output(output, model_name) if output is not None else None
        failed = gate_failed_path(model) if model is not None and gated and keep_failed else None
        return cls(model, failed, None if report is None else Path(report), None if stages is None else Path(stages))

    def outputs(self) -> list[tuple[str, Path]]:
        """Every output file, labelled for messages (the stage files are matched by ``stage_file_of``)."""
        files = []
        for label, model in (("the output", self.model), ("the gate-failed model", self.failed)):
            if model is not None:
                files += [(label, model), (f"{label}'s external data", data_file(model))]
        if self.report is not None:
            files.append(("the report", self.report))
        return files

    def stage_file_of(self, path: Path) -> bool:
        """Whether ``path`` is a name the ``--save-stages`` files (or their data) may take."""
        if self.stages is None or self.model is None or not _same(path.parent, self.stages):
            return False
        return re.fullmatch(re.escape(self.model.stem) + r"\.stage\d+\.onnx(\.data)?", path.name) is not None

    def check(self, inputs: Files) -> None:
        """Every output writable, none of them an input or another output (``inputs``: label, path)."""
        inputs = list(inputs)
        outputs = self.outputs()
        for label, path in outputs:
            if not label.endswith("external data"):
                check_writable(path, label)
        if self.stages is not None:
            check_writable(self.stages, "the --save-stages folder", folder=True)
            outputs.append(("the --save-stages folder", self.stages))
        check_collisions(outputs, inputs)
        for label, path in [*inputs, *outputs]:
            if self.stage_file_of(path):
                raise UserError(f"the --save-stages folder {self.stages} would write a stage file named like {label} "
                                f"{path}; choose another folder or output name")


def check_collisions(outputs: Files, inputs: Files) -> None:
    """No output is an input, and no two outputs are the same file."""
    outputs, inputs = list(outputs), list(inputs)
    for k, (label, path) in enumerate(outputs):
        for in_label, in_path in inputs:
            if _same(path, in_path):
                raise UserError(f"{label} {path} is the same file as {in_label} {in_path}: writing it would destroy "
                                "an input; choose another path")
        for other_label, other in outputs[k + 1:]:
            if _same(path, other):
                raise UserError(f"{label} {path} and {other_label} {other} are the same path: one would overwrite "
                                "the other; give them different paths")


def input_files(model: str | Path | onnx.ModelProto | None, data: object = None, val_data: object = None,
                protect: Mapping[str, str | Path | None] | None = None, label: str = "the model",
                locations: Iterable[str] | None = None) -> list[tuple[str, Path]]:
    """The files a run reads, labelled: the model and its external data (``locations``, read from the
    model when not given), the data files, ``protect``."""
    files = []
    if isinstance(model, (str, Path)):
        path = Path(model)
        files.append((label, path))
        if locations is None:
            locations = external_locations(path, label)
        files += [(f"{label}'s external data", path.parent / location) for location in sorted(locations)]
    for label, value in (("the training data", data), ("the validation data", val_data),
                         *((protect or {}).items())):
        # Loader plugins (package.module:function) and in-memory datasets are not files. os.path.exists, unlike
        # Path.exists, is False for a name too long to look up: reading it then fails in one line.
        if isinstance(value, (str, Path)) and os.path.exists(value):
            files.append((label, Path(value)))
    return files


def external_locations(path: Path, label: str = "the model") -> set[str]:
    """The external data files the model at ``path`` refers to (none when it cannot be read).

    Raises:
        UserError: ``path`` is not a regular file (reading a FIFO would block the run).
    """
    require_model_file(path, label.removeprefix("the "))
    try:
        return external_data_files(onnx.load(str(path), load_external_data=False))
    except Exception:  # unreadable: load_model reports it in its own words
        return set()


def _same(a: Path, b: Path) -> bool:
    if Path(os.path.abspath(a)) == Path(os.path.abspath(b)) or a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)  # hard links, case-insensitive file systems
    except OSError:
        return False
