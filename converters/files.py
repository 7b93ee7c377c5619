"""What a path names, told from its metadata alone: an input must be a regular file before anything opens it.

Opening a FIFO blocks until something writes into it, and a device can be read forever, so every input
(the model, its external data, the data, the recipe) goes through ``require_file`` first, which only
calls ``stat``. The output checks name what is in the way with the same ``file_kind``.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from onnx_admm.converters.errors import UserError

REGULAR = "a regular file"
FOLDER = "a folder"

_KINDS = ((stat.S_ISREG, REGULAR), (stat.S_ISDIR, FOLDER), (stat.S_ISFIFO, "a FIFO (named pipe)"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def file_kind(path: str | os.PathLike) -> str | None:
    """What is at ``path`` (symlinks followed): ``REGULAR``, ``FOLDER``, "a FIFO (named pipe)", ...; None when
    nothing is there. Nothing is opened.

    Raises:
        OSError: The path cannot be looked up (a name too long, a folder above it that cannot be searched).
    """
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    return next((kind for test, kind in _KINDS if test(mode)), "not a regular file")


def require_file(path: str | os.PathLike, what: str, fix: str) -> Path:
    """``path`` as a Path, after checking that it names an existing regular file (a symlink to one counts).

    Args:
        path: The input.
        what: How messages name it ("model", "data file", "recipe").
        fix: What the user should pass instead, ending the message.

    Raises:
        UserError: Nothing is there, something other than a regular file is, or the path cannot be looked up.
    """
    try:
        kind = file_kind(path)
    except OSError as exc:
        raise UserError(f"cannot read {what} {path}: {exc.strerror}; {fix}") from None
    if kind is None:
        raise UserError(f"{what} {path} does not exist; {fix}")
    if kind != REGULAR:
        raise UserError(f"{what} {path} is {kind}, not a regular file; {fix}")
    return Path(path)


def read_text(path: str | os.PathLike, what: str, fix: str) -> str:
    """The UTF-8 text of the regular file at ``path`` (``require_file``), or a one-line UserError naming
    ``what`` and ending in ``fix`` (unreadable, or not UTF-8: a binary file passed by mistake)."""
    path = require_file(path, what, fix)
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot read {what} {path}: {exc.strerror or exc}; {fix}") from None
    except UnicodeDecodeError:
        raise UserError(f"{what} {path} is not UTF-8 text (is it a binary file?); {fix}") from None
