"""Checks that run before any training, so a bad input fails in one line at once, not after minutes.

``compress`` calls them in order: the recipe's numbers, the seed and the device (``check_config``);
the output files the run will write (``check_writable``, through ``onnx_admm.outputs``, which also
refuses outputs that would overwrite an input or each other); the graph's outputs (``check_outputs``);
the model's weights (``check_weights``);
the class ids of the labelled data against the model's score output (``check_label_range``). Each
raises ``UserError`` with the problem and the fix. Non-finite input *values* are rejected where the
data is read (``onnx_admm.sources``), so a loader plugin's batches are checked as they arrive.
"""

from __future__ import annotations

import dataclasses
import errno
import math
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch

from onnx_admm.converters.errors import UserError
from onnx_admm.converters.files import FOLDER, REGULAR, file_kind
from onnx_admm.converters.importer import ImportedModel
from onnx_admm.converters.modelio import temp_prefix
from onnx_admm.data import Dataset, check_label_range
from onnx_admm.sources import PluginData
from onnx_admm.recipe import CompressConfig

# Seeds feed numpy's and torch's generators (and seed + epoch for shuffling): keep them in the range
# both take everywhere.
MAX_SEED = 2**32 - 1

_DEVICE_RE = re.compile(r"cpu|cuda(?::(\d+))?")


def check_config(config: CompressConfig, processes: int = 1, local_rank: int = 0) -> None:
    """Every number of the recipe finite, the seed in range, the device one this machine has (for this
    process of ``processes``, ``local_rank`` on its machine)."""
    for table in ("train", "admm", "prune", "quantize"):
        for f in dataclasses.fields(getattr(config, table)):
            value = getattr(getattr(config, table), f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise UserError(f"{table}.{f.name} must be a finite number, got {value}; set it in the recipe or "
                                "with its flag")
    seed = config.train.seed
    if not 0 <= seed <= MAX_SEED:
        raise UserError(f"train.seed must be an integer in [0, {MAX_SEED}], got {seed}")
    check_device(config.train.device, processes, local_rank)


def check_device(device: str, processes: int = 1, local_rank: int = 0) -> None:
    """``cpu``, or ``cuda[:N]`` with CUDA present and at least N + 1 devices.

    Under torchrun (``processes`` > 1) ``cuda`` means ``cuda:LOCAL_RANK`` (``onnx_admm.distributed``),
    which must exist, and an explicit ``cuda:N`` is refused: every process would take the same GPU.
    """
    match = _DEVICE_RE.fullmatch(device)
    if match is None:
        raise UserError(f"device {device!r} is not 'cpu', 'cuda' or 'cuda:N' (N a device index); pass one of those")
    if device == "cpu":
        return
    if not torch.cuda.is_available():
        # A CPU-only build of torch and a CUDA build that finds no GPU (no driver, CUDA_VISIBLE_DEVICES
        # empty) need different fixes.
        why = ("this torch is a CPU-only build" if torch.version.cuda is None
               else f"torch (CUDA {torch.version.cuda}) finds no GPU: check the driver and CUDA_VISIBLE_DEVICES")
        raise UserError(f"device {device!r} requested but CUDA is not available ({why}); use --device cpu")
    if processes > 1 and match.group(1) is not None:
        raise UserError(f"device {device!r} would put all {processes} processes on one GPU; pass --device cuda "
                        "(each process takes cuda:LOCAL_RANK)")
    count = torch.cuda.device_count()
    if processes > 1 and local_rank >= count:
        raise UserError(f"process LOCAL_RANK {local_rank} needs cuda:{local_rank} but this machine has {count} CUDA "
                        f"device(s); start at most {count} processes per machine (torchrun --nproc-per-node)")
    if int(match.group(1) or 0) >= count:
        raise UserError(f"device {device!r} requested but this machine has {count} CUDA device(s) "
                        f"(cuda:0 to cuda:{count - 1}); pick one of those or cpu")


def check_writable(path: str | Path, what: str, *, folder: bool = False) -> None:
    """``path`` (a file, or with ``folder`` a directory) can be created or replaced.

    Missing parent folders are fine (they are created at save time): the nearest one that exists must be
    a folder in which a file can be created, which is tried for real (read-only file systems, immutable
    folders and permissions are all caught that way).
    """
    path = Path(path)
    try:
        kind = file_kind(path)
    except OSError as exc:  # a name longer than the file system allows (ENAMETOOLONG), a folder that cannot be searched
        raise unwritable(what, path, exc) from None
    wanted = FOLDER if folder else REGULAR
    if kind not in (None, REGULAR, FOLDER):
        # os.replace would put a regular file in place of a device node, FIFO or socket.
        raise UserError(f"{what} {path} exists and is not a regular file ({kind}); choose the path of "
                        f"{'a folder' if folder else 'a file'}")
    if kind is not None and kind != wanted:
        raise UserError(f"{what} {path} is {'a folder' if kind == FOLDER else 'a file'}; pass the path of "
                        f"{'a folder' if folder else 'a file'}")
    if kind == REGULAR and (not os.access(path, os.W_OK) or not path.stat().st_mode & 0o222):
        # Renaming over it would succeed (only the folder's permissions count), but its owner made it read-only.
        # The mode bits count too: for root os.access says every file is writable.
        raise UserError(f"{what} {path} is read-only; make it writable or choose another path")
    existing = path if kind == FOLDER else path.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"cannot write {what} {path}: {existing} is a file, not a folder; choose another path")
    try:
        fd, probe = tempfile.mkstemp(prefix=temp_prefix(), dir=existing)
    except OSError as exc:
        raise UserError(f"cannot write {what} {path}: folder {existing} is not writable ({exc.strerror}); "
                        "choose a writable location") from None
    os.close(fd)
    os.unlink(probe)


