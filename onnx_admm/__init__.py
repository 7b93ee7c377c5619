"""onnx-admm: ADMM compression of ONNX models, written back into the original graph."""

from converters.errors import UserError

__version__ = "0.1.0"

__all__ = ["UserError", "__version__"]
