"""The converted fx graph's parameters: one Parameter per ONNX weight tensor, and nothing trainable that cannot be
written back.

onnx2torch gives each node its own copy of a weight (a module attribute, or a buffer of the graph module's
``initializers`` read through get_attr): ``tie`` makes every use of one ONNX tensor read one Parameter, so a
shared weight trains once and is written back once; ``freeze_unmapped`` stops the rest from training and drops
the buffers no node reads any more.
"""

from __future__ import annotations

import logging

import torch
from torch import fx, nn

logger = logging.getLogger(__name__)


def current_value(gm: fx.GraphModule, use: tuple) -> torch.Tensor:
    owner, attr = use[0], use[1]
    if isinstance(owner, fx.Node):
        return gm.get_buffer(owner.target)
    return getattr(owner, attr)


def tie(gm: fx.GraphModule, container: nn.Module, group: list) -> str:
    """Make every use in ``group`` read one Parameter; return its qualified name."""
    first = group[0]
    if isinstance(first[0], fx.Node):
        data = gm.get_buffer(first[0].target).detach().clone()
        param = nn.Parameter(data)
        key = f"p{len(container._parameters)}"
        container.register_parameter(key, param)
        qualified = f"onnx_params.{key}"
    else:
        param = getattr(first[0], first[1])
        qualified = f"{module_name(gm, first[0])}.{first[1]}"
    for owner, attr, *_ in group:
        if isinstance(owner, fx.Node):
            owner.target = qualified
        elif getattr(owner, attr) is not param:
            setattr(owner, attr, param)
    return qualified


def module_name(gm: fx.GraphModule, module: nn.Module) -> str:
    for name, candidate in gm.named_modules():
        if candidate is module:
            return name
    raise RuntimeError("module not found in graph module")


def freeze_unmapped(gm: fx.GraphModule, mapped: set[str]) -> None:
    """Parameters we cannot write back must not train: the ONNX model would not see the change."""
    for name, param in gm.named_parameters():
        if name not in mapped:
            logger.debug("freezing %s: no ONNX tensor to write it back to", name)
            param.requires_grad_(False)
    # Promoted buffers are dead now; drop them so memory holds one copy.
    live = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    container = getattr(gm, "initializers", None)
    for name in list(container._buffers) if container is not None else []:
        if f"initializers.{name}" not in live:
            del container._buffers[name]
