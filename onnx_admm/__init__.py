"""onnx-admm: ADMM compression of ONNX models, written back into the original graph."""

from pathlib import Path as _Path

# The ONNX side lives in the source tree's top-level converters/ folder and is installed as
# onnx_admm.converters (pyproject's package-dir). Run from a checkout (PYTHONPATH, no install), the
# folder sits beside this package: the package's path then reaches it, so the one name works everywhere.
_tree = _Path(__file__).resolve().parent.parent
if not (_Path(__file__).parent / "converters").is_dir() and (_tree / "converters" / "optable.py").is_file():
    __path__.append(str(_tree))  # noqa: F821 - a package's __path__ is set before its __init__ runs

from onnx_admm.converters.errors import OnnxAdmmError, UserError  # noqa: E402 - needs the path above

__version__ = "0.1.0"

__all__ = ["OnnxAdmmError", "UserError", "__version__"]
