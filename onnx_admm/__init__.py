"""onnx-admm: ADMM compression of ONNX models, written back into the original graph."""

from converters.errors import OnnxAdmmError, UserError

__version__ = "0.1.0"

__all__ = ["OnnxAdmmError", "UserError", "__version__"]
