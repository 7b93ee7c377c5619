"""Compression recipes: frozen config dataclasses, the same objects a TOML recipe loads into.

Layout of a recipe (every table optional, unknown keys are errors):

    [train]    optimizer, lr, momentum, weight_decay, batch_size, batch_memory_mb, seed, threads, device,
               val_fraction, output, blank, epochs (the total budget), distill, balance
    [admm]     epochs, retrain_epochs (per stage), period, updates, rho, pull, rho_growth, rho_max, rescale_dual,
               lr_policy, share
    [prune]    sparsity (global target), stages, spacing, targets, allocation, min_keep, floor, structure
               (unstructured, filter, channel, column, block, or an N:M pattern such as "2:4"), block
    [quantize] bits (an integer, or a list for progressive stages; 1 = binary), ternary, clusters,
               per_channel, symmetric, refit, clip
    [output]   activations ("float", or "int8": a QDQ model onnxruntime runs with integer kernels),
               calibration (training samples that calibrate the int8 activation ranges), ranges ("minmax"
               or "fit": how those samples set the ranges)
    [[rules]]  match (glob on the ONNX weight name) and/or op_type; sparsity; structure; bits;
               ternary; clusters; skip

Rules are tried in order and the first match wins; ``match`` globs the ONNX weight names that
``onnx-admm inspect`` prints. A rule that decides no weight (it matches none, or only weights an
earlier rule claims) is an error when the plan is made (``onnx_admm.plan.check_rules``). A rule's ``sparsity`` fixes that weight's own
target; ``skip = true`` leaves it untouched. Weights no rule matches share the global
``prune.sparsity``, spread over the layers by ``prune.allocation`` (LAMP scores by default; see
onnx_admm.allocation) and re-split at every ADMM Z/U update; without a global target they stay
unpruned. An N:M structure needs no target: it prunes every weight it applies to to its pattern. A
rule's quantization keys replace [quantize] for that weight.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onnx_admm import structures
from onnx_admm.converters.errors import UserError
from onnx_admm.converters.files import read_text
from onnx_admm.recipe_tables import (PRECISIONS, ADMMConfig, OutputConfig, PruneConfig, QuantizeConfig, Rule,
                                     TrainConfig, _fail, check_threads)
from onnx_admm.schedule import PhaseBudget, split_budget
from onnx_admm.toml_tables import build, reject_unknown

__all__ = ["BINARY_LR", "DEFAULT_ADMM_EPOCHS", "DEFAULT_BATCH_SIZE", "DEFAULT_EPOCHS", "DEFAULT_LR",
           "DEFAULT_RETRAIN_EPOCHS", "PRECISIONS", "PRUNE_LR", "ADMMConfig", "CompressConfig", "OutputConfig",
           "PruneConfig", "QuantizeConfig", "Rule", "TrainConfig", "check_threads"]

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


# The budget when a recipe gives neither train.epochs nor per-stage epochs; and the per-stage default of
# whichever of admm.epochs / admm.retrain_epochs is left out when the other is given.
DEFAULT_EPOCHS = 15
DEFAULT_ADMM_EPOCHS = 10
DEFAULT_RETRAIN_EPOCHS = 5
# The training batch when train.batch_size is not given (lowered to fit train.batch_memory_mb).
DEFAULT_BATCH_SIZE = 64
# The SGD learning rate when the recipe gives none, by what the run does to the weights
# (CompressConfig.lr). Quantized levels alone train at DEFAULT_LR: 4-bit LeNet-5 lost 0.90 point at 0.02, its
# retraining never beating the plain projection. Pruning weight by weight (unstructured or N:M, with or without
# levels) trains at PRUNE_LR, twice it: Fashion-MNIST LeNet-5 on 60,000 images +0.41 / +0.88 / +1.14 / +1.58
# points at 40x / 100x / 200x / 400x (2-3 seeds), 40x + 4-bit +0.49, the digits CNN +0.42, a residual CNN at 90%
# +1.13, a ViT at 90% +0.59. Whole filters, channels, columns or blocks keep DEFAULT_LR: the residual CNN's 50%
# filter run broke in two of three seeds at 0.02 (-14 points) (the samples' RESULTS.md files). Binary weights train
# at BINARY_LR: their latent weights must cross a whole level (from +a to -a) to change. Every layer binary,
# 0.03 against 0.01: LeNet-5 +0.75 point (2 seeds; 0.1 diverged), the digits CNN +3.2, a residual CNN +11.4
# (3 seeds; at 0.01 two of them ended near 58%) (binary_lr.py). Without labels (the original distilled on a
# few representative inputs) weight-by-weight pruning keeps DEFAULT_LR: mobilenet_v3_small at 50% agreed with the
# original on 0.922 / 0.930 of held-out inputs at 0.01 against 0.891 / 0.867 at 0.02 (2 seeds; more training
# made it worse too), resnet18, an LSTM, a transformer, an MLP, a CTC reader and a detector level
# (samples/corpus/RESULTS.md).
DEFAULT_LR = 0.01
PRUNE_LR = 0.02
BINARY_LR = 0.03
# A label-free binary run on few representative inputs takes at least this many optimizer steps an epoch (a
# smaller batch, never under SMALL_BATCH), its rate following the batch's square root from BINARY_LR at 32: at the
# default batch 128 inputs gave 2 steps an epoch. Batch 8 at 0.015 against 32 at 0.03, 10 epochs, means of seeds
# 0-2: sklearn MLP 0.82 against 0.58 top-1 agreement, an LSTM 0.90 / 0.84, the digits CNN 0.95 / 0.91, a Keras CNN
# 0.94 / 0.87, a segmenter's F1 0.92 / 0.90, a Keras CTC reader's sequence match 0.92 / 0.42 (samples/corpus/
# RESULTS.md). At 40x the batch moved the rows both ways, so pruning keeps the default.
SMALL_DATA_STEPS = 16
SMALL_BATCH = 8


@dataclass(frozen=True)
class CompressConfig:
    """Everything ``compress`` needs; what a TOML recipe loads into."""

    train: TrainConfig = field(default_factory=TrainConfig)
    admm: ADMMConfig = field(default_factory=ADMMConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    rules: tuple[Rule, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "rules", tuple(self.rules))
        if self.train.epochs is not None and (self.admm.epochs not in (None, 0) or self.admm.retrain_epochs is not None):
            _fail("train.epochs (the total budget, --epochs) and admm.epochs / admm.retrain_epochs (per stage, "
                  "--admm-epochs / --retrain-epochs) contradict; give one or the other (admm.epochs = 0 with "
                  "train.epochs spends the whole budget on masked retraining)")
        if self.prune.round_to != PruneConfig.round_to and "filter" not in self._pruned_structures():
            _fail(f"prune.round_to = {self.prune.round_to} (--round-to) rounds the filters each layer keeps, and "
                  "this recipe prunes no filters: prune with structure = \"filter\" (--structure filter) or drop it")

    @property
    def budget(self) -> float | None:
        """The total epoch budget the tool splits itself, or None when the recipe fixes each stage's phases."""
        if self.train.epochs is not None:
            return self.train.epochs
        if self.admm.epochs is not None or self.admm.retrain_epochs is not None:
            return None
        return DEFAULT_EPOCHS

    def stage_budgets(self, n_stages: int) -> list[PhaseBudget]:
        """Epochs of ADMM and of masked retraining for each stage."""
        if self.budget is None:
            admm = DEFAULT_ADMM_EPOCHS if self.admm.epochs is None else self.admm.epochs
            retrain = DEFAULT_RETRAIN_EPOCHS if self.admm.retrain_epochs is None else self.admm.retrain_epochs
            return [PhaseBudget(admm, retrain)] * n_stages
        return split_budget(self.budget, n_stages, share=self.admm.share if self.admm.epochs != 0 else 0.0)

    def _pruned_structures(self) -> set[str]:
        """The structures the run prunes with: the global target's (a sparsity, targets or an N:M pattern) and
        each rule's own (a sparsity or a pattern, in the rule's structure or the global one). Empty: no pruning."""
        shared = (self.prune.sparsity is not None or self.prune.targets is not None
                  or structures.nm_pattern(self.prune.structure) is not None)
        out = {self.prune.structure} if shared else set()
        for rule in self.rules:
            # a rule's structure applies to its own sparsity or pattern, and to the global target it shares
            if not rule.skip and (rule.sparsity is not None or structures.nm_pattern(rule.structure) is not None
                                  or (shared and rule.structure is not None)):
                out.add(rule.structure or self.prune.structure)
        return out

    @property
    def prunes_weights(self) -> bool:
        """Whether the run prunes, and weight by weight only (unstructured or N:M): what PRUNE_LR is for."""
        found = self._pruned_structures()
        return bool(found) and all(s == "unstructured" or structures.nm_pattern(s) is not None for s in found)

    @property
    def lr(self) -> float:
        """The learning rate a run with labels trains at: ``train.lr``, or the default for what the run does to
        the weights: BINARY_LR for binary levels, PRUNE_LR when it prunes weight by weight, DEFAULT_LR otherwise
        (levels alone, or whole filters, channels, columns or blocks). Without labels: ``lr_for``."""
        return self.lr_for()[0]

    def lr_for(self, labelled: bool = True) -> tuple[float, str]:
        """(learning rate, where it comes from) for a run whose training data has labels or not (a plugin's
        labels are unknown until it runs: labelled). PRUNE_LR is measured with labels; without them the run
        distils the original on its few representative inputs, and the higher rate fits those at the cost
        of the rest (the note above DEFAULT_LR), so it prunes at DEFAULT_LR."""
        if self.train.lr is not None:
            return self.train.lr, "train.lr"
        if self.quantize.binary:
            return BINARY_LR, "the binary default, recipe.BINARY_LR"
        if self.prunes_weights:
            if labelled:
                return PRUNE_LR, "the pruning default, recipe.PRUNE_LR"
            return DEFAULT_LR, "the label-free pruning default, recipe.DEFAULT_LR"
        return DEFAULT_LR, "the default, recipe.DEFAULT_LR"

    def small_data_schedule(self, samples: int, labelled: bool) -> tuple[int, float] | None:
        """(batch, learning rate) for a label-free binary run on ``samples`` training inputs, too few for
        SMALL_DATA_STEPS steps an epoch at the default batch, when the recipe sets neither; else None."""
        if (labelled or not self.quantize.binary or self.train.batch_size is not None or self.train.lr is not None
                or samples >= SMALL_DATA_STEPS * DEFAULT_BATCH_SIZE):
            return None
        batch = max(SMALL_BATCH, samples // SMALL_DATA_STEPS)
        return batch, BINARY_LR * min(1.0, (batch / 32) ** 0.5)

    def rule_for(self, name: str, op_type: str) -> Rule | None:
        return next((r for r in self.rules if r.matches(name, op_type)), None)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["rules"] = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in r.items()
                          if v is not None and v is not False} for r in data["rules"]]
        for table in ("train", "admm", "prune", "quantize", "output"):
            data[table] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in data[table].items() if v is not None}
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CompressConfig:
        reject_unknown("recipe", data, {"train", "admm", "prune", "quantize", "output", "rules"})
        kwargs: dict[str, Any] = {}
        for key, sub in (("train", TrainConfig), ("admm", ADMMConfig), ("prune", PruneConfig),
                         ("quantize", QuantizeConfig), ("output", OutputConfig)):
            if key in data:
                kwargs[key] = build(sub, data[key], f"[{key}]")
        if "rules" in data:
            if not isinstance(data["rules"], list):
                _fail("`rules` must be an array of tables: write each rule as [[rules]]")
            kwargs["rules"] = tuple(build(Rule, r, "[[rules]]") for r in data["rules"])
        return cls(**kwargs)

    @classmethod
    def from_toml(cls, path: str | Path) -> CompressConfig:
        text = read_text(path, "recipe", "pass a TOML recipe file")
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise UserError(f"recipe {path} is not valid TOML: {exc}") from None
        return cls.from_dict(data)

    def replace(self, **tables: Mapping[str, Any]) -> CompressConfig:
        """A copy with some fields of some tables changed: ``cfg.replace(train={"lr": 0.1})``."""
        kwargs = {}
        for table, changes in tables.items():
            changes = {k: v for k, v in changes.items() if v is not None}
            if changes:
                kwargs[table] = dataclasses.replace(getattr(self, table), **changes)
        return dataclasses.replace(self, **kwargs) if kwargs else self
