"""One table of ONNX op facts that every graph analysis asks (batch axis, channel groups, ranks, weights).

Each analysis used to keep its own op lists, and they drifted (the channel-group walk lacked Acosh,
Asinh, Atanh, Cosh, Sinh and CastLike that the batch-axis proof had). The families here are facts of
the ONNX operators themselves, not of one analysis; what an analysis does with a family stays with it.
"""

from __future__ import annotations

# Output 0 is the op applied entry by entry to input 0 (any other input is a scalar parameter or, for
# CastLike, a tensor read for its type only).
UNARY = frozenset({
    "Abs", "Acos", "Acosh", "Asin", "Asinh", "Atan", "Atanh", "Cast", "CastLike", "Ceil", "Celu", "Clip", "Cos",
    "Cosh", "Dropout", "Elu", "Erf", "Exp", "Floor", "Gelu", "HardSigmoid", "HardSwish", "Identity", "IsInf",
    "IsNaN", "LeakyRelu", "Log", "Mish", "Neg", "Not", "Reciprocal", "Relu", "Round", "Selu", "Shrink", "Sigmoid",
    "Sign", "Sin", "Sinh", "Softplus", "Softsign", "Sqrt", "Tan", "Tanh", "ThresholdedRelu",
})  # fmt: skip

# Elementwise over several inputs, with numpy-style broadcasting.
BROADCAST = frozenset({
    "Add", "And", "BitShift", "BitwiseAnd", "BitwiseOr", "BitwiseXor", "Div", "Equal", "Greater", "GreaterOrEqual",
    "Less", "LessOrEqual", "Max", "Mean", "Min", "Mod", "Mul", "Or", "Pow", "PRelu", "Sub", "Sum", "Where", "Xor",
})  # fmt: skip

REDUCE = frozenset({
    "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd",
    "ReduceSum", "ReduceSumSquare",
})  # fmt: skip

# Pools with a kernel (kernel_shape gives the spatial rank), and every pool computed per channel over
# the spatial dims of an N x C x ... tensor.
KERNEL_POOLS = frozenset({"AveragePool", "LpPool", "MaxPool"})
POOLS = KERNEL_POOLS | {"GlobalAveragePool", "GlobalLpPool", "GlobalMaxPool"}

# Ops whose first input is N x C x ...: the batch is axis 0 and the channels axis 1.
CHANNEL_FIRST = POOLS | {
    "BatchNormalization", "Conv", "ConvTranspose", "DepthToSpace", "GroupNormalization", "InstanceNormalization",
    "LRN", "SpaceToDepth",
}  # fmt: skip

RECURRENT = frozenset({"GRU", "LSTM", "RNN"})
# Gate blocks per direction: W is [directions, gates * hidden, input], R [directions, gates * hidden, hidden],
# B [directions, 2 * gates * hidden] (LSTM's peepholes P [directions, 3 * hidden]).
RECURRENT_GATES: dict[str, int] = {"LSTM": 4, "GRU": 3, "RNN": 1}
# Inputs of the recurrent ops that onnx2torch's converters (converters.onnx_ops) need as constants: W, R, B
# (and LSTM's peepholes P).
RECURRENT_CONSTANT_INPUTS: dict[str, tuple[int, ...]] = {"LSTM": (1, 2, 3, 7), "GRU": (1, 2, 3), "RNN": (1, 2, 3)}

# Ops with a weight whose filters (output channels) can be counted and removed.
LINEAR = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})

# Op type -> input indices that hold a compressible weight (not biases, not norms). MatMul: whichever
# operand is constant. Recurrent layers: W (input weights) and R (recurrence weights),
# [directions, gates*hidden, in/hidden].
WEIGHT_INPUTS: dict[str, tuple[int, ...]] = {
    "Conv": (1,), "ConvTranspose": (1,), "Gemm": (1,), "Gather": (0,), "MatMul": (0, 1),
    "LSTM": (1, 2), "GRU": (1, 2), "RNN": (1, 2),
}

# Ops whose float constant inputs are trainable (the trainable set). Constants feeding any
# other op (Reshape shapes, Clip bounds, Resize scales, Pow exponents ...) stay fixed buffers.
TRAINABLE_CONSUMERS = frozenset({
    "Conv", "ConvTranspose", "Gemm", "MatMul", "Gather", "Add", "Sub", "Mul", "PRelu",
    "BatchNormalization", "LayerNormalization", "RMSNormalization", "InstanceNormalization", "GroupNormalization",
    "LSTM", "GRU", "RNN",
})  # fmt: skip

# The torch parameter's (output-channel, input-channel) axes per consuming op: Conv and Linear (Gemm)
# keep filters first; a ConvTranspose weight is [in, out / groups, k...]; a MatMul weight [K, N] stays in
# ONNX layout; a recurrent W / R [directions, gates * hidden, input] holds a row per gate and hidden unit
# (the unit's rows lie in ``gates`` blocks, converters.recurrent_units). Gather tables have no filters or
# channels to prune whole.
CHANNEL_AXES: dict[str, tuple[int, int]] = {
    "Conv": (0, 1), "ConvTranspose": (1, 0), "Gemm": (0, 1), "MatMul": (1, 0), "LSTM": (1, 2), "GRU": (1, 2),
    "RNN": (1, 2),
}  # fmt: skip

# The ops whose weights the N:M kernels of sparse tensor cores read (TensorRT's Convolution and fully
# connected layers); a ConvTranspose, an embedding or a recurrent weight gains nothing from the pattern.
NM_OPS = frozenset({"Conv", "Gemm", "MatMul"})

# Where per-channel quantization scales run along another axis than the filters: a recurrent W / R keeps one
# scale per direction (a scale per gate row measured 5-13% larger gzip'd files at the same agreement on four
# recurrent corpus models at 50% + 4 bits).
SCALE_AXES: dict[str, int] = {"LSTM": 0, "GRU": 0, "RNN": 0}

# The domain names of the standard ONNX operators (a node may spell it either way).
DEFAULT_DOMAINS = ("", "ai.onnx")

# Ops that move or select the entries of their input without arithmetic on them: they run the same on
# a quantized tensor's integers as on its float values. (Pad is not here: its pad value would be the
# zero point.)
VALUE_MOVERS = frozenset({
    "MaxPool", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Slice", "Gather", "Split",
    "Identity", "Resize", "DepthToSpace", "SpaceToDepth", "Expand", "Tile",
})  # fmt: skip
