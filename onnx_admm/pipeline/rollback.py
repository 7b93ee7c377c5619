"""A run's weight values as tensors apart from the module (snapshots, the best state a phase keeps), and
the rollback a phase makes on a non-finite loss."""

from __future__ import annotations

import copy
from typing import Any

import torch

from onnx_admm.converters.importer import ImportedModel
from onnx_admm.admm import ADMM


def load_values(imported: ImportedModel, values: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for entry in imported.weights:
            imported.parameter(entry).copy_(values[entry.param])


def snapshot(imported: ImportedModel) -> dict[str, torch.Tensor]:
    return {e.param: imported.parameter(e).detach().to("cpu", copy=True) for e in imported.weights}


def copy_values(imported: ImportedModel, into: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The current weights copied into the buffers of an earlier ``snapshot`` (no new allocation)."""
    with torch.no_grad():
        for entry in imported.weights:
            into[entry.param].copy_(imported.parameter(entry))
    return into


class Rollback:
    """Where a phase rolls back to on a non-finite loss: the weights, the optimizer's state and (in an
    ADMM phase) Z, U and rho at the start of the current epoch.

    One set of buffers per phase, allocated at its first ``save`` and copied into at every epoch's start
    (a fresh snapshot and a deep copy of the optimizer state per epoch held two of each at the switch and
    churned the allocator on large models).
    """

    def __init__(self, imported: ImportedModel, optimizer: torch.optim.Optimizer, admm: ADMM | None = None) -> None:
        self.imported, self.optimizer, self.admm = imported, optimizer, admm
        self.values: dict[str, torch.Tensor] | None = None
        self.state: dict[int, dict[str, Any]] = {}  # id(param) -> its optimizer state at the save
        self.admm_state: dict[str, Any] | None = None

    def save(self) -> None:
        self.values = (snapshot(self.imported) if self.values is None
                       else copy_values(self.imported, self.values))
        if self.admm is not None:
            self.admm_state = self.admm.state_dict()
        saved = {}
        for param, state in self.optimizer.state.items():
            old = self.state.get(id(param), {})
            saved[id(param)] = {key: _copy_into(old.get(key), value) for key, value in state.items()}
        self.state = saved

    def restore(self) -> None:
        load_values(self.imported, self.values)
        if self.admm is not None:
            # Z and U updated from the diverging weights would pull the restored ones towards them.
            self.admm.load_state_dict(self.admm_state)
        state = self.optimizer.state
        for param in list(state):
            if id(param) not in self.state:  # its state began after the save (the phase's first step)
                del state[param]
        for group in self.optimizer.param_groups:
            for param in group["params"]:
                if id(param) in self.state:
                    state[param] = {key: (value.clone() if torch.is_tensor(value) else copy.deepcopy(value))
                                    for key, value in self.state[id(param)].items()}


def _copy_into(buffer: Any, value: Any) -> Any:
    """``value`` copied into ``buffer`` when that is a tensor of its shape, else a fresh copy."""
    if not torch.is_tensor(value):
        return copy.deepcopy(value)
    if torch.is_tensor(buffer) and buffer.shape == value.shape and buffer.dtype == value.dtype:
        with torch.no_grad():
            return buffer.copy_(value)
    return value.detach().clone()
