"""The tables of a compression recipe, one frozen dataclass each ([train], [admm], [prune], [quantize],
[output] and each [[rules]] entry), validated in ``__post_init__``: a value out of range is a UserError
naming the key and what it takes. ``onnx_admm.recipe`` assembles them into ``CompressConfig`` (and documents
the recipe's layout); import them from there.
"""

from __future__ import annotations

import fnmatch
import math
import os
from dataclasses import dataclass

from onnx_admm import structures
from onnx_admm.converters.errors import UserError
from onnx_admm.schedule import ADMM_SHARE, ALLOCATIONS, LR_POLICIES, PULL_START, SPACINGS

# train.precision: the torch dtype (its name in torch) of each precision a recipe may name.
PRECISIONS = {"fp32": None, "bf16": "bfloat16", "fp16": "float16"}


def _fail(message: str) -> None:
    raise UserError(message)


# More threads than 4 per CPU never run faster, and a number like 100000 makes torch's OpenMP runtime fail
# (libgomp: out of memory, or a crash) instead of erring in a line.
MAX_THREADS = 4 * (os.cpu_count() or 1)


def check_threads(name: str, value: object) -> None:
    """``value`` is a thread count from 1 to ``MAX_THREADS`` (torch's for training, onnxruntime's for validation).

    Raises:
        UserError: It is not.
    """
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_THREADS:
        _fail(f"{name} must be an integer from 1 to {MAX_THREADS} (4 per CPU; this machine has {os.cpu_count()}), "
              f"got {value!r}; one per core is usually fastest")


def _check_fraction(name: str, value: float | None) -> None:
    if value is None:
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not (0.0 <= value < 1.0):
        _fail(f"{name} must be a fraction in [0, 1) (0.975 = 40x), got {value!r}")


