"""onnx2torch converters registered under op versions onnx2torch 1.5 leaves out, where the newer version
changes nothing the older converter reads (registered when ``converters.onnx_ops`` is imported).

``LessOrEqual`` and ``GreaterOrEqual`` 16 only add bfloat16 inputs to version 12: dynamo writes a causal mask
with ``LessOrEqual`` (a Hugging Face GPT-2 at opset 20, down-converted to 17), and without a converter the
import stopped there, leaving every layer after the first attention untrained.
"""

from __future__ import annotations

from onnx2torch.node_converters.registry import add_converter, get_converter

# op -> (the version onnx2torch converts, the later versions that only widen the input types)
ALIASES = {"LessOrEqual": (12, (16,)), "GreaterOrEqual": (12, (16,))}

for _op, (_known, _later) in ALIASES.items():
    for _version in _later:
        add_converter(operation_type=_op, version=_version)(get_converter(_op, _known))
