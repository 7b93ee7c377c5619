"""Data parallelism on PyTorch's own engine: torchrun's environment, the process group, DDP, one writer.

Under ``torchrun --nproc-per-node N [--nnodes M] -m onnx_admm.cli compress ...`` (or any launcher that
sets WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT) every process runs the same compress:

- ``World.from_env`` reads the environment; ``session`` opens the process group (gloo on the CPU,
  nccl on CUDA, each process on ``cuda:LOCAL_RANK``) and closes it at the end.
- ``World.wrap`` puts the converted module in ``DistributedDataParallel`` for the training steps, so
  each step's gradient is the mean over the processes; the teacher and every evaluation use the plain
  module (a DDP forward is a collective: one process cannot run it alone).
- The training order of each epoch is the single-process order (same seed), split DistributedSampler
  style (``onnx_admm.data.shard_order``): each process takes every N-th sample, so it trains on 1/N of
  the batches, each of ``train.batch_size`` samples (the global batch is N times that, as in PyTorch).
- A loader plugin's stream is read whole by every process and its batches dealt round-robin
  (``onnx_admm.sources.PluginData.batches``); its length is unknown, so before each step the ranks agree
  that each still has a batch (``every``) and all end the epoch when one has run out.
- Whatever chooses (the selection metric, the rollback of a non-finite loss) is decided once and
  shared (``agreed``, ``mean``), and ADMM's Z and U, the projected weights, the masks and the levels are
  broadcast from rank 0 (``SyncedADMM``, ``broadcast_``): DDP keeps the weights equal, so this only
  guards against a kernel that is not bit-reproducible, but the masks are then identical by
  construction. Each stage's masks, levels and kept weights are hashed per process and the report
  lists the hashes of every rank (``summary``).
- Only rank 0 writes (the other ranks plan no output at all), validates and reports; the others wait for
  its outcome (``conclude``) and end with the same status (``PeerFailed`` carries it).
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from onnx_admm.converters.errors import UserError, first_line
from onnx_admm.admm import ADMM

logger = logging.getLogger(__name__)

T = TypeVar("T")

# How long a process waits for the others at one collective. The other ranks wait in one while rank 0
# validates in onnxruntime and writes, which can outlast torch's default (30 min for gloo, 10 for nccl)
# on a large model; a peer that dies is noticed at once anyway (its connection closes), so the timeout
# only ends a wait on a peer that hangs.
_TIMEOUT = datetime.timedelta(hours=3)


class PeerFailed(UserError):
    """Rank 0 failed (after training, or its gate) and said why; the other ranks end with its status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message or f"rank 0 ended with status {status}")
        self.exit_status = status


class PeerLost(UserError):
    """A collective failed: another process of the run died (killed, out of memory, an error of its own)."""


@contextmanager
def _peers(world: World) -> Iterator[None]:
    """A failed collective as one line instead of gloo's traceback; the dead process's own log says why."""
    try:
        yield
    except RuntimeError as exc:
        raise PeerLost(f"rank {world.rank} of {world.size} lost contact with the other processes of the run "
                       f"({first_line(exc)}); the log of the process that stopped says why; nothing was written"
                       ) from None


