"""Layer-wise reconstruction after the hard projection: a pruned layer's kept weights are refit so that its
outputs on calibration inputs stay what they were before the projection. Pure torch.

Pruning a weight by magnitude loses its contribution; the weights kept beside it can take much of that back
when the layer's inputs are correlated. With ``H = X^T X`` the Gram matrix of the layer's inputs, the
kept weights of each output solve the normal equations ``H_kk v = (H w)_k`` (least squares over the kept
inputs); for layers too large to solve row by row, the Optimal Brain Surgeon update moves the loss of each
pruned weight onto the columns not yet visited, one column at a time (the sequential form of SparseGPT,
Frantar & Alistarh 2023, here with the mask given by the projection instead of chosen). Short label-free
runs gain most: a 50% pruned classifier starts its retraining already agreeing with the original instead of having to find its way back in a few steps.

A layer is a :class:`Tap`: the module that receives its input, which argument, and how the weight maps
inputs to outputs (``linear``: ``[out, in]``; ``matmul``: ``x @ W`` with ``W`` ``[in, out]``; ``conv``: an
``nn.Conv1d``/``nn.Conv2d`` whose unfolded patches are the inputs; ``recurrent``: an input weight
``[directions, gates * hidden, in]`` applied to every step of a sequence, each direction's rows seeing the
same inputs; ``hidden``: a recurrent weight ``[directions, gates * hidden, hidden]`` whose direction d reads
its own hidden state at module ``modules[d]``, laid out block-diagonally so that one Gram matrix holds
every direction, each in its own block). Which modules those are is the
importer's knowledge (``onnx_admm.converters.taps``); this module only hooks them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)

KINDS = ("linear", "matmul", "conv", "recurrent", "hidden")
# Positions (rows of the unfolded input) a conv contributes per sample: enough to estimate a Gram matrix of
# a few thousand columns, bounded so a large feature map does not cost its whole unfold.
POSITIONS_PER_SAMPLE = 256
# A layer of R rows and C columns is refit exactly while R * C^3 stays under this (about ten seconds of one
# core at worst); the systems of one solve take at most EXACT_CHUNK_BYTES.
EXACT_FLOPS = 2e10
EXACT_CHUNK_BYTES = 256 * 2**20
# A layer whose calibration positions per half are under 1 / ``few`` of its inputs is not refit (collect_grams):
# without labels (the refit's aim, the original's layer outputs, is the run's) FEW_POSITIONS, with labels
# FEW_POSITIONS_LABELLED.
FEW_POSITIONS = 32
FEW_POSITIONS_LABELLED = 4


@dataclass(frozen=True)
class Tap:
    """Where a weight's layer receives its input: ``modules`` (every call site of a shared weight) called
    with the input as positional argument ``arg``; ``kind`` says how the weight is laid out (module docstring)."""

    modules: tuple[nn.Module, ...]
    arg: int
    kind: str

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Tap.kind must be one of {KINDS}, got {self.kind!r}")

    def rows(self, weight: Tensor) -> Tensor:
        """The weight as ``[outputs, inputs]`` (a view or transpose, no copy where possible)."""
        if self.kind == "matmul":
            return weight.t()
        if self.kind == "recurrent":
            return weight.reshape(-1, weight.shape[-1])
        if self.kind == "hidden":  # off-block entries are structurally 0 (pruned, for a mask)
            return torch.block_diag(*weight.unbind(0))
        return weight.reshape(weight.shape[0], -1)

    def from_rows(self, rows: Tensor, like: Tensor) -> Tensor:
        if self.kind == "hidden":
            out, inp = like.shape[1], like.shape[2]
            return torch.stack([rows[d * out:(d + 1) * out, d * inp:(d + 1) * inp] for d in range(like.shape[0])])
        return rows.t().reshape(like.shape) if self.kind == "matmul" else rows.reshape(like.shape)

    def columns(self, module: nn.Module, x: Tensor) -> Tensor:
        """The layer input as ``[positions, inputs]`` rows, matching :meth:`rows`' columns."""
        if self.kind == "hidden":  # direction d's states in block d, zeros elsewhere
            d, blocks = next(i for i, m in enumerate(self.modules) if m is module), len(self.modules)
            x = x.reshape(-1, x.shape[-1])
            return torch.cat([x if b == d else torch.zeros_like(x) for b in range(blocks)], dim=1)
        if self.kind != "conv":
            return x.reshape(-1, x.shape[-1])
        if isinstance(module, nn.Conv1d):  # as a 2-D conv of height 1
            x = x.unsqueeze(2)
            kernel, dilation = (1, *module.kernel_size), (1, *module.dilation)
            padding, stride = (0, *module.padding), (1, *module.stride)
        else:
            kernel, dilation, padding, stride = module.kernel_size, module.dilation, module.padding, module.stride
        if tuple(kernel) == (1, 1) and not any(padding):  # the pixels themselves: no unfold copy of the map
            patches = x[:, :, ::stride[0], ::stride[1]].flatten(2)
        else:
            patches = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # [N, C*k, L]
        if patches.shape[2] > POSITIONS_PER_SAMPLE:
            pick = torch.linspace(0, patches.shape[2] - 1, POSITIONS_PER_SAMPLE, device=x.device).long()
            patches = patches[:, :, pick]
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])


