"""The Python API: ``compress(model, data, config)`` runs progressive ADMM pruning end to end.

Per stage (targets rising, masks nested): ADMM epochs (W step with the penalty gradient, Z/U update
every period, rho growing), the exact hard projection, then masked retraining that keeps the best
validation state. The result writes the trained weights back into the original ONNX graph and
validates it against the original in onnxruntime on the held-out split.
"""

from __future__ import annotations

import copy
import json
import logging
import resource
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from converters.errors import UserError
from converters.graphinfo import graph_inputs
from converters.importer import ImportedModel, import_model
from converters.modelio import load_model, save_model, uses_external_data
from converters.writeback import write_back
from onnx_admm import __version__
from onnx_admm.admm import ADMM, FixedSupport, RhoSchedule
from onnx_admm.data import LABELS, Dataset, PluginData, resolve_data
from onnx_admm.projections import Unstructured, Within, allocate_global, keep_count
from onnx_admm.recipe import CompressConfig
from onnx_admm.schedule import geometric_stages
from onnx_admm.train import Batch, EmptyEpoch, Loss, NonFiniteLoss, ScoreSpec, evaluate, make_optimizer, train_epoch

logger = logging.getLogger(__name__)

# How many samples of a loader plugin's stream are held in memory for validation when no
# separate validation data is given.
PLUGIN_VAL_SAMPLES = 1000

Progress = Callable[[dict[str, Any]], None]


@dataclass
class StageResult:
    """One completed stage: its target, what it reached, and the weights (ONNX layout) to save it."""

    index: int
    target: float | None  # global target sparsity of the stage (None: per-weight targets only)
    sparsity: float  # achieved, over the compressed weights
    val_metric: float | None  # accuracy (labels) or agreement (no labels) on the held-out split, in torch
    rolled_back: str | None
    values: dict[str, torch.Tensor] = field(repr=False)  # param name -> tensor snapshot (CPU)
    residuals: dict[str, list[float]] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "index": self.index, "target": self.target, "sparsity": self.sparsity,
            "val_metric": self.val_metric, "rolled_back": self.rolled_back,
        }


@dataclass
class CompressResult:
    """What ``compress`` returns: ``.save(path)`` writes the ONNX model; ``.report`` is the JSON report."""

    imported: ImportedModel
    config: CompressConfig
    stages: list[StageResult]
    report: dict[str, Any] = field(default_factory=dict)
    external_data: bool = False  # the original kept its weights in a .data file: so does the output

    def model(self, stage: int = -1) -> onnx.ModelProto:
        """The original graph with the weights of ``stage`` (default: the last) written back."""
        _load_values(self.imported, self.stages[stage].values)
        metadata = {
            "onnx_admm.version": __version__,
            "onnx_admm.recipe": json.dumps(self.config.to_dict(), sort_keys=True),
            "onnx_admm.stage": str(self.stages[stage].index),
        }
        return write_back(self.imported.original, self.imported.updates(), metadata=metadata).model

    def save(self, path: str | Path, stage: int = -1) -> list[Path]:
        """Write the model atomically (with external data if the original had it); returns the files."""
        return save_model(self.model(stage), path, external_data=self.external_data)


class CompressInterrupted(Exception):
    """Ctrl-C during ``compress``; ``result`` holds the completed stages (None when none completed)."""

    def __init__(self, result: CompressResult | None) -> None:
        super().__init__("interrupted")
        self.result = result


