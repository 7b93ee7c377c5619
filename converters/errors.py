"""The one exception type for problems the user can fix (bad file, bad data, bad recipe).

It lives on the ONNX side because converters must not import the engine; the engine and the
product re-export it as ``onnx_admm.UserError``. The CLI turns it into a one-line message and
exit status 1, never a traceback.
"""


class UserError(Exception):
    """A problem with the user's input. The message names the problem and the fix, on one line."""
