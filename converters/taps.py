"""Where each compressible weight's layer receives its input in the converted module, for reconstruction.

onnx2torch turns a Gemm with a constant B into ``nn.Linear``, a Conv into ``nn.Conv1d/2d``, and keeps a
MatMul or a Gemm with a graph-input-like B as ``OnnxMatMul``/``OnnxGemm`` fed by a ``get_attr`` of the
parameter. Those are the layers reconstruction can hook (each module called with the layer's input as its
first argument); anything else (grouped or padded-by-name
convs, transposed convs, a GRU's R without linear_before_reset, a weight used as the left operand) has no tap and is left as
projected.
"""

from __future__ import annotations

from torch import fx, nn

from onnx_admm.converters.importer import ImportedModel
from onnx_admm.converters.recurrent import OnnxRecurrent


def _conv_ok(module: nn.Module) -> bool:
    return (isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups == 1
            and not isinstance(module.padding, str) and module.padding_mode == "zeros")


def _matmul_kind(module: nn.Module, node: fx.Node, weight: fx.Node) -> str | None:
    """How ``node`` uses ``weight`` as its right operand: ``matmul`` (x @ W) or ``linear`` (x @ W^T)."""
    name = type(module).__name__
    if len(node.args) < 2 or node.args[1] is not weight or node.args[0] is weight:
        return None
    if name == "OnnxMatMul":
        return "matmul"
    if name == "OnnxGemm" and not module.trans_a:
        return "linear" if module.trans_b else "matmul"
    return None


def _reads_state(module: OnnxRecurrent) -> bool:
    """Whether every gate's rows of R read the hidden state itself (a GRU without linear_before_reset feeds
    its candidate gate r * h instead)."""
    return module.op in ("LSTM", "RNN") or (module.op == "GRU" and module.linear_before_reset)


def weight_taps(imported: ImportedModel, names: list[str]) -> dict[str, tuple[tuple[nn.Module, ...], str]]:
    """For each of the parameters ``names`` that has one: the modules its layer's input enters as first
    argument (every call site of a shared weight) and the weight's kind: ``linear`` (``[out, in]``),
    ``matmul`` (``x @ W``, ``[in, out]``), ``conv`` (an ``nn.Conv1d``/``nn.Conv2d``), ``recurrent`` (an
    LSTM/GRU/RNN input weight ``[directions, gates * hidden, in]``) or ``hidden`` (its recurrent weight R,
    read at each direction's ``hidden_taps`` module)."""
    graph_module = getattr(imported.module, "graph_module", None)
    if not isinstance(graph_module, fx.GraphModule):
        return {}
    modules = dict(graph_module.named_modules())
    prefix = "graph_module."
    getters: dict[str, list[fx.Node]] = {}
    for node in graph_module.graph.nodes:
        if node.op == "get_attr":
            getters.setdefault(str(node.target), []).append(node)
    calls = {str(node.target) for node in graph_module.graph.nodes if node.op == "call_module"}
    taps = {}
    for name in names:
        if not name.startswith(prefix):
            continue
        local = name[len(prefix):]
        owner_name, _, attr = local.rpartition(".")
        owner = modules.get(owner_name)
        if attr == "weight" and owner_name in calls and isinstance(owner, nn.Linear):
            taps[name] = ((owner,), "linear")
        elif attr == "weight" and owner_name in calls and owner is not None and _conv_ok(owner):
            taps[name] = ((owner,), "conv")
        elif attr == "W" and owner_name in calls and isinstance(owner, OnnxRecurrent):
            taps[name] = ((owner,), "recurrent")  # the sequence input, the module's first argument
        elif attr == "R" and owner_name in calls and isinstance(owner, OnnxRecurrent) and _reads_state(owner):
            taps[name] = (tuple(owner.hidden_taps), "hidden")
        elif local in getters:
            users = [user for node in getters[local] for user in node.users]
            kinds = {_matmul_kind(modules[str(u.target)], u, u.args[1]) if u.op == "call_module"
                     and len(u.args) > 1 and u.args[1] in getters[local] else None for u in users}
            param = imported.module.get_parameter(name)
            if users and param.dim() == 2 and len(kinds) == 1 and None not in kinds:
                taps[name] = (tuple(modules[str(u.target)] for u in users), kinds.pop())
    return taps
