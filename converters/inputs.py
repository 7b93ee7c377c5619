"""Synthesized inputs for a model, for checks that need *some* feed but no real data (``check``).

The values only exercise the graph: they say nothing about accuracy. Shapes and dtypes come from
the graph's declared inputs (``graphinfo.graph_inputs``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import numpy as np
import onnx

from onnx_admm.converters.errors import UserError
from onnx_admm.converters.graphinfo import InputSpec, format_shape, graph_inputs

logger = logging.getLogger(__name__)

# Size given to a symbolic or unknown dim that is not the leading (batch) dim: small enough to be
# cheap, large enough that sequence/spatial ops (pooling, attention) have something to work on.
OTHER_DYNAMIC_DIM = 8

# At most this many bytes of synthesized inputs in all: ``check`` runs them through torch and onnxruntime,
# which hold several times as much in activations, and a declared shape such as [N, 1, 1000000, 1000000]
# would otherwise be allocated (14.6 TiB) before anything could say why.
MAX_SYNTHESIZED_BYTES = 2**30

# Integer inputs are drawn from [0, INT_HIGH): the safe range of an index (embedding rows, token ids)
# cannot be known from the graph, and small non-negative values are valid for most index tables.
INT_HIGH = 10


def synthesize_inputs(model: onnx.ModelProto, batch: int = 2, seed: int = 0,
                      other: int = OTHER_DYNAMIC_DIM) -> dict[str, np.ndarray]:
    """Random inputs shaped and typed like the graph's inputs.

    Rules for dims the graph does not fix: the first dim, when symbolic or unknown, is the batch and
    gets ``batch``; any other symbolic or unknown dim gets ``other`` (8 by default). Values: float
    inputs ~ N(0, 1); integer inputs uniform in [0, 10) — a safe range for indices (embedding rows,
    token ids) cannot be known from the graph, so a model that needs larger or exact indices must be
    checked with real data; bool inputs uniformly random. All values come from one
    ``numpy.random.Generator`` seeded with ``seed``, so the same call gives the same feeds.

    Args:
        model: The model whose graph inputs (initializers excluded) are synthesized.
        batch: Size of a symbolic or unknown leading dim.
        other: Size of any other symbolic or unknown dim.
        seed: Seed of the random generator.

    Returns:
        A feed ``{input_name: array}`` for every graph input.

    Raises:
        UserError: An input has no declared shape, or a dtype that cannot be synthesized (strings,
            complex numbers), or the inputs would take more than ``MAX_SYNTHESIZED_BYTES``; real inputs
            must then be passed with ``--data``.
    """
    if batch < 1 or other < 1:
        raise ValueError(f"batch and other must be >= 1, got {batch} and {other}")
    rng = np.random.default_rng(seed)
    shapes = {spec.name: (spec, _concrete_shape(spec, batch, other)) for spec in graph_inputs(model)}
    _check_size(shapes.values())
    feeds = {}
    for name, (spec, shape) in shapes.items():
        feeds[name] = _random_array(spec, shape, rng)
        logger.debug("synthesized input %r: %s %s", name, spec.dtype, shape)
    return feeds


def _check_size(shapes: Iterable[tuple[InputSpec, tuple[int, ...]]]) -> None:
    """Refuse, before allocating anything, inputs whose bytes add up past ``MAX_SYNTHESIZED_BYTES``."""
    shapes = list(shapes)
    # Python integers: a product of declared dims cannot overflow here the way it would in numpy.
    sizes = [(spec, shape, math.prod(shape) * spec.dtype.itemsize) for spec, shape in shapes]
    total = sum(size for *_, size in sizes)
    if total > MAX_SYNTHESIZED_BYTES:
        spec, shape, size = max(sizes, key=lambda entry: entry[2])
        raise UserError(
            f"graph input {spec.name!r} {format_shape(spec.shape)} would be synthesized as {list(shape)} {spec.dtype} "
            f"({_gib(size)}; {_gib(total)} for all inputs, over the {_gib(MAX_SYNTHESIZED_BYTES)} limit); pass real "
            "inputs with --data (an .npz keyed by input name) or fix the declared shape"
        )


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB"


def _concrete_shape(spec: InputSpec, batch: int, other: int) -> tuple[int, ...]:
    if spec.shape is None:
        raise UserError(
            f"graph input {spec.name!r} declares no shape, so it cannot be synthesized; "
            "pass real inputs with --data (an .npz keyed by input name)"
        )
    shape = []
    for axis, dim in enumerate(spec.shape):
        if isinstance(dim, int):
            shape.append(dim)
        else:
            shape.append(batch if axis == 0 else other)
    return tuple(shape)


def _random_array(spec: InputSpec, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    kind = spec.dtype.kind
    if kind == "f":
        return rng.standard_normal(shape).astype(spec.dtype)
    if kind in "iu":
        return rng.integers(0, INT_HIGH, size=shape).astype(spec.dtype)
    if kind == "b":
        return rng.integers(0, 2, size=shape).astype(bool)
    raise UserError(
        f"graph input {spec.name!r} {format_shape(spec.shape)} has dtype {spec.dtype}, which cannot be "
        "synthesized; pass real inputs with --data (an .npz keyed by input name)"
    )