@dataclass(frozen=True)
class World:
    """The processes of one run: ``size`` of them, this one ``rank`` (``local_rank`` on its node)."""

    size: int = 1
    rank: int = 0
    local_rank: int = 0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> World:
        """The world torchrun describes in WORLD_SIZE, RANK and LOCAL_RANK; one process without them."""
        env = os.environ if environ is None else environ
        try:
            size = int(env.get("WORLD_SIZE", "1"))
            rank = int(env.get("RANK", "0"))
            local = int(env.get("LOCAL_RANK", str(rank)))
        except ValueError:
            raise UserError(f"WORLD_SIZE, RANK and LOCAL_RANK must be integers, got {env.get('WORLD_SIZE')!r}, "
                            f"{env.get('RANK')!r}, {env.get('LOCAL_RANK')!r}; start the processes with torchrun") from None
        if size < 1 or not 0 <= rank < size or local < 0:
            raise UserError(f"RANK {rank} / WORLD_SIZE {size} / LOCAL_RANK {local} do not describe a process of a run; "
                            "start the processes with torchrun")
        return cls(size, rank, local)

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        """Rank 0: the process that validates and writes."""
        return self.rank == 0

    def device(self, device: str) -> torch.device:
        """``cuda`` without an index means this process's GPU, ``cuda:LOCAL_RANK``, when several run."""
        chosen = torch.device(device)
        if self.active and chosen.type == "cuda" and chosen.index is None:
            return torch.device("cuda", self.local_rank)
        return chosen

    # -- collectives (no-ops in one process)

    def _device(self) -> torch.device:
        """Where collective tensors live: nccl only moves CUDA tensors."""
        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def wrap(self, module: nn.Module, device: torch.device) -> nn.Module:
        """``module`` in DistributedDataParallel (it shares the parameters), or as it is in one process."""
        if not self.active:
            return module
        # static_graph: DDP learns at the first step which parameters the graph leaves without a gradient
        # (an ONNX graph is the same at every step), where find_unused_parameters would search every step.
        # The converted module stays in eval mode and its buffers never change: nothing to broadcast.
        return nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False,
            static_graph=True)

    def broadcast_(self, tensors: Iterable[Tensor]) -> None:
        """Overwrite each tensor in place with rank 0's."""
        if not self.active:
            return
        here = self._device()
        with torch.no_grad():
            for t in tensors:
                # gloo has no bool type: masks travel as bytes.
                wire = t.to(here, torch.uint8 if t.dtype == torch.bool else t.dtype).contiguous()
                with _peers(self):
                    dist.broadcast(wire, 0)
                if wire.data_ptr() != t.data_ptr():
                    t.copy_(wire.to(t.dtype))

    def agreed(self, compute: Callable[[], float | None]) -> float | None:
        """Rank 0's value of ``compute()`` on every rank (the others do not compute it): a choice made on
        it (the retraining state kept) is then the same everywhere."""
        return self.agreed_values(lambda: (compute(),), 1)[0]

    def agreed_values(self, compute: Callable[[], tuple[float | None, ...]], n: int) -> tuple[float | None, ...]:
        """:meth:`agreed` for a tuple of ``n`` values, each a float or None."""
        if not self.active:
            return compute()
        values = compute() if self.main else (None,) * n
        wire = torch.tensor([x for v in values for x in (v is None, 0.0 if v is None else v)], dtype=torch.float64,
                            device=self._device())
        with _peers(self):
            dist.broadcast(wire, 0)
        return tuple(None if wire[2 * i].item() else wire[2 * i + 1].item() for i in range(n))

    def mean(self, value: float) -> float:
        """The mean of ``value`` over the ranks: NaN or infinite when it is on any rank."""
        if not self.active:
            return value
        wire = torch.tensor([value], dtype=torch.float64, device=self._device())
        with _peers(self):
            dist.all_reduce(wire)
        return wire.item() / self.size

    def every(self, flag: bool) -> bool:
        """True when ``flag`` is True on every rank (the MIN of a 0/1 flag): a rank that stops a loop on it
        stops it where all the others do (a loader plugin's epoch, whose length each rank learns alone)."""
        if not self.active:
            return flag
        wire = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self._device())
        with _peers(self):
            dist.all_reduce(wire, op=dist.ReduceOp.MIN)
        return bool(wire.item())

    def gather(self, value: T) -> list[T]:
        """Every rank's ``value`` (picklable), in rank order."""
        if not self.active:
            return [value]
        out: list[Any] = [None] * self.size
        with _peers(self):
            dist.all_gather_object(out, value)
        return out

    def conclude(self, finish: Callable[[], T], follow: Callable[[dict | None], T]) -> T:
        """Rank 0 runs ``finish`` (validate, write, report) and tells the others how it ended; they wait
        for that, then return ``follow(rank 0's report)`` or raise PeerFailed with its status and message."""
        if not self.active:
            return finish()
        if self.main:
            try:
                out = finish()
            except BaseException as exc:
                self._announce(_status_of(exc), str(exc), getattr(getattr(exc, "result", None), "report", None))
                raise
            self._announce(0, "", getattr(out, "report", None))
            return out
        status, message, report = self._announced()
        if status:
            raise PeerFailed(status, message)
        return follow(report)

    def _announce(self, status: int, message: str, report: dict | None) -> None:
        try:
            dist.broadcast_object_list([status, message, report], 0)
        except Exception:  # a peer already gone: rank 0's own outcome stands
            logger.warning("could not tell the other ranks how rank 0 ended", exc_info=True)

    def _announced(self) -> tuple[int, str, dict | None]:
        box: list[Any] = [None, None, None]
        with _peers(self):
            dist.broadcast_object_list(box, 0)
        return box[0], box[1], box[2]


def _status_of(exc: BaseException) -> int:
    """The exit status the command line gives ``exc``: its ``exit_status`` (CompressInterrupted: 130 or 143;
    AccuracyGateFailed: 3), else 1."""
    status = getattr(exc, "exit_status", None)
    return status if isinstance(status, int) else 1


@contextmanager
def session(world: World, device: torch.device) -> Iterator[World]:
    """The process group of ``world`` (opened here unless the caller already did; then it is left open)."""
    if not world.active or dist.is_initialized():
        yield world
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    logger.info("rank %d of %d: joining the process group (%s)", world.rank, world.size, backend)
    dist.init_process_group(backend, timeout=_TIMEOUT)
    try:
        yield world
    finally:
        dist.destroy_process_group()


class SyncedADMM(ADMM):
    """ADMM whose Z/U updates and hard projection end with rank 0's Z, U, weights and masks on every rank."""

    def __init__(self, world: World, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.world = world
        world.broadcast_(self.Z.values())

    def update(self) -> dict[str, float]:
        residuals = super().update()
        self.world.broadcast_([*self.Z.values(), *self.U.values()])
        return residuals

    def hard_project(self) -> dict[str, Tensor]:
        supports = super().hard_project()
        self.world.broadcast_([p.detach() for p in self.params.values()])
        self.world.broadcast_(supports.values())
        return supports


def digest(tensors: Iterable[Tensor]) -> str:
    """A SHA-256 of the tensors' bytes (in the given order): equal digests, bit-identical tensors."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