def _load_values(imported: ImportedModel, values: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for entry in imported.weights:
            imported.parameter(entry).copy_(values[entry.param])


def _snapshot(imported: ImportedModel) -> dict[str, torch.Tensor]:
    return {e.param: imported.parameter(e).detach().to("cpu", copy=True) for e in imported.weights}


def _to_batches(feeds, input_names: list[str], device: torch.device):
    for feed in feeds:
        inputs = tuple(torch.from_numpy(np.ascontiguousarray(feed[n])).to(device) for n in input_names)
        labels = feed.get(LABELS)
        yield Batch(inputs, None if labels is None else torch.from_numpy(labels).to(device))


@dataclass
class _Targets:
    own: dict[str, list[float]]  # param -> per-stage sparsity (rule targets)
    shared: list[str]  # params in the global pool
    global_stages: list[float] | None
    n_stages: int


def _plan_targets(imported: ImportedModel, config: CompressConfig) -> _Targets:
    prune = config.prune
    global_target = prune.targets[-1] if prune.targets else prune.sparsity
    n = len(prune.targets) if prune.targets else prune.stages
    own: dict[str, list[float]] = {}
    shared: list[str] = []
    for entry in imported.compressible():
        rule = config.rule_for(entry.onnx_name, entry.op_type)
        if rule is not None and rule.skip:
            continue
        if rule is not None and rule.sparsity is not None:
            own[entry.param] = geometric_stages(rule.sparsity, n) if rule.sparsity > 0 else [0.0] * n
        elif global_target is not None:
            shared.append(entry.param)
    if not own and not shared:
        raise UserError(
            "nothing to compress: no compressible weight has a target; pass --sparsity (e.g. 0.9) "
            "or a recipe rule with `sparsity`"
        )
    # A compressible weight without a target (skipped, or outside every rule with no global target) is
    # left untouched: it does not train either.
    for entry in imported.compressible():
        if entry.param not in own and entry.param not in shared:
            imported.parameter(entry).requires_grad_(False)
    global_stages = None
    if shared:
        global_stages = list(prune.targets) if prune.targets else (
            geometric_stages(global_target, n) if global_target > 0 else [0.0] * n)
    return _Targets(own, shared, global_stages, n)


def _stage_constraints(
    imported: ImportedModel, targets: _Targets, stage: int, config: CompressConfig,
    previous: dict[str, torch.Tensor] | None,
) -> dict[str, Any]:
    params = {e.param: imported.parameter(e) for e in imported.compressible()}
    keeps = {name: keep_count(params[name].numel(), s[stage]) for name, s in targets.own.items()}
    if targets.shared:
        pool = {name: params[name].detach() for name in targets.shared}
        try:
            keeps.update(allocate_global(pool, targets.global_stages[stage], config.prune.floor,
                                         allowed=None if previous is None else {n: previous[n] for n in pool}))
        except ValueError as exc:
            raise UserError(f"impossible target: {exc} (the floor is `floor` in the recipe's [prune] table)") from None
    constraints = {}
    for name, keep in keeps.items():
        c = Unstructured(keep)
        constraints[name] = c if previous is None else Within(c, previous[name])
    return constraints


def compress(
    model: str | Path | onnx.ModelProto,
    data: str | Dataset | PluginData,
    config: CompressConfig = CompressConfig(),
    *,
    val_data: str | Dataset | None = None,
    progress: Progress | None = None,
) -> CompressResult:
    """Compress ``model`` with progressive ADMM pruning and validate it in onnxruntime.

    Args:
        model: path to an ONNX file (external data beside it), or a loaded ModelProto.
        data: training data: an .npz path, a ``module:function`` loader plugin, or a Dataset.
        config: the recipe (see ``onnx_admm.recipe``).
        val_data: held-out data; default: ``config.train.val_fraction`` of ``data`` (npz) or the first
            ``PLUGIN_VAL_SAMPLES`` samples of a plugin.
        progress: called with event dicts (``kind`` = stage | epoch | batch) for progress display.

    Returns:
        A CompressResult with ``.save(path)`` and ``.report``.

    Raises:
        UserError: bad model, data or recipe.
        CompressInterrupted: on Ctrl-C, carrying the completed stages.
    """
    started = time.perf_counter()
    cfg = config.train
    original_path = Path(model) if not isinstance(model, onnx.ModelProto) else None
    original = load_model(model) if original_path is not None else model
    external = original_path is not None and uses_external_data(original_path)
    imported = import_model(original, output=cfg.output)
    torch.manual_seed(cfg.seed)
    threads_before = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _compress(original, original_path, external, imported, data, val_data, config, progress, started)
    finally:
        torch.set_num_threads(threads_before)


def _compress(original, original_path, external, imported, data, val_data, config, progress, started) -> CompressResult:
    cfg = config.train
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {cfg.device!r} requested but CUDA is not available; use --device cpu")
    imported.module.to(device)

    specs = graph_inputs(original)
    train_data, held_out = _resolve_splits(data, val_data, specs, cfg)
    score = ScoreSpec(imported.score.index if imported.score else None, imported.score.kind if imported.score else "logits")
    # The teacher serves distillation (training batches without labels, or any batch when there is no
    # score output for labels to apply to) and agreement (held-out split without labels). A plugin's
    # labels are unknown until it runs, so it always gets one.
    train_labeled = isinstance(train_data, Dataset) and train_data.labels is not None
    teacher = None
    if held_out.labels is None or not train_labeled or score.index is None:
        teacher = copy.deepcopy(imported.module).eval()
        teacher.requires_grad_(False)
    if score.index is None and held_out.labels is not None:
        logger.warning("the model has no score output ([N, C] float): labels are ignored and the loss is MSE "
                       "to the original model's outputs")
    loss_fn = Loss(score)
    targets = _plan_targets(imported, config)
    emit = progress or (lambda event: None)

    def batches(ds, shuffle: bool, seed: int | None = None):
        return _to_batches(ds.batches(cfg.batch_size, shuffle=shuffle, seed=seed), imported.input_names, device)

    def val_metric() -> float | None:
        return evaluate(imported.module, batches(held_out, False), score, teacher)

    dense_metric = val_metric()
    stages: list[StageResult] = []
    previous: dict[str, torch.Tensor] | None = None
    epoch_counter = [0]

    def run_phase(phase: str, stage: int, epochs: int, optimizer, hooks_backward, hooks_step, on_epoch_end):
        """Train ``epochs`` epochs; on a non-finite loss roll back to the epoch's start and stop the phase."""
        for epoch in range(epochs):
            snapshot = (_snapshot(imported), copy.deepcopy(optimizer.state_dict()))
            emit({"kind": "epoch", "stage": stage, "phase": phase, "epoch": epoch, "epochs": epochs})
            try:
                stats = train_epoch(
                    imported.module, batches(train_data, True, cfg.seed + epoch_counter[0]), loss_fn, optimizer,
                    teacher, hooks_backward, hooks_step,
                    on_batch=lambda i, loss, acc: emit({"kind": "batch", "stage": stage, "phase": phase,
                                                        "epoch": epoch, "batch": i, "loss": loss, "acc": acc}),
                )
                # The loss check sees a step's damage only at the next batch: after the epoch's last step
                # a non-finite weight would otherwise reach the next snapshot and make rollback useless.
                if not all(bool(torch.isfinite(imported.parameter(e)).all()) for e in imported.weights):
                    raise NonFiniteLoss("a weight is NaN or infinite after the epoch's last step")
            except NonFiniteLoss as exc:
                _load_values(imported, snapshot[0])
                optimizer.load_state_dict(snapshot[1])
                message = (f"stage {stage} {phase} epoch {epoch}: {exc}; rolled back to the start of the epoch "
                           f"and stopped the {phase} phase")
                logger.warning("%s", message)
                return message
            except EmptyEpoch:
                # A loader plugin that returns an exhausted generator yields data once, then nothing.
                raise UserError(
                    f"the training data yielded no samples in stage {stage} {phase} epoch {epoch}; a loader "
                    "plugin is called once per epoch and must yield a fresh, non-empty stream every time"
                ) from None
            finally:
                epoch_counter[0] += 1
            on_epoch_end(epoch, stats)
        return None

    try:
        for stage in range(targets.n_stages):
            constraints = _stage_constraints(imported, targets, stage, config, previous)
            params = {name: imported.module.get_parameter(name) for name in constraints}
            emit({"kind": "stage", "stage": stage, "stages": targets.n_stages,
                  "target": targets.global_stages[stage] if targets.global_stages else None})
            # ADMM phase. Weights pruned by earlier stages stay at zero throughout (nested masks).
            pinned = FixedSupport(params, previous) if previous is not None else None
            admm_cfg = config.admm
            admm = ADMM(params, constraints, RhoSchedule(admm_cfg.rho, admm_cfg.rho_growth, admm_cfg.rho_max),
                        rescale_dual=admm_cfg.rescale_dual)
            optimizer = make_optimizer(imported.module.parameters(), cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay)
            hooks_b = [admm.add_penalty_grad] + ([pinned.mask_grads] if pinned else [])
            hooks_s = [lambda: pinned.apply(optimizer)] if pinned else []
            if admm_cfg.period < 1:
                every = max(1, round(admm_cfg.period * _batches_per_epoch(train_data, cfg.batch_size)))
                steps = [0]

                def step_update(admm=admm, every=every, steps=steps):
                    steps[0] += 1
                    if steps[0] % every == 0:
                        admm.update()

                hooks_s.append(step_update)

            def admm_epoch_end(epoch, stats, admm=admm):
                if admm_cfg.period >= 1 and (epoch + 1) % int(admm_cfg.period) == 0:
                    admm.update()

            rolled = run_phase("admm", stage, admm_cfg.epochs, optimizer, hooks_b, hooks_s, admm_epoch_end)
            supports = admm.hard_project()
            # Masked retraining with a cosine-decaying learning rate; keep the best validation state.
            fixed = FixedSupport(params, supports)
            fixed.apply()
            optimizer = make_optimizer(imported.module.parameters(), cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay)
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, admm_cfg.retrain_epochs))
            best = {"metric": val_metric(), "values": _snapshot(imported)}

            def retrain_epoch_end(epoch, stats, best=best, scheduler=scheduler):
                scheduler.step()
                metric = val_metric()
                if metric is not None and (best["metric"] is None or metric >= best["metric"]):
                    best.update(metric=metric, values=_snapshot(imported))
                elif metric is None:
                    best["values"] = _snapshot(imported)
                emit({"kind": "val", "stage": stage, "epoch": epoch, "metric": metric, "loss": stats.loss})

            rolled_r = run_phase("retrain", stage, admm_cfg.retrain_epochs, optimizer, [fixed.mask_grads],
                                 [lambda: fixed.apply(optimizer)], retrain_epoch_end)
            _load_values(imported, best["values"])
            total = sum(p.numel() for p in params.values())
            zeros = sum(int((p == 0).sum()) for p in params.values())
            stages.append(StageResult(
                index=stage, target=targets.global_stages[stage] if targets.global_stages else None,
                sparsity=zeros / total, val_metric=best["metric"],
                rolled_back="; ".join(m for m in (rolled, rolled_r) if m) or None,
                values=best["values"], residuals={n: list(h) for n, h in admm.residual_history.items()},
            ))
            logger.info("stage %d done: sparsity %.4f, validation %s", stage, zeros / total, best["metric"])
            previous = supports
    except KeyboardInterrupt:
        raise CompressInterrupted(CompressResult(imported, config, stages, external_data=external)
                                  if stages else None) from None

    result = CompressResult(imported, config, stages, external_data=external)
    try:
        result.report = _report(result, original_path, held_out, dense_metric, cfg, started)
    except KeyboardInterrupt:
        raise CompressInterrupted(result) from None
    return result


