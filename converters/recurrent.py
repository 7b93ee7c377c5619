"""onnx2torch converters for the recurrent ops it lacks: ``LSTM``, ``GRU``, ``RNN``, registered with its
``add_converter`` when this module is imported (``converters.onnx_ops`` imports it).

Since-versions 7 and 14 (a model at opset 22+ is down-converted to 17 first): one module per node holding
``W``, ``R``, ``B`` (and LSTM's peepholes ``P``) as Parameters in ONNX layout, so the weight map needs no layout
transform and write-back is a plain copy. The recurrence is written here in torch: gates ``iofc`` (LSTM) and
``zrh`` (GRU, both values of ``linear_before_reset``), forward / reverse / bidirectional, ``layout`` 0 and 1,
initial states and ``sequence_lens`` as inputs (empty optional inputs allowed), the ONNX activation list,
``clip`` and LSTM's ``input_forget``. Multi-layer torch RNNs export as a chain of such nodes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from onnx2torch.node_converters.registry import add_converter
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OnnxMapping, OnnxToTorchModule, OperationConverterResult
from torch import nn

from onnx_admm.converters.optable import RECURRENT_GATES


# ONNX activation name -> (function(x, alpha, beta), default alpha, default beta); None: not used.
_ACTIVATIONS: dict[str, tuple[Callable, float | None, float | None]] = {
    "relu": (lambda x, a, b: torch.relu(x), None, None),
    "tanh": (lambda x, a, b: torch.tanh(x), None, None),
    "sigmoid": (lambda x, a, b: torch.sigmoid(x), None, None),
    "affine": (lambda x, a, b: a * x + b, 1.0, 0.0),
    "leakyrelu": (lambda x, a, b: F.leaky_relu(x, a), 0.01, None),
    "thresholdedrelu": (lambda x, a, b: torch.where(x > a, x, torch.zeros_like(x)), 1.0, None),
    "scaledtanh": (lambda x, a, b: a * torch.tanh(b * x), 1.0, 1.0),
    "hardsigmoid": (lambda x, a, b: torch.clamp(a * x + b, 0.0, 1.0), 0.2, 0.5),
    "elu": (lambda x, a, b: F.elu(x, a), 1.0, None),
    "softsign": (lambda x, a, b: F.softsign(x), None, None),
    "softplus": (lambda x, a, b: F.softplus(x), None, None),
}

# op -> the default activations of one direction
_DEFAULT_ACTIVATIONS = {"LSTM": ("Sigmoid", "Tanh", "Tanh"), "GRU": ("Sigmoid", "Tanh"), "RNN": ("Tanh",)}

# (module attribute, ONNX input index, weight-map role) of the Parameters a recurrent module holds.
RECURRENT_PARAMS = (("W", 1, "weight"), ("R", 2, "weight"), ("B", 3, "bias"), ("P", 7, "param"))


class _Activation(NamedTuple):
    """An ONNX recurrent activation with its alpha/beta (a value, so the module pickles and deep-copies)."""

    name: str  # a key of _ACTIVATIONS
    alpha: float | None
    beta: float | None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return _ACTIVATIONS[self.name][0](x, self.alpha, self.beta)


def _activation_list(node: OnnxNode, per_direction: tuple[str, ...], directions: int) -> list[_Activation]:
    """The activations with their alpha/beta bound, ``directions * len(per_direction)`` of them.

    alpha and beta values are consumed in order by the activations that take them (onnxruntime's
    rule); a list given for one direction of a bidirectional node is used for both.
    """
    names = node.attributes.get("activations") or list(per_direction)
    if len(names) == len(per_direction) and directions == 2:
        names = list(names) * 2
    if len(names) != len(per_direction) * directions:
        raise NotImplementedError(f"{node.operation_type} with {len(names)} activations for {directions} direction(s)")
    alphas = list(node.attributes.get("activation_alpha", []))
    betas = list(node.attributes.get("activation_beta", []))
    result = []
    for name in names:
        if name.lower() not in _ACTIVATIONS:
            raise NotImplementedError(f"{node.operation_type} activation {name!r} is not supported")
        _, default_a, default_b = _ACTIVATIONS[name.lower()]
        a = (alphas.pop(0) if alphas else default_a) if default_a is not None else None
        b = (betas.pop(0) if betas else default_b) if default_b is not None else None
        result.append(_Activation(name.lower(), a, b))
    return result


class OnnxRecurrent(nn.Module, OnnxToTorchModule):
    """One ONNX LSTM / GRU / RNN node: ``forward(X, sequence_lens, initial_h, initial_c)``.

    Returns ``(Y, Y_h[, Y_c])`` cut to the node's output count (Y alone for one output), with
    ``Y`` [seq, directions, batch, hidden] and ``Y_h`` [directions, batch, hidden] for layout 0, and
    [batch, seq, directions, hidden] / [batch, directions, hidden] for layout 1.
    """

    def __init__(
        self,
        op: str,
        W: torch.Tensor,
        R: torch.Tensor,
        B: torch.Tensor | None,
        P: torch.Tensor | None,
        hidden_size: int,
        direction: str,
        layout: int,
        activations: list[_Activation],
        clip: float | None,
        linear_before_reset: bool,
        input_forget: bool,
        n_outputs: int,
    ) -> None:
        super().__init__()
        self.op = op
        self.W = nn.Parameter(W)
        self.R = nn.Parameter(R)
        self.B = nn.Parameter(B) if B is not None else None
        self.P = nn.Parameter(P) if P is not None else None
        self.hidden_size = hidden_size
        self.direction = direction
        self.layout = layout
        self.activations = activations
        self.clip = clip
        self.linear_before_reset = linear_before_reset
        self.input_forget = input_forget
        self.n_outputs = n_outputs
        # Where each direction's hidden state enters R at every step: identities a forward hook can watch
        # (reconstruction refits R on the states it reads; a hook on this module sees only the sequence).
        self.hidden_taps = nn.ModuleList(nn.Identity() for _ in range(2 if direction == "bidirectional" else 1))

    def forward(  # noqa: D102 - documented on the class
        self,
        X: torch.Tensor,
        sequence_lens: torch.Tensor | None = None,
        initial_h: torch.Tensor | None = None,
        initial_c: torch.Tensor | None = None,
    ):
        if self.layout == 1:
            X = X.transpose(0, 1)
            initial_h = initial_h.transpose(0, 1) if initial_h is not None else None
            initial_c = initial_c.transpose(0, 1) if initial_c is not None else None
        seq, batch = X.shape[0], X.shape[1]
        directions = 2 if self.direction == "bidirectional" else 1
        per_dir = len(self.activations) // directions
        zeros = X.new_zeros(batch, self.hidden_size)
        steps = None
        if sequence_lens is not None:
            lens = sequence_lens.to(device=X.device, dtype=torch.long)
            t = torch.arange(seq, device=X.device).unsqueeze(1)
            steps = t < lens.unsqueeze(0)  # [seq, batch]: which steps are real
        ys, hs, cs = [], [], []
        for d in range(directions):
            reverse = self.direction == "reverse" or d == 1
            order = None
            x = X
            if reverse:
                order = self._reverse_order(seq, batch, sequence_lens, X.device)
                x = X.gather(0, order.unsqueeze(-1).expand_as(X))
            h0 = initial_h[d] if initial_h is not None else zeros
            c0 = initial_c[d] if initial_c is not None else zeros
            acts = self.activations[d * per_dir:(d + 1) * per_dir]
            y, h, c = self._direction(d, x, h0, c0, steps, acts)
            if reverse:
                y = y.gather(0, order.unsqueeze(-1).expand_as(y))
            ys.append(y)
            hs.append(h)
            cs.append(c)
        Y = torch.stack(ys, 1)
        Y_h = torch.stack(hs, 0)
        Y_c = torch.stack(cs, 0) if self.op == "LSTM" else None
        if self.layout == 1:
            Y = Y.permute(2, 0, 1, 3)
            Y_h = Y_h.transpose(0, 1)
            Y_c = Y_c.transpose(0, 1) if Y_c is not None else None
        outputs = (Y, Y_h, Y_c)[: self.n_outputs]
        return outputs[0] if self.n_outputs == 1 else outputs

    @staticmethod
    def _reverse_order(seq: int, batch: int, lens: torch.Tensor | None, device) -> torch.Tensor:
        """Time indices [seq, batch] that reverse each sequence within its own length (an involution)."""
        t = torch.arange(seq, device=device).unsqueeze(1).expand(seq, batch)
        if lens is None:
            return seq - 1 - t
        lens = lens.to(device=device, dtype=torch.long).unsqueeze(0)
        return torch.where(t < lens, lens - 1 - t, t)

    def _clip(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.clip is None else torch.clamp(x, -self.clip, self.clip)

    def _direction(self, d, x, h, c, steps, acts):
        H = self.hidden_size
        gates = self.W.shape[1] // H
        W, R = self.W[d], self.R[d]
        if self.B is not None:
            wb, rb = self.B[d, : gates * H], self.B[d, gates * H:]
        else:
            wb = rb = x.new_zeros(gates * H)
        xw = torch.matmul(x, W.t()) + wb  # every step's input projection at once: [seq, batch, G*H]
        ys = []
        for t in range(x.shape[0]):
            h = self.hidden_taps[d](h)
            if self.op == "LSTM":
                h_new, c_new = self._lstm_step(d, xw[t], h, c, R, rb, acts)
            elif self.op == "GRU":
                h_new, c_new = self._gru_step(xw[t], h, R, rb, acts), c
            else:
                h_new, c_new = acts[0](self._clip(xw[t] + torch.matmul(h, R.t()) + rb)), c
            if steps is not None:
                live = steps[t].unsqueeze(1)
                ys.append(torch.where(live, h_new, torch.zeros_like(h_new)))
                h, c = torch.where(live, h_new, h), torch.where(live, c_new, c)
            else:
                ys.append(h_new)
                h, c = h_new, c_new
        return torch.stack(ys, 0), h, c

    def _lstm_step(self, d, xw, h, c, R, rb, acts):
        f, g, h_act = acts
        gates = xw + torch.matmul(h, R.t()) + rb
        i, o, fg, cg = gates.chunk(4, dim=-1)
        if self.P is not None:
            pi, po, pf = self.P[d].chunk(3)
            i, fg = i + pi * c, fg + pf * c
        i = f(self._clip(i))
        fg = 1 - i if self.input_forget else f(self._clip(fg))
        c_new = fg * c + i * g(self._clip(cg))
        if self.P is not None:
            o = o + po * c_new
        return f(self._clip(o)) * h_act(c_new), c_new

    def _gru_step(self, xw, h, R, rb, acts):
        f, g = acts
        H = self.hidden_size
        xz, xr, xh = xw.chunk(3, dim=-1)
        rz, rr, rh = rb.chunk(3)
        hzr = torch.matmul(h, R[: 2 * H].t())
        z = f(self._clip(xz + hzr[..., :H] + rz))
        r = f(self._clip(xr + hzr[..., H:] + rr))
        if self.linear_before_reset:
            candidate = xh + r * (torch.matmul(h, R[2 * H:].t()) + rh)
        else:
            candidate = xh + torch.matmul(r * h, R[2 * H:].t()) + rh
        return (1 - z) * g(self._clip(candidate)) + z * h


def _constant(node: OnnxNode, graph: OnnxGraph, index: int) -> torch.Tensor | None:
    """The initializer at input ``index`` (None when the input is absent)."""
    if index >= len(node.input_values) or not node.input_values[index]:
        return None
    name = node.input_values[index]
    if name not in graph.initializers:
        raise NotImplementedError(
            f"{node.operation_type} input {index} ({name!r}) is computed at run time; onnx-admm needs W, R, B "
            "and P as constant tensors to train them"
        )
    return graph.initializers[name].to_torch().clone()


def _convert_recurrent(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    op = node.operation_type
    gates, default_acts = RECURRENT_GATES[op], _DEFAULT_ACTIVATIONS[op]
    attrs = node.attributes
    direction = attrs.get("direction", "forward")
    directions = 2 if direction == "bidirectional" else 1
    W, R = _constant(node, graph, 1), _constant(node, graph, 2)
    hidden = int(attrs.get("hidden_size", R.shape[-1]))
    if W.shape[0] != directions or W.shape[1] != gates * hidden:
        raise NotImplementedError(f"{op} W of shape {tuple(W.shape)} does not match {directions} direction(s), "
                                  f"hidden_size {hidden}")
    P = _constant(node, graph, 7) if op == "LSTM" else None
    clip = attrs.get("clip")
    module = OnnxRecurrent(
        op, W, R, _constant(node, graph, 3), P,
        hidden_size=hidden,
        direction=direction,
        layout=int(attrs.get("layout", 0)),
        activations=_activation_list(node, default_acts, directions),
        clip=float(clip) if clip is not None else None,
        linear_before_reset=bool(attrs.get("linear_before_reset", 0)),
        input_forget=bool(attrs.get("input_forget", 0)),
        n_outputs=len(node.output_values),
    )
    # W, R, B, P live in the module; the forward arguments are X, sequence_lens, initial_h[, initial_c].
    inputs = list(node.input_values) + [""] * (8 - len(node.input_values))
    forward_inputs = [inputs[0], inputs[4], inputs[5]] + ([inputs[6]] if op == "LSTM" else [])
    while forward_inputs and not forward_inputs[-1]:
        forward_inputs.pop()
    return OperationConverterResult(module, OnnxMapping(inputs=tuple(forward_inputs), outputs=node.output_values))


# Since-versions up to opset 17 (the normalize pass brings newer models down to 17). Opset 1's LSTM and
# RNN (output_sequence attribute) and GRU (no linear_before_reset) are left out: no exporter writes them.
_RECURRENT_VERSIONS = {"LSTM": (7, 14), "GRU": (3, 7, 14), "RNN": (7, 14)}
for _op, _versions in _RECURRENT_VERSIONS.items():
    for _version in _versions:
        add_converter(operation_type=_op, version=_version)(_convert_recurrent)
