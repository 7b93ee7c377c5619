"""The stage loop of a compress run: per progressive stage, the ADMM phase (W steps with the penalty
gradient, Z/U updates, rho growing), the exact hard projection, then masked (or straight-through)
retraining that keeps the best selection-split state; NaN rollback per phase; tensors batched from the
data (split into chunks when the batch exceeds the memory budget)."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from onnx_admm.converters.encoders import QuantSpec
from onnx_admm.converters.errors import UserError
from onnx_admm.converters.groups import ChannelGroup
from onnx_admm.converters.importer import ImportedModel
from onnx_admm.admm import ADMM, FixedSupport, RhoSchedule
from onnx_admm.data import Dataset
from onnx_admm.distributed import SyncedADMM, World, digest
from onnx_admm.levels import FixedLevels, RefitLevels, StraightThrough
from onnx_admm.memory import PeakMemory
from onnx_admm.pipeline.batch import choose_batch, even_steps, to_batches
from onnx_admm.pipeline.reconstruction import HANDOVER_MAX_STEPS, StageRefit, handover_check
from onnx_admm.pipeline.rollback import Rollback, copy_values, load_values, snapshot
from onnx_admm.pipeline.sensitivity import sample, with_curves
from onnx_admm.pipeline.results import CompressResult, StageResult
from onnx_admm.plan import ImpossibleTarget, Plan, WeightPlan, nm_constraint, sparsity_constraints
from onnx_admm.quant_choices import QuantChoice
from onnx_admm.progress import Progress
from onnx_admm.quantizers import Joint, quantize
from onnx_admm.recipe import PRECISIONS, CompressConfig
from onnx_admm.schedule import SENSITIVITY_SAMPLES, PhaseBudget, admm_period, initial_rho, lr_factor, rho_limit
from onnx_admm.train import (EmptyEpoch, Loss, NoGradient, NonFiniteLoss, Precision, ScoreSpec, Standing, evaluate,
                             make_optimizer, standing, train_epoch)

logger = logging.getLogger(__name__)


class Runner:
    """One compress run: the stages of ADMM, hard projection and retraining over the planned weights."""

    def __init__(self, imported: ImportedModel, config: CompressConfig, plan: Plan, train_data, select: Dataset,
                 held_out: Dataset, device: torch.device, emit: Progress, groups: dict[str, ChannelGroup],
                 memory: PeakMemory | None = None, world: World = World()) -> None:
        self.imported, self.config, self.plan, self.groups, self.world = imported, config, plan, groups, world
        self.cfg = config.train
        self.train_data, self.select, self.held_out, self.device, self.emit = train_data, select, held_out, device, emit
        score = imported.score
        self.score = ScoreSpec(score.index if score else None, score.kind if score else "logits", self.cfg.blank)
        # The teacher serves distillation (training batches without labels, or any batch when there is no
        # score output for labels to apply to) and agreement (held-out split without labels). A plugin's
        # labels are unknown until it runs, so it always gets one.
        self.train_labeled = train_labeled = isinstance(train_data, Dataset) and train_data.labels is not None
        self.teacher = None
        if (held_out.labels is None or select.labels is None or not train_labeled or self.score.index is None
                or self.cfg.distill > 0):
            self.teacher = copy.deepcopy(imported.module).eval()
            self.teacher.requires_grad_(False)
        if self.score.index is None and held_out.labels is not None:
            logger.warning("the model has no score output ([N, C] float): labels are ignored and the loss is MSE "
                           "to the original model's outputs")
        self.loss_fn = Loss(self.score, distill=self.cfg.distill, balance=self.cfg.balance)
        self.precision = _precision(self.cfg.precision, device)
        self.batch, self.warnings = choose_batch(imported, self.cfg, self.teacher is not None)
        self.memory = memory or PeakMemory()
        self.trained = world.wrap(imported.module, device)  # what the training steps run (DDP under torchrun)
        self.batches_trained = 0
        self.state_digests: list[str] = []  # per stage: masks, levels and kept weights (equal on every rank)
        self.params = {w.spec.name: imported.module.get_parameter(w.spec.name) for w in plan.weights}
        self.stages: list[StageResult] = []
        self.epoch_counter = 0
        self._calibration: Dataset | None = None
        self.history: list[dict[str, Any]] = []  # the current stage's epoch records
        self.dense_metric = self.val_metric()
        self.memory.mark("data")

    # -- helpers

    def batches(self, ds, shuffle: bool, seed: int | None = None, steps: bool = False, label: str = "an epoch"):
        """Tensor batches of ``ds``: with ``steps``, one list of chunks per training step, else chunk by chunk.

        Training batches are this process's share of the epoch's order (of a loader plugin's stream: every
        ``world.size``-th batch, as many as every other rank has; ``label`` names the epoch in the log of
        the tail dropped); evaluation reads the whole split.
        """
        # A plugin's layout (which inputs have a sample axis) is the one its first samples showed.
        batched = ds.batched if isinstance(ds, Dataset) else self.select.batched
        shard = {"shard": (self.world.rank, self.world.size)} if shuffle and self.world.active else {}
        feeds = ds.batches(self.batch.train, shuffle=shuffle, seed=seed, **shard)
        if shard and not isinstance(ds, Dataset):
            feeds = even_steps(feeds, self.world, self.batch.train, batched, label)
        return to_batches(feeds, self.imported.input_names, self.device, self.batch.chunk, batched, steps)

    def calibration(self) -> Dataset:
        """The training samples reconstruction calibrates on: one seeded sample per run; for a loader plugin,
        of the selection split (its first samples, already read) rather than another pass over the plugin."""
        if self._calibration is None:
            source = self.train_data if isinstance(self.train_data, Dataset) else self.select
            self._calibration = sample(source, self.config.prune.reconstruct_samples, self.cfg.seed + 3)
        return self._calibration

    def val_metric(self) -> float | None:
        """The metric on the held-out split (reported only, never used to choose)."""
        return self.world.agreed(
            lambda: evaluate(self.imported.module, self.batches(self.held_out, False), self.score, self.teacher))

    def select_metric(self) -> float | None:
        """The metric on the selection split (rank 0's, on every rank)."""
        return self.world.agreed(
            lambda: evaluate(self.imported.module, self.batches(self.select, False), self.score, self.teacher))

    def select_standing(self) -> Standing:
        """The metric on the selection split and, without labels, the training loss there, which pick the
        state kept (rank 0's, on every rank): ``Standing.compare``. With labels a tie goes to the later state:
        the loss settling ties cost the digits quick start 3.9 points on one seed of three (95.56 / 95.00 /
        91.94% against 95.00 / 95.56 / 95.83%). Without a score output there is no metric, and states are
        level whatever their loss: no pass over the split."""
        loss = self.loss_fn if self.score.index is not None and not self.train_labeled else None
        return Standing(*self.world.agreed_values(lambda: dataclasses.astuple(standing(
            self.imported.module, self.batches(self.select, False), self.score, self.teacher, loss)), 2))

    def world_report(self) -> dict[str, Any]:
        """The report's ``distributed``: processes, batch sizes, and what each rank trained on and ended with."""
        ranks = self.world.gather((self.batches_trained, self.state_digests))
        out = {"world_size": self.world.size, "rank_batch_size": self.batch.train,
               "global_batch_size": self.world.size * self.batch.train, "batches_per_rank": [b for b, _ in ranks]}
        if self.world.active:
            out.update(backend=torch.distributed.get_backend(), stage_sha256_per_rank=[d for _, d in ranks],
                       identical_across_ranks=all(d == ranks[0][1] for _, d in ranks))
            if not out["identical_across_ranks"]:
                logger.warning("the ranks ended a stage with different masks, levels or weights: rank 0's are written")
        return out

    def optimizer(self) -> torch.optim.Optimizer:
        cfg = self.cfg
        return make_optimizer(self.imported.module.parameters(), cfg.optimizer, self.config.lr, cfg.momentum,
                              cfg.weight_decay)

    def result(self, external: bool, name: str, inputs: list[tuple[str, Path]]) -> CompressResult:
        return CompressResult(self.imported, self.config, list(self.stages), external_data=external,
                              groups=self.groups, name=name, inputs=inputs)

    # -- the run

    def run(self) -> None:
        previous: dict[str, torch.Tensor] | None = None
        if self.plan.allocation.method == "sensitivity":  # each pool layer pruned alone, once per run
            measured = sample(self.train_data, SENSITIVITY_SAMPLES, self.cfg.seed + 2)
            self.plan = with_curves(self.plan, self.params, lambda: self.world.agreed(lambda: evaluate(
                self.imported.module, self.batches(measured, False), self.score, self.teacher)), self.emit)
        budgets = self.config.stage_budgets(self.plan.n_stages)
        lengths = [self.phase_length(epochs)[1] for b in budgets for epochs in (b.admm, b.retrain)]
        self.emit({"kind": "run", "stages": self.plan.n_stages, "batches": self.steps_per_epoch(),
                   "steps": None if None in lengths else sum(lengths)})
        split = list(budgets)  # the tool's split, which a stage that takes its ADMM phase back returns to
        handed = False
        for stage in range(self.plan.n_stages):
            check = handover_check(self, stage, previous) if handed else None
            if check is not None and check["admm"]:
                budgets[stage:] = split[stage:]
            previous = self.stage(stage, previous, budgets[stage], check)
            handed = handed and not (check or {}).get("admm")
            if self.skip_admm_after(stage):
                budgets[stage + 1:] = [PhaseBudget(0.0, b.admm + b.retrain) for b in budgets[stage + 1:]]
                handed = True

    def skip_admm_after(self, stage: int) -> bool:
        """Whether the stages after ``stage`` give their ADMM epochs to retraining: the tool split the budget
        (``train.epochs``), this stage's ADMM projection lost to the (refit) projection of its starting
        weights, and its ADMM phase was short (under ``HANDOVER_MAX_STEPS`` optimizer steps), so more ADMM
        epochs would likely be thrown away again (every process decides alike: the choice rests on rank 0's
        selection metric and on step counts every rank shares)."""
        last = self.stages[-1] if self.stages else None
        start = ((last.reconstruction or {}).get("start") or (last.quantized_start or {}).get("kept")) if last else None
        if start != "stage start" or self.cfg.epochs is None or stage + 1 >= self.plan.n_stages:
            return False
        if last.admm_steps >= HANDOVER_MAX_STEPS:
            logger.info("stage %d: the stage start beat the ADMM phase's projection; with %d steps an ADMM phase "
                        "is long enough to keep, so the later stages keep theirs", stage, last.admm_steps)
            return False
        logger.info("stage %d: the stage start beat the ADMM phase's projection (%d steps); the later stages "
                    "retrain for their whole budget", stage, last.admm_steps)
        return True

    def constraints(self, stage: int, previous: dict[str, torch.Tensor] | None,
                    values: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Each weight's constraint at ``stage``; a global budget is split over layers by ``values``."""
        try:
            sparsity = sparsity_constraints(self.plan, values, stage, previous)
        except ImpossibleTarget as exc:
            raise UserError(str(exc)) from None
        out = {}
        for w in self.plan.weights:
            name, quant = w.spec.name, w.quantizer(stage)
            if quant is not None and name in sparsity:
                out[name] = Joint(sparsity[name], quant)
            elif quant is not None:
                out[name] = quant
            else:
                out[name] = sparsity[name]
        return out

    def stage(self, stage: int, previous: dict[str, torch.Tensor] | None, budget: PhaseBudget,
              handover: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
        # Every planned weight has a constraint at every stage (a sparsity target, a quantizer or both):
        # splitting the global budget only to learn their names cost a LAMP ranking of every weight.
        params = dict(self.params)
        self.history = []
        self.emit({"kind": "stage", "stage": stage, "stages": self.plan.n_stages,
                   "target": self.plan.global_stages[stage] if self.plan.global_stages else None})
        quantized = {w.spec.name: w for w in self.plan.weights if w.spec.name in params and w.quant[stage]}
        refit = StageRefit(self, stage, quantized, budget.admm > 0)
        trained = self.batches_trained
        rolled, admm = self.admm_phase(stage, params, previous, budget.admm)
        admm_steps = self.batches_trained - trained
        self.memory.mark(f"stage{stage + 1}.admm")
        latent = {name: params[name].detach().clone() for name in quantized}  # where STE starts (levels.py)
        before = refit.before()
        supports = admm.hard_project()
        start = refit.quantized_start(admm)
        # Integer levels and scales of the hard projection, for export (the retraining keeps its levels):
        # the constraints it split on the weights before projecting them, which ``latent`` holds.
        scales = {name: quantize(admm.constraints[name], latent[name]) for name in quantized}
        kept = self.removed_filters(supports)
        # The refit, and the k-bit weights rounded again on their grids (their latent weights compensated).
        supports, kept, reconstruction = refit.run(admm, before, supports, kept, latent, scales)
        levels = {name: self.retrain_levels(w, stage, params[name].detach(), supports[name])
                  for name, w in quantized.items()}
        frozen = [level.levels for level in levels.values() if isinstance(level, FixedLevels)]
        self.world.broadcast_(frozen)
        masked = {name: self.imported.module.get_parameter(name) for name in supports}
        kept_standing, values, rolled_r, retrained = self.retrain_phase(stage, masked, supports, levels,
                                                                       budget.retrain, latent)
        metric = kept_standing.metric
        load_values(self.imported, values)
        for name, level in levels.items():
            if isinstance(level, RefitLevels):  # the scales the kept state ended with, for export
                scales[name] = quantize(level.quantizer, params[name].detach(), supports[name])
        quantized_start = None
        if start is not None:
            better, quantized_start = start.keep(kept_standing)
            if better:
                metric, values, scales = start.standing.metric, start.values, start.scales
                load_values(self.imported, values)
        self.memory.mark(f"stage{stage + 1}.retrain")
        self.state_digests.append(digest([*supports.values(), *frozen, *(values[n] for n in sorted(values))]))
        total = sum(p.numel() for p in params.values())
        zeros = sum(int((p == 0).sum()) for p in params.values())
        self.stages.append(StageResult(
            index=stage, target=self.plan.global_stages[stage] if self.plan.global_stages else None,
            sparsity=zeros / total, val_metric=metric,
            rolled_back="; ".join(m for m in (rolled, rolled_r) if m) or None,
            values=values, residuals={n: list(h) for n, h in admm.residual_history.items()},
            quant={n: w.quant[stage] for n, w in quantized.items()}, kept_channels=kept,
            quant_specs={n: _quant_spec(self.imported, n, w.quant[stage], scales[n]) for n, w in quantized.items()},
            patterns={w.spec.name: nm_constraint(w) for w in self.plan.weights
                      if w.spec.name in params and nm_constraint(w) is not None},
            epochs={"admm": budget.admm, "retrain": budget.retrain}, admm_steps=admm_steps,
            stopped=[phase for phase, note in (("admm", rolled), ("retrain", rolled_r)) if note],
            history=self.history, reconstruction=reconstruction, quantized_start=quantized_start, handover=handover,
            retrained=retrained if budget.retrain > 0 else None,
        ))
        logger.info("stage %d done: sparsity %.4f, selection metric %s", stage, zeros / total, metric)
        return supports

    def retrain_levels(self, w: WeightPlan, stage: int, projected: torch.Tensor, support: torch.Tensor):
        """The levels a quantized weight retrains on: binary and ternary ones refit from the latent weights
        (``quantize.refit``), every other one frozen at the hard projection's."""
        choice = w.quant[stage]
        if self.config.quantize.refit and choice.refits:
            return RefitLevels(w.quantizer(stage), self.config.quantize.refit)
        return FixedLevels.of(projected, support, _level_axis(w, stage))

    def removed_filters(self, supports: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        """Kept channels per filter-pruned group; adds masks zeroing the consumers' input channels.

        Removing a channel from the graph equals zeroing every consumer weight that reads it (its bias or
        BatchNorm shift would otherwise still reach the next layer), so those weights are masked too and
        the masked model computes exactly what the shrunk graph will.
        """
        entries = {e.onnx_name: e for e in self.imported.weights if e.owns_tensor}
        kept_channels, device = {}, None
        for w in self.plan.weights:
            if not w.removes_channels or w.spec.label not in self.groups:
                continue
            group = self.groups[w.spec.label]
            support = supports[w.spec.name]
            axis, device = w.spec.out_axis, support.device
            rows = support.movedim(axis, 0).reshape(support.shape[axis], -1).any(dim=1).cpu().numpy()
            kept = group.units_kept(w.spec.label, rows)  # a head stays while any of its rows does
            # The members of a coupled group were projected together (plan.coupled): a channel stays in the
            # graph while any member keeps it.
            kept_channels[group.name] = kept | kept_channels.get(group.name, False)
        for name, kept in kept_channels.items():
            group = self.groups[name]
            removed = np.flatnonzero(~kept)
            for piece in group.consumers:
                entry = entries[piece.tensor]
                mask = np.ones(entry.onnx_shape, dtype=bool)
                index = [slice(None)] * mask.ndim
                index[piece.axis] = piece.positions(group.n_channels, removed)
                mask[tuple(index)] = False
                mask_t = torch.from_numpy(np.ascontiguousarray(mask.T if entry.layout.transpose else mask))
                mask_t = mask_t.to(device)
                supports[entry.param] = supports[entry.param] & mask_t if entry.param in supports else mask_t
        return kept_channels

    def admm_phase(self, stage, params, previous, epochs: float):
        """ADMM epochs; weights pruned by earlier stages stay at zero throughout (nested masks)."""
        admm_cfg = self.config.admm
        pinned = None
        if previous:  # every earlier mask, consumers of removed channels included
            pinned = FixedSupport({n: self.imported.module.get_parameter(n) for n in previous}, previous)
        cfg = self.cfg
        try:
            period = admm_period(epochs, self.steps_per_epoch(), admm_cfg.period, admm_cfg.updates)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        every, limit = period.every, period.limit
        rho = initial_rho(admm_cfg.rho, cfg.optimizer, self.config.lr, cfg.momentum, period, admm_cfg.pull)
        cap = rho_limit(admm_cfg.rho_max, rho, cfg.optimizer, self.config.lr, cfg.momentum)
        admm = SyncedADMM(self.world, params, lambda values: self.constraints(stage, previous, values),
                          RhoSchedule(rho, admm_cfg.rho_growth, cap), rescale_dual=admm_cfg.rescale_dual)
        logger.info("stage %d ADMM: rho %.3g (x%.3g per update), a Z/U update every %d %s", stage, rho,
                    admm_cfg.rho_growth, every, "steps" if period.in_steps else "epochs")
        optimizer = self.optimizer()
        hooks_b = [admm.add_penalty_grad] + ([pinned.mask_grads] if pinned else [])
        hooks_s = [lambda: pinned.apply(optimizer)] if pinned else []
        if period.in_steps:
            steps = [0]

            def step_update() -> None:
                steps[0] += 1
                if steps[0] % every == 0 and (limit is None or admm.n_updates < limit):
                    admm.update()

            hooks_s.append(step_update)

        def on_epoch_end(epoch, stats) -> dict[str, Any]:
            if not period.in_steps and (epoch + 1) % every == 0 and (limit is None or admm.n_updates < limit):
                admm.update()  # a plugin: periods are whole epochs
            # For people watching: the dense W on the selection split, and how far W still is from Z.
            return {"metric": self.select_metric(), "residual": _mean_residual(admm)}

        message = self.run_phase("admm", stage, epochs, optimizer, hooks_b, hooks_s, on_epoch_end,
                                 lr=lambda step, total: lr_factor(step, total, admm_cfg.lr_policy, every), admm=admm)
        return message, admm

    def retrain_phase(self, stage, params, supports, levels, epochs: float, latent=None):
        """Masked retraining (LR annealed to 0 over the phase) that keeps the best state on the selection
        split; quantized weights train through the straight-through estimator on the hard projection's levels."""
        fixed = FixedSupport(params, supports)
        fixed.apply()
        factor = self.config.quantize.clip
        clip = {n: factor for n, level in levels.items() if isinstance(level, RefitLevels) and factor > 0}
        ste = StraightThrough({n: params[n] for n in levels}, levels, supports, latent, clip) if levels else None
        optimizer = self.optimizer()
        with ste.projected() if ste else nullcontext():
            best = {"standing": self.select_standing(), "values": snapshot(self.imported), "trained": False}

        def epoch_end(epoch, stats) -> dict[str, Any]:
            with ste.projected() if ste else nullcontext():
                now = self.select_standing()
                if now.compare(best["standing"]) >= 0:  # level: the later state
                    # Into the phase's one snapshot: a better state replaces the previous best in place.
                    best.update(standing=now, values=copy_values(self.imported, best["values"]), trained=True)
            return {"metric": now.metric}

        hooks_b = [fixed.mask_grads] + ([ste.before_step] if ste else [])
        hooks_f = [ste.before_forward] if ste else []
        message = self.run_phase("retrain", stage, epochs, optimizer, hooks_b, [lambda: fixed.apply(optimizer)],
                                 epoch_end, hooks_f, lr=lambda step, total: lr_factor(step, total, "cosine"))
        if epochs > 0 and not best["trained"]:  # the report warns (pipeline/report.py); here, when it happens
            logger.info("stage %d: every retraining epoch scored under its start; the start is kept", stage)
        return best["standing"], best["values"], message, best["trained"]

    def steps_per_epoch(self) -> int | None:
        if not isinstance(self.train_data, Dataset):
            return None
        samples = -(-len(self.train_data) // self.world.size)  # this process's share (data.shard_order)
        return -(-samples // self.batch.train)

    def phase_length(self, epochs: float) -> tuple[int, int | None]:
        """(epochs run, steps) of a phase of ``epochs`` epochs; steps are None for a loader plugin, which
        runs whole epochs of unknown length."""
        per_epoch = self.steps_per_epoch()
        if per_epoch is None:
            return (max(1, round(epochs)) if epochs > 0 else 0), None
        total = round(epochs * per_epoch)
        return -(-total // per_epoch), total

    def run_phase(self, phase: str, stage: int, epochs: float, optimizer, hooks_backward, hooks_step, on_epoch_end,
                  hooks_forward=(), lr: Callable[[int, int], float] | None = None,
                  admm: ADMM | None = None) -> str | None:
        """Train ``epochs`` epochs (the last one cut short for a fraction); ``lr(step, total)`` scales the
        learning rate per step. On a non-finite loss roll back to the epoch's start and stop the phase.

        ``on_epoch_end(epoch, stats)`` returns the epoch's ``metric`` and ``residual`` for its history record;
        an ADMM phase passes its ``admm``, whose Z, U and rho roll back with the weights.
        """
        imported = self.imported
        per_epoch = self.steps_per_epoch()
        n_epochs, total = self.phase_length(epochs)  # a loader plugin: the LR schedule counts epochs
        where = {"stage": stage, "stages": self.plan.n_stages, "phase": phase}
        if n_epochs:
            self.emit({"kind": "phase", **where, "epochs": n_epochs, "steps": total, "batches": per_epoch})
        base = [group["lr"] for group in optimizer.param_groups]
        done = [0]

        def set_lr() -> None:
            if lr is None:
                return
            factor = lr(done[0], total) if total is not None else lr(epoch, n_epochs)
            for group, value in zip(optimizer.param_groups, base):
                group["lr"] = value * factor

        def count() -> None:
            done[0] += 1
            self.batches_trained += 1
            if total is not None:
                set_lr()

        rollback = Rollback(imported, optimizer, admm) if n_epochs else None
        for epoch in range(n_epochs):
            started = time.perf_counter()
            rollback.save()
            set_lr()
            steps = None if total is None else min(per_epoch, total - epoch * per_epoch)
            self.emit({"kind": "epoch", **where, "epoch": epoch, "epochs": n_epochs, "batches": steps})
            # Counted from 1 in what the user reads, as the progress lines count them.
            label = f"stage {stage + 1} {phase} epoch {epoch + 1}"
            batches = self.batches(self.train_data, True, self.cfg.seed + self.epoch_counter, steps=True,
                                   label=label)
            if steps is not None:
                batches = itertools.islice(batches, steps)
            try:
                stats = train_epoch(
                    self.trained, batches, self.loss_fn, optimizer, self.teacher, hooks_backward,
                    [*hooks_step, count],
                    on_batch=lambda i, loss, acc: self.emit({"kind": "batch", "stage": stage, "phase": phase,
                                                             "epoch": epoch, "batch": i, "loss": loss, "acc": acc}),
                    before_forward=hooks_forward, agree=self.world.mean if self.world.active else None,
                    precision=self.precision,
                )
                # The loss check sees a step's damage only at the next batch: after the epoch's last step
                # a non-finite weight would otherwise reach the next snapshot and make rollback useless.
                if not all(bool(torch.isfinite(imported.parameter(e)).all()) for e in imported.weights):
                    raise NonFiniteLoss("a weight is NaN or infinite after the epoch's last step")
            except NonFiniteLoss as exc:
                rollback.restore()
                message = (f"{label}: {exc}; rolled back to the start of the epoch "
                           f"and stopped the {phase} phase")
                logger.warning("%s", message)
                self.emit({"kind": "phase_end", **where, "stopped": message})
                return message
            except NoGradient:
                passed = self.imported.passed_through
                raise UserError(
                    f"no output the model trains on ({', '.join(self.imported.output_names)}) depends on its "
                    "weights" + (f"; {', '.join(passed)} come from the part of the graph onnx2torch cannot convert "
                                 f"({self.imported.not_converted[0]})" if passed and self.imported.not_converted else "")
                    + ": nothing to train; run `onnx-admm check` on the model") from None
            except EmptyEpoch:
                # A loader plugin that returns an exhausted generator yields data once, then nothing.
                # Under several processes every rank needs a whole batch of its own (even_steps).
                need = (f" with at least {self.world.size} whole batches of {self.batch.train} samples (one per "
                        "process)" if self.world.active and not isinstance(self.train_data, Dataset) else "")
                raise UserError(
                    f"the training data yielded no {'whole batch per process' if need else 'samples'} in "
                    f"{label}; a loader plugin is called once per epoch and must yield a "
                    f"fresh, non-empty stream{need} every time"
                ) from None
            finally:
                self.epoch_counter += 1
            measured = on_epoch_end(epoch, stats)
            record = {"phase": phase, "epoch": epoch, "loss": stats.loss, "train_metric": stats.accuracy,
                      "metric": measured.get("metric"), "residual": measured.get("residual"),
                      "samples": stats.samples, "seconds": time.perf_counter() - started}
            self.history.append(record)
            self.emit({"kind": "epoch_end", **where, "epochs": n_epochs, **record})
        if n_epochs:
            self.emit({"kind": "phase_end", **where, "stopped": None})
        return None


def _mean_residual(admm: ADMM) -> float | None:
    """The mean over the weights of the primal residual at the last Z/U update (None before the first)."""
    last = [h[-1] for h in admm.residual_history.values() if h]
    return sum(last) / len(last) if last else None


def _quant_spec(imported: ImportedModel, param: str, choice: QuantChoice, qt) -> QuantSpec:
    """How a quantized weight is stored, in its ONNX layout (Gemm weights may be transposed and scaled)."""
    if qt is None:  # a codebook: its levels are the values themselves
        return QuantSpec(bits=max(1, math.ceil(math.log2(max(2, choice.clusters)))))
    entry = next(e for e in imported.weights if e.param == param)
    return entry.layout.quant_spec(qt.bits, qt.scale.detach().cpu().numpy(), qt.axis, qt.q.dim())


def _level_axis(w: WeightPlan, stage: int) -> int | None:
    """Per-channel quantizers keep one level set per output channel; the others one per tensor."""
    return w.quant[stage].level_axis(w.scale_axis)


def _precision(name: str, device: torch.device) -> Precision:
    """train.precision on ``device``; bfloat16 where the GPU lacks it is the user's to change."""
    dtype = None if PRECISIONS[name] is None else getattr(torch, PRECISIONS[name])
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(f"train.precision = \"bf16\" but {torch.cuda.get_device_name(device)} has no bfloat16; "
                        "use \"fp16\" (with loss scaling) or \"fp32\"")
    return Precision(dtype, device.type)