@dataclass(frozen=True)
class TrainConfig:
    """How weights are trained during ADMM and retraining."""

    optimizer: str = "sgd"  # sgd | adam
    lr: float | None = None  # None: by what the run does, CompressConfig.lr (DEFAULT_LR, PRUNE_LR, BINARY_LR)
    momentum: float = 0.9
    weight_decay: float = 0.0
    # None: DEFAULT_BATCH_SIZE, lowered (with a warning) when its estimated activations exceed
    # batch_memory_mb; a number is used as given (a warning when it is estimated too large).
    batch_size: int | None = None
    # The memory a training batch may take, in MB (onnx_admm.memory.training_bytes estimates it from the
    # graph); None: a quarter of the memory available at start, at most 1024 (memory.default_budget_mb).
    batch_memory_mb: float | None = None
    seed: int = 0
    threads: int | None = None  # None: torch's default
    device: str = "cpu"
    # fp32 | bf16 | fp16: the dtype of the training forward passes under autocast (fp16 scales the loss);
    # weights, optimizer, loss and projections stay float32.
    precision: str = "fp32"
    val_fraction: float = 0.1
    output: str | None = None  # which output carries the scores, when the automatic choice is wrong
    # The CTC blank class of a per-time-step score output, for the task metric (None: the original's
    # most frequent class when it covers at least half of the steps; onnx_admm.metrics).
    blank: int | None = None
    # Total training budget in epochs, split over stages and phases by the tool (schedule.split_budget).
    # Exclusive with admm.epochs / admm.retrain_epochs, which fix each stage's phases instead.
    epochs: float | None = None
    # With labels: weight of distillation from the original model in the loss, (1 - d) CE + d KL.
    distill: float = 0.0
    # Distillation on a per-position score (sequences, maps): the share of the weight spread evenly over
    # the teacher's predicted classes, so its majority (CTC blanks, background) does not take the whole
    # loss (train.balance_weights). 0: every position weighs the same (the engine's own Loss default).
    balance: float = 0.5

    def __post_init__(self) -> None:
        if self.optimizer not in ("sgd", "adam"):
            _fail(f"train.optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        if self.precision not in PRECISIONS:
            _fail(f"train.precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.lr is not None and not self.lr > 0:
            _fail(f"train.lr must be > 0, got {self.lr!r}")
        if not 0 <= self.momentum < 1:
            _fail(f"train.momentum must be in [0, 1), got {self.momentum!r}")
        if self.weight_decay < 0:
            _fail(f"train.weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.batch_size is not None and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            _fail(f"train.batch_size must be a positive integer, got {self.batch_size!r}")
        if self.batch_memory_mb is not None and not (
                isinstance(self.batch_memory_mb, (int, float)) and not isinstance(self.batch_memory_mb, bool)
                and 1 <= self.batch_memory_mb < 1e9):
            _fail(f"train.batch_memory_mb is the memory a training batch may take, in MB (e.g. 1024), "
                  f"and must be at least 1, got {self.batch_memory_mb!r}")
        if self.threads is not None:
            check_threads("train.threads", self.threads)
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            _fail(f"train.device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        if not 0 < self.val_fraction < 0.5:
            _fail(f"train.val_fraction must be in (0, 0.5), got {self.val_fraction!r}")
        if not (isinstance(self.distill, (int, float)) and 0 <= self.distill <= 1):
            _fail(f"train.distill must be a fraction in [0, 1] (0: labels only), got {self.distill!r}")
        if self.blank is not None and (not isinstance(self.blank, int) or isinstance(self.blank, bool) or self.blank < 0):
            _fail(f"train.blank is the CTC blank's class index and must be an integer >= 0, got {self.blank!r}")
        if not (isinstance(self.balance, (int, float)) and not isinstance(self.balance, bool) and 0 <= self.balance <= 1):
            _fail(f"train.balance must be a fraction in [0, 1] (0: every position weighs the same, 1: every "
                  f"predicted class does), got {self.balance!r}")
        if self.epochs is not None and not (isinstance(self.epochs, (int, float)) and 0 < self.epochs < 1e6):
            _fail(f"train.epochs is the total training budget and must be > 0, got {self.epochs!r}")


@dataclass(frozen=True)
class ADMMConfig:
    """The ADMM schedule of one stage: ADMM epochs, then masked retraining."""

    # Per stage; None: derived from train.epochs (or DEFAULT_EPOCHS when neither is given).
    epochs: int | None = None
    retrain_epochs: int | None = None
    # Epochs between Z/U updates; a fraction updates within the epoch (0.25: four times per epoch; needs
    # in-memory data, whose batches per epoch are known). None: `updates` Z/U updates per ADMM phase,
    # whatever its length (short budgets still get several updates).
    period: float | None = None
    updates: int = 10
    # None (default): chosen per ADMM phase from the learning rate, momentum and steps per Z/U period so
    # that the penalty's pull is the same at any budget (schedule.auto_rho); with Adam, whose steps do not
    # scale with the gradient, 1e-2. A number fixes the initial rho.
    rho: float | None = None
    # With rho = None: the fraction of the W-to-Z gap the penalty alone closes in the first Z/U period
    # (schedule.auto_rho); it grows with rho (x rho_growth per update).
    pull: float = PULL_START
    rho_growth: float = 1.3
    rho_max: float | None = None  # cap on rho (None: where one SGD step alone closes 10% of the gap)
    # Textbook scaled ADMM rescales U when rho grows; the authors' code does not. Rescaling measured
    # better (see onnx_admm.admm.ADMM), so it is the default.
    rescale_dual: bool = True
    # Learning rate inside the ADMM phase: constant, reset (anneal within every Z/U period and restart at
    # each update, as the authors' progressive code does) or cosine (one anneal over the phase). Masked
    # retraining always anneals to 0. Constant measured best at short budgets (sweep.py, 200x: 84.6% vs
    # 83.3% for reset at rho 1e-2): W keeps moving, so the support Z follows it.
    lr_policy: str = "constant"
    # With a total budget (train.epochs): the fraction of each stage's part spent in ADMM, the rest in
    # masked retraining (schedule.split_budget).
    share: float = ADMM_SHARE

    def __post_init__(self) -> None:
        if not 0 <= self.share < 1:
            _fail(f"admm.share must be a fraction in [0, 1), got {self.share!r}")
        if self.lr_policy not in LR_POLICIES:
            _fail(f"admm.lr_policy must be one of {', '.join(LR_POLICIES)}, got {self.lr_policy!r}")
        for name in ("epochs", "retrain_epochs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                _fail(f"admm.{name} must be an integer >= 0, got {value!r}")
        if not isinstance(self.updates, int) or isinstance(self.updates, bool) or self.updates < 1:
            _fail(f"admm.updates must be an integer >= 1 (Z/U updates per ADMM phase), got {self.updates!r}")
        # Finite first: int(inf) raises OverflowError (a count of epochs must be a number the schedule can reach).
        if self.period is not None and (not math.isfinite(self.period) or not self.period > 0
                                        or (self.period >= 1 and self.period != int(self.period))):
            _fail(f"admm.period must be a whole number of epochs, or a fraction below 1 (0.25 = four Z/U "
                  f"updates per epoch), got {self.period!r}")
        if self.rho is not None and not self.rho > 0:
            _fail(f"admm.rho must be > 0 (typical: 1e-3 to 0.1), got {self.rho!r}")
        if not self.rho_growth >= 1:
            _fail(f"admm.rho_growth must be >= 1 (typical: 1.3), got {self.rho_growth!r}")
        if not 0 < self.pull <= 1:
            _fail(f"admm.pull must be in (0, 1] (the fraction of the gap closed per period; default {PULL_START}), "
                  f"got {self.pull!r}")
        if self.rho_max is not None and not self.rho_max > 0:
            _fail(f"admm.rho_max must be > 0, got {self.rho_max!r}")
        if self.rho is not None and self.rho_max is not None and not self.rho_max >= self.rho:
            _fail(f"admm.rho_max must be >= admm.rho, got {self.rho_max!r} < {self.rho!r}")


@dataclass(frozen=True)
class PruneConfig:
    """Global unstructured target and its progressive stages."""

    sparsity: float | None = None
    # Stages to the target, spaced geometrically in compression ratio; None: one per ~6x of ratio
    # (schedule.auto_stages), at most one per 2 epochs of a train.epochs budget.
    stages: int | None = None
    # How stage targets rise to the sparsity: cubic (gradual pruning's curve, in sparsity) or geometric
    # (in compression ratio, as the progressive ADMM papers step).
    spacing: str = "cubic"
    targets: tuple[float, ...] | None = None  # explicit global stage targets (overrides stages)
    # How the global target is split over layers (onnx_admm.allocation): lamp | global | erk | uniform |
    # sensitivity (measured per-layer drops, onnx_admm.sensitivity).
    allocation: str = "lamp"
    min_keep: int = 1  # every layer keeps at least this many weights (0: a layer may be emptied)
    floor: float = 0.0  # every layer keeps at least this fraction (a minimum count, taken first)
    # unstructured | filter (output channels) | channel (input channels) | column | block, or an N:M pattern
    # ("2:4", "4:8": at most N nonzeros in every M consecutive weights along the input axis; it fixes the
    # sparsity at 1 - N/M, so `sparsity` may be left out)
    structure: str = "unstructured"
    block: tuple[int, int] = (64, 64)  # rows x cols of a block (crossbar tile), for structure = "block"
    # After each hard projection, refit the kept weights of every pruned Linear/MatMul/Conv so that its
    # outputs on ``reconstruct_samples`` training inputs stay what they were (onnx_admm.reconstruct).
    reconstruct: bool = True
    reconstruct_samples: int = 256
    # Filter pruning: each layer keeps a multiple of this many filters, the nearest to its share of the target
    # where that is at most an eighth of its filters away, else of half as many (structured.rounded_keep;
    # onnxruntime's blocked convolution kernels run multiples of 8 faster: nudenet's YOLOv8n at 30% filters
    # took 0.69x the original's time so rounded, 0.73x with exact shares); 1 keeps the exact share.
    round_to: int = 8

    def __post_init__(self) -> None:
        _check_structure("prune.structure", self.structure)
        if self.round_to < 1:  # an integer: the table's types are checked first
            _fail(f"prune.round_to must be an integer >= 1 (a multiple of filters to keep), got {self.round_to!r}")
        if not isinstance(self.reconstruct, bool):
            _fail(f"prune.reconstruct must be true or false, got {self.reconstruct!r}")
        if (not isinstance(self.reconstruct_samples, int) or isinstance(self.reconstruct_samples, bool)
                or self.reconstruct_samples < 1):
            _fail(f"prune.reconstruct_samples must be an integer >= 1, got {self.reconstruct_samples!r}")
        _check_nm_sparsity("prune.structure", self.structure, self.sparsity)
        if structures.nm_pattern(self.structure) is not None and self.targets is not None:
            _fail(f"prune.structure {self.structure!r} applies its pattern whole at every stage; drop prune.targets")
        object.__setattr__(self, "block", tuple(self.block))
        if len(self.block) != 2 or not all(isinstance(b, int) and b >= 1 for b in self.block):
            _fail(f"prune.block must be two positive integers [rows, cols], got {list(self.block)!r}")
        _check_fraction("prune.sparsity", self.sparsity)
        if self.stages is not None and (not isinstance(self.stages, int) or self.stages < 1):
            _fail(f"prune.stages must be an integer >= 1, got {self.stages!r}")
        if self.targets is not None:
            object.__setattr__(self, "targets", tuple(self.targets))
            if not self.targets:
                _fail("prune.targets must not be empty; give rising sparsities like [0.9, 0.96, 0.975]")
            for t in self.targets:
                _check_fraction("each of prune.targets", t)
            if any(b <= a for a, b in zip(self.targets, self.targets[1:])):
                _fail(f"prune.targets must rise strictly, got {list(self.targets)}")
            if self.sparsity is not None and abs(self.targets[-1] - self.sparsity) > 1e-12:
                _fail(f"prune.targets must end at prune.sparsity ({self.sparsity}), got {list(self.targets)}")
        if not 0 <= self.floor < 1:
            _fail(f"prune.floor must be in [0, 1), got {self.floor!r}")
        if self.spacing not in SPACINGS:
            _fail(f"prune.spacing must be one of {', '.join(SPACINGS)}, got {self.spacing!r}")
        if self.allocation not in ALLOCATIONS:
            _fail(f"prune.allocation must be one of {', '.join(ALLOCATIONS)}, got {self.allocation!r}")
        if not isinstance(self.min_keep, int) or isinstance(self.min_keep, bool) or self.min_keep < 0:
            _fail(f"prune.min_keep must be an integer >= 0, got {self.min_keep!r}")


def _check_structure(name: str, value: str | None) -> None:
    if value is None:
        return
    try:
        structures.parse(value)
    except ValueError as exc:
        _fail(f"{name} {value!r}: {exc}" if structures.nm_pattern(value) else f"{name} {exc}")


def _check_nm_sparsity(name: str, structure: str | None, sparsity: float | None) -> None:
    """An N:M pattern fixes the sparsity at 1 - N/M: a different target contradicts it."""
    pattern = structures.nm_pattern(structure)
    if pattern is None or sparsity is None:
        return
    implied = 1 - pattern[0] / pattern[1]
    if abs(sparsity - implied) > 1e-9:
        _fail(f"{name} {structure!r} keeps {pattern[0]} of every {pattern[1]} weights, sparsity {implied:g}, but the "
              f"target is {sparsity!r}; drop the sparsity or set it to {implied:g}")


def _check_quant(where: str, bits: int | tuple[int, ...] | None, ternary: bool, clusters: int | None) -> None:
    chosen = [k for k, v in (("bits", bits), ("ternary", ternary or None), ("clusters", clusters)) if v is not None]
    if len(chosen) > 1:
        _fail(f"{where}: choose one of bits, ternary and clusters, got {', '.join(chosen)}")
    for b in (bits if isinstance(bits, tuple) else () if bits is None else (bits,)):
        if not isinstance(b, int) or isinstance(b, bool) or not 1 <= b <= 8:
            _fail(f"{where} bits must be integers from 1 (binary) to 8, got {b!r}")
    if isinstance(bits, tuple):
        if not bits:
            _fail(f"{where} bits must not be an empty list")
        if any(b2 >= b1 for b1, b2 in zip(bits, bits[1:])):
            _fail(f"{where} bits stages must fall strictly (e.g. [8, 4, 2]), got {list(bits)}")
    if clusters is not None and (not isinstance(clusters, int) or isinstance(clusters, bool) or not 2 <= clusters <= 256):
        _fail(f"{where} clusters must be an integer from 2 to 256, got {clusters!r}")


# What ``quantize.rounding`` takes: nearest puts each k-bit weight on its nearest level; gptq rounds the
# weights of a layer with a tap column by column on the same grid, each column's error spread onto the
# columns not yet rounded by the Optimal Brain Surgeon update on calibration inputs (GPTQ), so that the
# layer's outputs stay closer to what they were (onnx_admm.reconstruct.round_to_grid).
ROUNDINGS = ("nearest", "gptq")


@dataclass(frozen=True)
class QuantizeConfig:
    """Weights on levels: k-bit (1 = binary), ternary, or a k-means codebook.

    k-bit levels use the container's whole range, q in [-2^(k-1), 2^(k-1) - 1] (2 bits: four levels);
    ``symmetric = true`` drops the most negative one (2 bits then equal a uniform ternary grid).
    """

    bits: int | tuple[int, ...] | None = None  # a list: progressive stages, e.g. [8, 4, 2, 1]
    ternary: bool = False
    clusters: int | None = None
    # One scale per output channel (uniform, binary, ternary); None: per channel, but ternary levels per
    # tensor (``per_channel_for``).
    per_channel: bool | None = None
    symmetric: bool = False  # k-bit levels symmetric around 0 (one level fewer)
    # Binary and ternary retraining: refit the scales (and the ternary threshold) from the latent weights
    # every `refit` steps (0: keep the hard projection's), and clip the latent weights to `clip` times their
    # channel's scale (0: no clipping). Measured on the Fashion-MNIST LeNet-5 (samples/, RESULTS.md).
    refit: int = 10
    clip: float = 2.0
    # How k-bit weights are put on their levels after the hard projection (ROUNDINGS).
    rounding: str = "gptq"

    def __post_init__(self) -> None:
        if self.rounding not in ROUNDINGS:
            _fail(f"[quantize] rounding must be one of {', '.join(ROUNDINGS)}, got {self.rounding!r}")
        if isinstance(self.bits, list):
            object.__setattr__(self, "bits", tuple(self.bits))
        _check_quant("[quantize]", self.bits, self.ternary, self.clusters)
        if isinstance(self.refit, bool) or not isinstance(self.refit, int) or self.refit < 0:
            _fail(f"[quantize] refit is the number of training steps between refits of binary/ternary scales "
                  f"(0: keep the hard projection's), got {self.refit!r}")
        if isinstance(self.clip, bool) or not isinstance(self.clip, (int, float)) or not (
                self.clip == 0 or self.clip > 1):
            _fail(f"[quantize] clip must be 0 (no clipping) or a factor above 1 (latent weights within clip x "
                  f"their scale; 2 is the default), got {self.clip!r}")

    @property
    def enabled(self) -> bool:
        return self.bits is not None or self.ternary or self.clusters is not None

    def per_channel_for(self, ternary: bool = False, clusters: bool = False) -> bool:
        """Whether a weight's levels (its rule's, or these) keep one scale per output channel: as
        ``per_channel`` says, else every level set but ternary (TWN's scale is per layer; XNOR-Net's binary
        scale per filter; k-bit weights per channel as onnxruntime and TensorRT store them). Codebooks share
        their values over the tensor either way. Measured, 3 seeds each (samples/lenet5_fashion_mnist and
        samples/digits RESULTS.md): ternary per tensor +0.18 (LeNet-5) and +0.19 (digits CNN); binary per
        channel +0.20 and +0.19; 4-bit per channel level (LeNet-5) and +0.37 (digits CNN)."""
        if self.per_channel is not None:
            return self.per_channel
        return not (ternary or clusters)

    @property
    def binary(self) -> bool:
        """Whether the weights end on binary levels (1 bit, or a progressive list ending at 1)."""
        return (self.bits[-1] if isinstance(self.bits, tuple) else self.bits) == 1


# What ``output.activations`` takes: float keeps the graph's float activations; int8 adds QuantizeLinear /
# DequantizeLinear pairs (onnx_admm.activations) so that onnxruntime fuses them into integer kernels.
ACTIVATIONS = ("float", "int8")
# What ``output.ranges`` takes: how the int8 activation ranges are chosen from the calibration data.
# minmax: min/max of each tensor (onnxruntime quantize_static's default); fit: each range clipped to the
# fraction of its min/max that brings the int8 model's outputs closest to the float model's on the
# calibration data (converters.qdq_tune; about 5 extra passes over it per activation tensor). fit lowers
# the error on the calibration data, but on the ViT sample not reliably on other data: opt-in.
RANGES = ("minmax", "fit")


@dataclass(frozen=True)
class OutputConfig:
    """How the compressed model is written, beyond its weights."""

    activations: str = "float"
    calibration: int = 256  # samples of the training data that calibrate int8 activation ranges
    ranges: str = "minmax"  # how the calibration data sets the int8 activation ranges (RANGES)
    # Pruned weights as COO sparse initializers where smaller in raw bytes; false keeps every weight in its own
    # shape, zeros included: onnx's strict shape inference (check_model full_check) types a sparse initializer
    # sparse_tensor and refuses it as a Conv / Gemm / MatMul input, and other tools may not read one.
    sparse_weights: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.sparse_weights, bool):
            _fail(f"output.sparse_weights is true or false, got {self.sparse_weights!r}")
        if self.activations not in ACTIVATIONS:
            _fail(f"output.activations must be one of {', '.join(ACTIVATIONS)}, got {self.activations!r}")
        if self.ranges not in RANGES:
            _fail(f"output.ranges must be one of {', '.join(RANGES)}, got {self.ranges!r}")
        if self.calibration < 1:
            _fail(f"output.calibration is a number of samples (>= 1), got {self.calibration}")


@dataclass(frozen=True)
class Rule:
    """Per-weight settings; matches by ONNX tensor name glob and/or consumer op type."""

    match: str | None = None
    op_type: str | None = None
    sparsity: float | None = None
    structure: str | None = None
    bits: int | tuple[int, ...] | None = None
    ternary: bool = False
    clusters: int | None = None
    skip: bool = False

    def __post_init__(self) -> None:
        if self.match is None and self.op_type is None:
            _fail("each [[rules]] entry needs `match` (a glob on weight names) or `op_type`")
        _check_fraction("rules.sparsity", self.sparsity)
        _check_structure("rules.structure", self.structure)
        _check_nm_sparsity("rules.structure", self.structure, self.sparsity)
        if isinstance(self.bits, list):
            object.__setattr__(self, "bits", tuple(self.bits))
        _check_quant(f"rule {self.match or self.op_type!r}", self.bits, self.ternary, self.clusters)
        if self.skip and self.sparsity is not None:
            _fail(f"rule {self.match or self.op_type!r}: `skip = true` and `sparsity` contradict; keep one")

    def describe(self) -> str:
        """How the recipe wrote the rule's selector: ``match = "0.*", op_type = "Conv"``."""
        return ", ".join(f'{key} = "{value}"' for key, value in (("match", self.match), ("op_type", self.op_type))
                         if value is not None)

    def matches(self, name: str, op_type: str) -> bool:
        return (self.match is None or fnmatch.fnmatchcase(name, self.match)) and (
            self.op_type is None or self.op_type == op_type
        )