def unwritable(what: str, path: str | Path, exc: OSError) -> UserError:
    """The one line for an output path the file system refuses to even look up."""
    fix = ("choose a shorter name (most file systems allow 255 bytes per name)" if exc.errno == errno.ENAMETOOLONG
           else "choose another path")
    return UserError(f"cannot write {what} {path}: {exc.strerror}; {fix}")


def check_outputs(model: onnx.ModelProto) -> None:
    """The graph declares outputs: training fits the original's outputs and validation compares them."""
    if not model.graph.output:
        raise UserError("the model's graph declares no outputs, so there is nothing to train on or to validate; "
                        "re-export the model with its outputs")


def check_weights(imported: ImportedModel) -> None:
    """The model's trainable tensors are finite: a NaN weight makes every loss NaN."""
    for entry in imported.weights:
        value = imported.parameter(entry)
        if not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise UserError(f"the model's tensor {entry.onnx_name!r} holds {bad} NaN or infinite value(s); "
                            "training cannot start from it: fix or re-export the model")


def check_labels(imported: ImportedModel, train: Dataset | PluginData, held_out: Dataset) -> None:
    """Labels are class ids of the score output: in [0, C), C read from one run of the module.

    A plugin's labels are checked as its batches arrive (``PluginData.n_classes``).
    """
    labelled = [(name, d) for name, d in (("training data", train), ("validation data", held_out))
                if isinstance(d, PluginData) or d.labels is not None]
    if imported.score is None or not labelled:
        return
    sample = held_out.take(1).as_feed()
    shape = np.shape(imported.run(sample)[imported.score.index])
    if len(shape) != 2 or imported.score.kind.startswith("binary"):
        raise UserError(f"{labelled[0][0]} has 'labels' (one class id per sample), but the score output "
                        f"{imported.score.name!r} is shaped {list(shape)} ({imported.score.kind}), not [N, C]; "
                        "drop 'labels' to distil on the original model")
    classes = int(shape[-1])
    for name, data in labelled:
        if isinstance(data, PluginData):
            data.n_classes = classes
        else:
            check_label_range(data.labels, classes, name)


def check_runs(path: Path | None, imported: ImportedModel, data: Dataset) -> None:
    """onnxruntime runs the original graph on the data's first samples, before any training: data that the
    torch module accepts but the graph refuses (a recurrent state [2, 1, H] beside N samples, which torch
    broadcasts) fails here in one line instead of after training, in validation. Skipped for a model given
    as a ModelProto (no file to open) and for a graph that keeps a fixed batch (run in chunks later)."""
    if path is None or imported.ort_batch is not None or len(data) == 0:
        return
    from onnx_admm.validate import open_session, run_session

    session = open_session(path, 1)
    names = [o.name for o in session.get_outputs()]
    feed = {k: v for k, v in next(data.take(2).batches(2)).items() if k in {i.name for i in session.get_inputs()}}
    try:
        run_session(session, path, names, feed)
    except UserError as exc:
        raise UserError(f"{exc}; the data does not fit the graph's inputs (their shapes, and the axis each "
                        "input holds the samples on), nothing was trained") from None
