"""The ONNX side of onnx-admm: normalize, import through onnx2torch, weight map, write-back, encoders.

Nothing here imports the ``onnx_admm`` engine.
"""

from onnx_admm.converters.errors import UserError

__all__ = ["UserError"]