def gram_bytes(weight: Tensor, tap: Tap, teacher: bool = False) -> int:
    """Memory :func:`collect_grams` holds for the weight: float32 matrices of its inputs, one per half of
    the calls, two per half with a teacher (the Gram and the cross term)."""
    columns = tap.rows(weight).shape[1]
    return columns * columns * 4 * 2 * (2 if teacher else 1)


@dataclass
class Grams:
    """Per tapped weight and per half of the calibration calls (0: even calls, 1: odd ones): ``gram`` =
    ``X^T X`` of the layer's inputs and, with a teacher, ``cross`` = ``X^T X_t`` against the teacher's inputs
    to the same layer on the same samples (float32 sums of float32 products: the damping of the solves is
    orders above their rounding) and ``energy`` = ``||X_t W_t^T||^2``, the squared norm of the teacher
    layer's outputs (which only the reported error needs: a scalar from ``[positions, outputs]`` products
    instead of a third ``X_t^T X_t`` matrix); ``count`` the positions summed."""

    gram: dict[str, list[Tensor]]
    cross: dict[str, list[Tensor]]
    energy: dict[str, list[float]]
    count: dict[str, list[int]]

    def mean(self, store: dict[str, list[Tensor]], name: str, half: int | None = None) -> Tensor:
        """The mean over one half, or over both (``half`` None), in float64 for the solves."""
        if half is not None:
            return store[name][half].double() / max(self.count[name][half], 1)
        return (store[name][0].double() + store[name][1].double()) / max(sum(self.count[name]), 1)


