"""The project's exceptions: one base class, and the type for problems the user can fix (bad file, bad
data, bad recipe).

It lives on the ONNX side because converters must not import the engine; the engine and the
product re-export it as ``onnx_admm.UserError``. The CLI turns it into a one-line message and
exit status 1, never a traceback.
"""


class OnnxAdmmError(Exception):
    """The base of every error onnx-admm raises on purpose (``except OnnxAdmmError`` catches them all)."""


class UserError(OnnxAdmmError):
    """A problem with the user's input. The message names the problem and the fix, on one line."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none: what a one-line error
    quotes of a library's (onnx's C++ converter, onnxruntime) many-line messages."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def ort_message(exc: BaseException) -> str:
    """onnxruntime's first line without its status number: "[ONNXRuntimeError] : 10 : INVALID_GRAPH : ..." ->
    "INVALID_GRAPH : ..."."""
    line = first_line(exc)
    prefix = "[ONNXRuntimeError] : "
    if line.startswith(prefix):
        line = line[len(prefix):].split(" : ", 1)[-1]
    return line


# What a model with a string input needs before onnx-admm can train it: torch holds no strings, so neither the
# import nor the data can carry them (the import and the data checks give the same fix).
STRING_INPUT_FIX = ("encode the strings as integer codes before the model and export it with integer inputs "
                    "(scikit-learn: an OrdinalEncoder fitted outside the pipeline, and Int64TensorType inputs "
                    "for skl2onnx)")
