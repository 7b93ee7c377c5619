"""A phase's rollback on a non-finite loss: weights, optimizer state and the ADMM state come back."""

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from onnx_admm.converters.importer import import_model
from onnx_admm.admm import ADMM, RhoSchedule
from onnx_admm.pipeline.rollback import Rollback
from onnx_admm.projections import Unstructured


def _gemm_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(4, 6)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_rollback_restores_weights_optimizer_and_admm_state():
    imported = import_model(_gemm_model())
    (entry,) = imported.weights
    param = imported.parameter(entry)
    optimizer = torch.optim.SGD([param], lr=0.1, momentum=0.9)
    admm = ADMM({"w": param}, {"w": Unstructured(8)}, RhoSchedule(0.01, 2.0, 1.0))

    def step() -> None:
        optimizer.zero_grad()
        (param ** 2).sum().backward()
        optimizer.step()
        admm.update()

    step()
    rollback = Rollback(imported, optimizer, admm)
    rollback.save()
    saved = (param.detach().clone(), optimizer.state[param]["momentum_buffer"].clone(), admm.Z["w"].clone(),
             admm.U["w"].clone(), admm.rho["w"], admm.n_updates)
    step()
    with torch.no_grad():
        param.view(-1)[0] = float("nan")
    admm.update()  # Z and U now follow the NaN weight
    assert not torch.isfinite(admm.U["w"]).all() and admm.n_updates == saved[5] + 2
    rollback.restore()
    assert torch.equal(param.detach(), saved[0])
    assert torch.equal(optimizer.state[param]["momentum_buffer"], saved[1])
    assert torch.equal(admm.Z["w"], saved[2]) and torch.equal(admm.U["w"], saved[3])
    assert admm.rho["w"] == saved[4] and admm.n_updates == saved[5]
    assert all(len(h) == saved[5] for h in admm.residual_history.values())


def test_rollback_without_admm_leaves_no_admm_state():
    imported = import_model(_gemm_model())
    param = imported.parameter(imported.weights[0])
    optimizer = torch.optim.SGD([param], lr=0.1)
    rollback = Rollback(imported, optimizer)
    rollback.save()
    before = param.detach().clone()
    with torch.no_grad():
        param.mul_(2)
    rollback.restore()
    assert torch.equal(param.detach(), before) and rollback.admm_state is None