def _batches_per_epoch(data: Dataset | PluginData, batch_size: int) -> int:
    if not isinstance(data, Dataset):
        raise UserError("admm.period below 1 needs in-memory data (.npz), whose batches per epoch are known; "
                        "use a whole number of epochs with a loader plugin")
    return -(-len(data) // batch_size)


def _resolve_splits(data, val_data, specs, cfg) -> tuple[Dataset | PluginData, Dataset]:
    if isinstance(data, (str, Path)):
        data = resolve_data(str(data), specs)
    if isinstance(val_data, (str, Path)):
        val_data = resolve_data(str(val_data), specs)
        if isinstance(val_data, PluginData):
            val_data = val_data.take(PLUGIN_VAL_SAMPLES)
    if val_data is not None:
        return data, val_data
    if isinstance(data, PluginData):
        logger.warning("validating on the first %d samples of the loader plugin (they are also trained on); "
                       "pass val_data for a true held-out split", PLUGIN_VAL_SAMPLES)
        return data, data.take(PLUGIN_VAL_SAMPLES)
    if len(data) == 0:
        raise UserError("the data holds no samples; pass a non-empty .npz")
    return data.split(cfg.val_fraction, cfg.seed)


def _report(result: CompressResult, original_path: Path | None, held_out: Dataset, dense_metric, cfg, started) -> dict:
    from onnx_admm.validate import validate

    imported = result.imported
    final = result.stages[-1]
    layers = []
    total = nonzero = 0
    for entry in imported.compressible():
        value = final.values[entry.param]
        n, nz = value.numel(), int((value != 0).sum())
        total += n
        nonzero += nz
        layers.append({
            "name": entry.onnx_name, "op_type": entry.op_type, "shape": list(entry.onnx_shape),
            "params": n, "nonzero": nz, "sparsity": 1 - nz / n,
            "residual": final.residuals[entry.param][-1] if final.residuals.get(entry.param) else None,
            "residual_history": final.residuals.get(entry.param, []),
        })
    with tempfile.TemporaryDirectory(prefix="onnx-admm-") as tmp:
        orig = original_path
        if orig is None:
            orig = Path(tmp) / "original.onnx"
            save_model(imported.original, orig)
        out = Path(tmp) / "compressed.onnx"
        result.save(out)
        validation = validate(orig, out, held_out, batch_size=cfg.batch_size, threads=cfg.threads or 1,
                              score_output=cfg.output)
    diffs = [d.max_abs for d in validation.outputs if d.max_abs is not None]
    return {
        "tool": {"name": "onnx-admm", "version": __version__},
        "config": result.config.to_dict(),
        "original": {"bytes": validation.original.bytes, "bytes_gzip": validation.original.gzip_bytes},
        "compressed": {"bytes": validation.compressed.bytes, "bytes_gzip": validation.compressed.gzip_bytes},
        "params": {"total": total, "nonzero": nonzero},
        "compression_ratio": total / nonzero if nonzero else None,
        "layers": layers,
        "stages": [s.summary() for s in result.stages],
        "metrics": {
            "original_accuracy": validation.original.accuracy,
            "compressed_accuracy": validation.compressed.accuracy,
            "agreement": validation.agreement,
            "max_abs_diff": max(diffs, default=None),
            "torch_dense_val_metric": dense_metric,
        },
        "validation": _without_paths(validation.to_dict()),
        "wall_s": time.perf_counter() - started,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _without_paths(validation: dict) -> dict:
    """The validation ran on temporary copies: their paths mean nothing once compress returns."""
    for side in ("original", "compressed"):
        validation[side].pop("path", None)
        validation[side].pop("files", None)
    return validation