def collect_grams(taps: Mapping[str, Tap], calls: Iterable[tuple[Callable[[], None], int]],
                  teacher: Mapping[str, tuple[Tap, Tensor]] | None = None, total: int | None = None,
                  few: float = FEW_POSITIONS) -> Grams:
    """Gram matrices of each tapped layer's inputs over what ``calls`` feed the model (and the teacher),
    the even calls' and the odd calls' kept apart: one half fits a refit, the other checks it.

    Each call runs the model under ``torch.no_grad()`` in eval mode (BatchNorm statistics must not move) on
    a few samples; with ``teacher`` (per weight, the teacher's tap and its value of the weight) it runs the
    student and then the teacher on the same samples, so each teacher input meets the student input it
    follows (held until then: keep the calls small).

    ``calls`` are (call, samples it feeds) pairs. ``total``, the samples of all calls, lets a layer be left
    out at its first call when the positions it will see in a half are under ``1 / few`` of its inputs
    (its Gram matrices are then never built). Fewer positions than inputs are no reason by themselves:
    layer inputs lie near a subspace, the ridge solution stays within what the samples show, and the check
    on the other half keeps a refit only where it helps. Without labels, leaving out every layer under a
    quarter (mobilenet_v3_small's head and squeeze-excitation layers on 128 images) cost 8.6 points of
    held-out agreement in one-shot 50% pruning (0.875 against 0.961): the cut is 1/32 there. Far below it
    the refit pins down little and costs the most (a 4,096-input layer fed 48 samples: 9 s and 1 GB of
    memory). With labels the quarter stays: refitting LeNet-5's 800-input fc1 (128 positions a half) at
    40x lowered the benchmark's top-1 by 0.29 and 0.99 points (seeds 0 / 1; 0.60 / 0.89 with 1,024 samples),
    though the check on the other half passed it: the layer outputs are the labels' proxy there, not the aim.
    """
    gram: dict[str, list[Tensor]] = {}
    cross: dict[str, list[Tensor]] = {}
    energy: dict[str, list[float]] = {}
    count: dict[str, list[int]] = {}
    pending: dict[str, list[Tensor]] = {}
    half, current = [0], [1]
    handles = []

    def add(store: dict[str, list[Tensor]], name: str, value: Tensor) -> None:
        if name not in store:
            store[name] = [torch.zeros_like(value), torch.zeros_like(value)]
        store[name][half[0]] += value

    skipped: set[str] = set()

    def student(name: str, tap: Tap) -> Callable:
        def record(module: nn.Module, args: tuple) -> None:
            if name in skipped:
                return
            x = tap.columns(module, args[tap.arg].detach()).float()
            if (name not in gram and total is not None
                    and x.shape[0] * total / current[0] / 2 < x.shape[1] / few):
                logger.info("%s: no refit (about %d calibration positions for %d inputs)", name,
                            x.shape[0] * total // current[0], x.shape[1])
                skipped.add(name)
                count[name] = [0, 0]
                return
            add(gram, name, x.t() @ x)
            count.setdefault(name, [0, 0])[half[0]] += x.shape[0]
            if teacher is not None and name in teacher:
                pending.setdefault(name, []).append(x)
        return record

    def original(name: str, tap: Tap, weight: Tensor) -> Callable:
        rows = tap.rows(weight.detach()).float()

        def record(module: nn.Module, args: tuple) -> None:
            if name in skipped:
                return
            x_t = tap.columns(module, args[tap.arg].detach()).float()
            add(cross, name, pending[name].pop(0).t() @ x_t)
            outputs = x_t @ rows.t().to(x_t.device)
            energy.setdefault(name, [0.0, 0.0])[half[0]] += float(outputs.double().square().sum())
        return record

    try:
        for name, tap in taps.items():
            for module in tap.modules:
                handles.append(module.register_forward_pre_hook(student(name, tap)))
        for name, (tap, weight) in (teacher or {}).items():
            for module in tap.modules:
                handles.append(module.register_forward_pre_hook(original(name, tap, weight)))
        for i, (call, n) in enumerate(calls):
            half[0], current[0] = i % 2, max(n, 1)
            call()
    finally:
        for handle in handles:
            handle.remove()
    return Grams(gram, cross, energy, {n: c for n, c in count.items() if n in gram})


def refit(rows: Tensor, gram: Tensor, mask: Tensor, damp: float = 0.01, target: Tensor | None = None) -> Tensor:
    """The weight ``rows`` ``[R, C]`` pruned to ``mask``, its kept entries refit to minimise
    ``||X v - Y||^2 + lam ||v - rows||^2`` per row; masked entries come out exactly 0.

    ``Y`` is the layer's own output ``X rows`` unless ``target`` gives ``X^T Y`` (``[R, C]`` as rows, e.g. an
    original layer's outputs seen from this model's inputs). ``lam`` is ``damp`` times the mean diagonal of
    ``gram`` = ``X^T X``: it keeps the solution near ``rows`` where the inputs say little (few samples).
    The objective is ``(v - w*) H (v - w*)^T`` around the dense optimum ``w*``. Each row is solved exactly
    where it is affordable: over its kept columns (``H_kk v_k = (H w*)_k``) when they are fewer than the
    pruned ones, else by the multi-weight Optimal Brain Surgeon step ``v = w* - H^-1[:, p] (H^-1[p, p])^-1
    w*_p`` over its pruned columns p. A layer where even that costs too much gets the sequential OBS update
    of SparseGPT (each pruned weight's error spread onto the columns after it), ``C^3 + R C^2`` but with more
    error left.
    """
    h = _damped(gram, damp)
    star = _optimum(rows, gram, h, target)
    keep = mask.to(torch.bool)
    kept, pruned = int(keep.sum(1).max()), int((~keep).sum(1).max())
    if star.shape[0] * min(kept, pruned) ** 3 <= EXACT_FLOPS:
        out = (_over_kept(star, h, keep) if kept <= pruned
               else _over_pruned(star, torch.cholesky_inverse(torch.linalg.cholesky(h)), keep))
        return out.to(rows.dtype)
    return _sequential(star.clone(), h, lambda j, column: column * keep[:, j])[0].to(rows.dtype)


def round_to_grid(rows: Tensor, gram: Tensor, scale: Tensor, low: int, high: int, mask: Tensor, damp: float = 0.01,
                  target: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The weight ``rows`` ``[R, C]`` put on the grid ``k * scale`` (integer ``k`` in [``low``, ``high``],
    ``scale`` ``[R, C]``: each entry's own, a row's or the tensor's repeated), column by column, each column's
    rounding error spread onto the columns after it by the Optimal Brain Surgeon update (GPTQ, Frantar et al.
    2023), so that ``||X v - Y||`` stays small where nearest rounding adds up every column's error; entries
    outside ``mask`` come out 0. ``Y``, ``damp`` and ``target`` as in :func:`refit`.

    Returns, in ``scale``'s dtype, the weights on the grid (each value ``k * scale`` computed in that dtype, as
    a dequantized tensor holds it) and the compensated weights they were rounded from: the grid point nearest
    each of those is the chosen one, so training through the straight-through estimator starts there intact.
    """
    h = _damped(gram, damp)
    star = _optimum(rows, gram, h, target)
    keep, wide = mask.to(torch.bool), scale.double()

    def settle(j: int, column: Tensor) -> Tensor:
        k = torch.clamp(torch.round(column / wide[:, j]), low, high)
        # The product in the scale's dtype, as DequantizeLinear computes it: exactly a level of the export.
        return torch.where(keep[:, j], k.to(scale.dtype) * scale[:, j], 0.0).double()

    on_grid, compensated = _sequential(star.clone(), h, settle)
    return on_grid.to(scale.dtype), compensated.to(scale.dtype)


def _damped(gram: Tensor, damp: float) -> Tensor:
    """``gram`` in float64 plus ``damp`` times its mean diagonal; an input that is always 0 in the calibration
    data gets a diagonal of its own (it has no say: its weights keep their values)."""
    h = gram.double().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    h += damp * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    return h


def _optimum(rows: Tensor, gram: Tensor, h: Tensor, target: Tensor | None) -> Tensor:
    """The dense optimum in float64: ``rows`` itself for its own outputs; else (H + lam) w* = target + lam *
    rows (and the dead inputs' weights kept), the same expression as h @ rows less what gram contributes."""
    w = rows.detach().double()
    return w if target is None else _spd_solve(h, (target.double() + w @ h - w @ gram.double()).t()).t()


def _sequential(w: Tensor, h: Tensor, settle: Callable[[int, Tensor], Tensor],
                block: int = 128) -> tuple[Tensor, Tensor]:
    """The column-by-column OBS update of SparseGPT and GPTQ: column j is set to ``settle(j, column)`` (its
    kept entries, its grid points) and the error is spread onto the columns after it, in blocks of columns
    whose updates to the columns after them are applied at once (one matrix product per block). Returns the
    settled columns and the columns as they were just before being settled (``w`` is updated in place)."""
    # The upper Cholesky factor of H^-1: row i holds the update of columns i.. for column i's error.
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    columns = w.shape[1]
    settled = torch.empty_like(w)
    for start in range(0, columns, block):
        end = min(start + block, columns)
        part, errors = w[:, start:end], torch.zeros_like(w[:, start:end])
        local = hinv[start:end, start:end]
        for i in range(end - start):
            settled[:, start + i] = settle(start + i, part[:, i])
            error = (part[:, i] - settled[:, start + i]) / local[i, i]
            # Columns i + 1.. only: column i keeps the value it was settled from (the compensated weights).
            part[:, i + 1:] -= error.unsqueeze(1) * local[i, i + 1:].unsqueeze(0)
            errors[:, i] = error
        w[:, end:] -= errors @ hinv[start:end, end:]
    return settled, w


def _spd_solve(matrix: Tensor, rhs: Tensor) -> Tensor:
    """``matrix^-1 rhs`` for symmetric positive definite (batches of) matrices, by Cholesky: every system
    here is one (a damped Gram matrix, its inverse, their principal blocks padded with identity), and the
    batched LU of ``torch.linalg.solve`` fails in some MKL builds (``DLASWP`` parameter errors)."""
    return torch.cholesky_solve(rhs, torch.linalg.cholesky(matrix))


def _padded(select: Tensor) -> tuple[Tensor, Tensor]:
    """Per row, the column indices where ``select`` holds, padded to the longest row: ``(index, valid)``."""
    width = int(select.sum(1).max())
    order = torch.argsort((~select).to(torch.int8), dim=1, stable=True)[:, :width]
    valid = torch.gather(select, 1, order)
    return order, valid


def _chunks(rows: int, width: int) -> list[slice]:
    """Slices of the rows whose padded ``width x width`` systems take at most EXACT_CHUNK_BYTES together."""
    step = max(1, int(EXACT_CHUNK_BYTES // (8 * max(width, 1) ** 2)))
    return [slice(start, start + step) for start in range(0, rows, step)]


def _system(matrix: Tensor, index: Tensor, valid: Tensor) -> Tensor:
    """``matrix[index_i, index_j]`` per row, identity on the padding."""
    v = valid.to(matrix.dtype)
    picked = matrix[index.unsqueeze(2), index.unsqueeze(1)] * v.unsqueeze(2) * v.unsqueeze(1)
    return picked + torch.diag_embed(1 - v)


def _over_kept(star: Tensor, h: Tensor, keep: Tensor) -> Tensor:
    """``H_kk v_k = (H w*)_k`` per row over its kept columns k (batched, padded to the longest row)."""
    out = torch.zeros_like(star)
    index, valid = _padded(keep)
    rhs = torch.gather(star @ h, 1, index) * valid
    for part in _chunks(star.shape[0], index.shape[1]):
        solution = _spd_solve(_system(h, index[part], valid[part]), rhs[part].unsqueeze(-1)).squeeze(-1)
        out[part].scatter_(1, index[part], solution * valid[part])
    return out


def _over_pruned(star: Tensor, hinv: Tensor, keep: Tensor) -> Tensor:
    """``v = w* - H^-1[:, p] (H^-1[p, p])^-1 w*_p`` per row over its pruned columns p; then exactly 0 there."""
    out = star.clone()
    index, valid = _padded(~keep)
    if index.shape[1] == 0:
        return out
    for part in _chunks(star.shape[0], index.shape[1]):
        z = _spd_solve(_system(hinv, index[part], valid[part]),
                       (torch.gather(star[part], 1, index[part]) * valid[part]).unsqueeze(-1)).squeeze(-1)
        # sum over p of z_p H^-1[p, :], as one product with z scattered to its columns (H^-1 is symmetric)
        spread = torch.zeros_like(star[part]).scatter_(1, index[part], z * valid[part])
        out[part] -= spread @ hinv
    return out * keep


def objective(v: Tensor, gram: Tensor, target: Tensor, energy: float) -> float:
    """``||X v - Y||^2`` per position: ``tr(v H v^T) - 2 tr(v T^T) + ||Y||^2`` with ``T`` = ``X^T Y`` as rows
    and ``energy`` = ``||Y||^2``."""
    d = v.double()
    return float(((d @ gram) * d).sum() - 2 * (d * target).sum()) + energy


@dataclass(frozen=True)
class Grid:
    """The k-bit grid a weight was projected onto: ``k * scale`` for integer ``k`` in [``low``, ``high``],
    ``scale`` broadcastable to the weight (one per tensor, or per channel along its axis)."""

    scale: Tensor
    low: int
    high: int


@dataclass(frozen=True)
class Refit:
    """What reconstruction did to one weight, measured on the calibration half it was not fit on: the mean
    squared output error (against the aim) of the plain projection and of the refit, and whether the refit
    was kept."""

    projected: float
    refit: float
    used: bool


def reconstruct(params: Mapping[str, nn.Parameter], before: Mapping[str, Tensor], supports: Mapping[str, Tensor],
                taps: Mapping[str, Tap], grams: Grams, teacher: Mapping[str, Tensor] | None = None,
                damp: float = 0.01, grids: Mapping[str, Grid] | None = None,
                compensated: dict[str, Tensor] | None = None) -> dict[str, Refit]:
    """Refit each projected weight in ``params`` (now ``before`` times its support) on its Gram matrices.

    Without a teacher the refit keeps the layer's outputs at those of ``before``; with ``teacher`` (the
    original's value of each weight, and ``grams.cross``) it aims at the original layer's outputs, from this
    model's inputs. The refit is fit on one half of the calibration calls and kept only when it also lowers
    the error on the other half (a layer with more inputs than the samples can pin down would otherwise
    fit their noise); the weights then get the refit on both halves.

    A weight in ``grids`` was projected onto k-bit levels (nearest rounding, zeros outside its support): it
    is rounded again by :func:`round_to_grid` on the same grid, kept on the same terms against the nearest
    rounding, and its compensated weights (where training through the levels starts) go to
    ``compensated``.
    """
    out = {}
    with torch.no_grad():
        for name in grams.gram:
            tap, p = taps[name], params[name]
            if min(grams.count[name]) == 0:  # one call only: nothing to check a refit on
                continue
            full = tap.rows(before[name].to(p.device)).double()
            mask = tap.rows(supports[name])
            aim = teacher is not None and name in grams.cross and name in teacher
            original = tap.rows(teacher[name].to(p.device)).double() if aim else None

            def target(half: int | None, teacher_side: bool = True) -> Tensor:
                g = grams.mean(grams.gram, name, half).to(p.device)
                if aim and teacher_side:
                    return original @ grams.mean(grams.cross, name, half).to(p.device).t()
                return full @ g

            def energy(half: int) -> float:
                if aim:
                    return grams.energy[name][half] / max(grams.count[name][half], 1)
                g = grams.mean(grams.gram, name, half).to(p.device)
                return float(((full @ g) * full).sum())

            grid = (grids or {}).get(name)
            if grid is None:
                def fit(half: int | None, teacher_side: bool = True) -> tuple[Tensor, Tensor | None]:
                    return refit(full, grams.mean(grams.gram, name, half).to(p.device), mask, damp,
                                 target(half, teacher_side) if aim and teacher_side else None), None
            else:
                scale = tap.rows(grid.scale.expand_as(p).to(p.device))

                def fit(half: int | None, teacher_side: bool = True) -> tuple[Tensor, Tensor | None]:
                    return round_to_grid(full, grams.mean(grams.gram, name, half).to(p.device), scale, grid.low,
                                         grid.high, mask, damp, target(half, teacher_side) if aim and teacher_side
                                         else None)
            check, aim_b = grams.mean(grams.gram, name, 1).to(p.device), target(1)
            # The plain projection: the kept entries as they were, or their nearest levels.
            plain = full * mask if grid is None else tap.rows(p.detach()).double()
            projected = objective(plain, check, aim_b, energy(1))
            # Aiming at the teacher's outputs, then (where that fails the check: the part of the teacher's
            # outputs this model's inputs cannot explain, fit on few samples, is noise) at this layer's own
            # outputs before the projection, from the same inputs; each judged by the teacher's aim.
            used, error, side, failed = False, projected, True, False
            for side in ((True, False) if aim else (True,)):
                try:
                    fitted, _ = fit(0, side)
                except RuntimeError as exc:  # torch.linalg: not positive definite even with damping
                    logger.info("%s: no refit (%s)", name, exc)
                    failed = True
                    break
                error = objective(fitted, check, aim_b, energy(1))
                used = bool(torch.isfinite(fitted).all()) and error < projected and sum(grams.count[name]) > 0
                if used:
                    break
            if failed:
                continue
            if used:
                rows, start = fit(None, side)
                used = bool(torch.isfinite(rows).all()) and (start is None or bool(torch.isfinite(start).all()))
                if used:
                    p.copy_(tap.from_rows(rows.to(p.dtype), p))
                    if start is not None and compensated is not None:
                        compensated[name] = tap.from_rows(start.to(p.dtype), p)
            out[name] = Refit(projected, error if used else projected, used)
    return out
