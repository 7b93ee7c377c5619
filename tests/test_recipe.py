"""Tests for onnx_admm.recipe: TOML loading, unknown keys, value checks, rule matching, replace."""

from __future__ import annotations

import re

import pytest

from onnx_admm.converters.errors import UserError
from onnx_admm.recipe import ADMMConfig, CompressConfig, PruneConfig, QuantizeConfig, Rule, TrainConfig
from onnx_admm.structures import nm_pattern

RECIPE = """\
[train]
optimizer = "adam"
lr = 0.003
weight_decay = 1e-4
batch_size = 32
seed = 7
threads = 1
output = "logits"

[admm]
epochs = 4
retrain_epochs = 2
period = 2
rho = 0.01
rho_growth = 1.5
rho_max = 0.5
rescale_dual = false

[prune]
sparsity = 0.975
targets = [0.9, 0.96, 0.975]
floor = 0.02

[[rules]]
match = "7.*"
sparsity = 0.5

[[rules]]
op_type = "Conv"
skip = true
"""


def _write(tmp_path, text: str, name: str = "recipe.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def _to_toml(data: dict) -> str:
    """Just enough of a TOML writer for ``CompressConfig.to_dict()`` (no tomli_w here)."""
    lines = []
    for table in ("train", "admm", "prune"):
        lines.append(f"[{table}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in data[table].items()]
    for rule in data["rules"]:
        lines.append("[[rules]]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in rule.items()]
    return "\n".join(lines) + "\n"


def test_toml_loads_every_table(tmp_path):
    config = CompressConfig.from_toml(_write(tmp_path, RECIPE))
    assert config.train == TrainConfig(optimizer="adam", lr=0.003, weight_decay=1e-4, batch_size=32, seed=7,
                                       threads=1, output="logits")
    assert config.admm == ADMMConfig(epochs=4, retrain_epochs=2, period=2, rho=0.01, rho_growth=1.5, rho_max=0.5,
                                     rescale_dual=False)
    assert config.prune == PruneConfig(sparsity=0.975, targets=(0.9, 0.96, 0.975), floor=0.02)
    assert config.rules == (Rule(match="7.*", sparsity=0.5), Rule(op_type="Conv", skip=True))


def test_round_trip_toml_dict_toml(tmp_path):
    config = CompressConfig.from_toml(_write(tmp_path, RECIPE))
    data = config.to_dict()
    assert CompressConfig.from_dict(data) == config
    # to_dict is TOML-writable (no None values) and reloads to the same config.
    again = CompressConfig.from_toml(_write(tmp_path, _to_toml(data), "again.toml"))
    assert again == config
    assert again.to_dict() == data


def test_round_trip_defaults():
    config = CompressConfig()
    assert CompressConfig.from_dict(config.to_dict()) == config
    assert CompressConfig.from_dict({}) == config


@pytest.mark.parametrize(
    "text,key,where",
    [
        ("spars = 0.9\n", "spars", "recipe"),
        ("[train]\nlearning_rate = 0.1\n", "learning_rate", "[train]"),
        ("[admm]\nepochs = 1\nrho_init = 0.1\n", "rho_init", "[admm]"),
        ("[prune]\nsparsity = 0.9\nfloors = 0.1\n", "floors", "[prune]"),
        ('[[rules]]\nmatch = "a*"\nsparsity = 0.5\n[[rules]]\nop = "Conv"\n', "op", "[[rules]]"),
        ("[pruning]\nsparsity = 0.9\n", "pruning", "recipe"),
    ],
    ids=["top", "train", "admm", "prune", "rules", "table"],
)
def test_unknown_key_is_an_error_naming_it(tmp_path, text, key, where):
    with pytest.raises(UserError) as info:
        CompressConfig.from_toml(_write(tmp_path, text))
    message = str(info.value)
    assert repr(key) in message and where in message
    assert "\n" not in message


@pytest.mark.parametrize("value", ["1.0", "1", "1.5", "-0.1", "-1"])
@pytest.mark.parametrize("where", ["prune", "rules"])
def test_sparsity_outside_unit_interval_is_an_error(tmp_path, value, where):
    text = f"[prune]\nsparsity = {value}\n" if where == "prune" else f'[[rules]]\nmatch = "*"\nsparsity = {value}\n'
    with pytest.raises(UserError, match=r"sparsity must be a fraction in \[0, 1\)"):
        CompressConfig.from_toml(_write(tmp_path, text))


@pytest.mark.parametrize(
    "text,message",
    [
        ("[train]\ndevice = 1\n", "[train] device must be a string, got 1"),
        ("[train]\nbatch_size = true\n", "[train] batch_size must be an integer, got True"),
        ("[train]\nthreads = 1.5\n", "[train] threads must be an integer, got 1.5"),
        ('[train]\nlr = "0.1"\n', "[train] lr must be a number, got '0.1'"),
        ('[admm]\nrescale_dual = "no"\n', "[admm] rescale_dual must be true or false, got 'no'"),
        ("[prune]\nsparsity = true\n", "[prune] sparsity must be a number, got True"),
        ("[prune]\ntargets = 0.9\n", "[prune] targets must be an array, got 0.9"),
        ("[[rules]]\nmatch = 5\n", "[[rules]] match must be a string, got 5"),
    ],
)
def test_wrong_value_types_are_user_errors(tmp_path, text, message):
    # Before: device = 1 and match = 5 crashed with a traceback; batch_size = true ran with batch size 1 and
    # rescale_dual = "no" meant true.
    with pytest.raises(UserError) as info:
        CompressConfig.from_toml(_write(tmp_path, text))
    assert str(info.value) == message


def test_integers_are_fine_numbers(tmp_path):
    config = CompressConfig.from_toml(_write(tmp_path, "[train]\nlr = 1\n[admm]\nrho = 1\nrho_max = 2\n"))
    assert config.train.lr == 1 and config.admm.rho == 1


def test_the_default_learning_rate_follows_the_quantization():
    assert CompressConfig().lr == 0.01 and CompressConfig().train.lr is None
    assert CompressConfig.from_dict({"quantize": {"bits": 1}}).lr == 0.03
    assert CompressConfig.from_dict({"quantize": {"bits": 1, "per_channel": True}}).lr == 0.03
    for quantize in ({"ternary": True}, {"bits": 2}, {"bits": 4}, {"clusters": 4}):
        assert CompressConfig.from_dict({"quantize": quantize}).lr == 0.01, quantize
    assert QuantizeConfig(bits=(8, 4, 2, 1)).binary and not QuantizeConfig(bits=(8, 4, 2)).binary
    assert CompressConfig.from_dict({"train": {"lr": 0.05}, "quantize": {"bits": 1}}).lr == 0.05  # given: kept


@pytest.mark.parametrize("recipe", [
    {"prune": {"sparsity": 0.9}},
    {"prune": {"targets": [0.5, 0.9]}},
    {"prune": {"structure": "2:4"}},  # the pattern fixes the sparsity
    {"rules": [{"match": "fc*", "sparsity": 0.5}]},
    {"rules": [{"op_type": "Conv", "structure": "4:8"}]},
    {"prune": {"sparsity": 0.9}, "rules": [{"match": "conv*", "structure": "2:4"}]},
    {"prune": {"sparsity": 0.975}, "quantize": {"bits": 4}},  # pruning with levels trains as pruning
])
def test_weight_by_weight_pruning_trains_at_the_pruning_default(recipe):
    config = CompressConfig.from_dict(recipe)
    assert config.prunes_weights and config.lr == 0.02
    assert config.lr_for()[1] == "the pruning default, recipe.PRUNE_LR"
    assert CompressConfig.from_dict({**recipe, "train": {"lr": 0.005}}).lr == 0.005  # given: kept
    assert CompressConfig.from_dict({**recipe, "quantize": {"bits": 1}}).lr == 0.03  # binary levels: their own


@pytest.mark.parametrize("recipe", [
    {}, {"quantize": {"bits": 4}}, {"rules": [{"match": "fc*", "bits": 2}]},
    {"rules": [{"match": "fc*", "skip": True, "structure": "2:4"}]},  # a skipped rule removes nothing
    {"rules": [{"match": "fc*", "structure": "filter"}]},  # a structure with no target to prune to
    # whole filters anywhere: the residual CNN sample lost 14 points at 0.02 (samples/resnet_fashion_mnist)
    {"prune": {"sparsity": 0.5, "structure": "filter"}},
    {"prune": {"sparsity": 0.5, "structure": "channel"}, "quantize": {"bits": 4}},
    {"prune": {"sparsity": 0.9}, "rules": [{"match": "conv*", "structure": "filter"}]},  # shares the target
    {"rules": [{"match": "fc*", "sparsity": 0.9}, {"match": "conv*", "sparsity": 0.5, "structure": "block"}]},
])
def test_levels_alone_and_structured_pruning_keep_the_default(recipe):
    config = CompressConfig.from_dict(recipe)
    assert not config.prunes_weights and config.lr_for() == (0.01, "the default, recipe.DEFAULT_LR")


@pytest.mark.parametrize("targets", [[0.9, 0.8], [0.9, 0.9], [0.5, 1.0], [-0.1, 0.5], []])
def test_prune_targets_must_rise_within_unit_interval(targets):
    with pytest.raises(UserError, match="prune.targets"):
        CompressConfig.from_dict({"prune": {"targets": targets}})


def test_prune_targets_must_end_at_sparsity():
    with pytest.raises(UserError, match="end at prune.sparsity"):
        PruneConfig(sparsity=0.99, targets=(0.9, 0.95))
    assert PruneConfig(sparsity=0.95, targets=[0.9, 0.95]).targets == (0.9, 0.95)


@pytest.mark.parametrize(
    "data,match",
    [
        ({"train": {"optimizer": "rmsprop"}}, "train.optimizer"),
        ({"train": {"lr": 0}}, "train.lr"),
        ({"train": {"lr": True}}, r"\[train\] lr must be a number, got True"),
        ({"train": {"lr": "0.1"}}, r"\[train\] lr must be a number"),
        ({"train": {"batch_size": 0}}, "train.batch_size"),
        ({"train": {"device": "tpu"}}, "train.device"),
        ({"admm": {"epochs": -1}}, "admm.epochs"),
        ({"admm": {"period": 0}}, "admm.period"),
        ({"admm": {"rho": 0.5, "rho_max": 0.1}}, "admm.rho_max"),
        ({"admm": {"pull": 0}}, "admm.pull"),
        ({"admm": {"pull": 1.5}}, "admm.pull"),
        ({"prune": {"stages": 0}}, "prune.stages"),
        ({"rules": [{"sparsity": 0.5}]}, "match"),
        ({"rules": [{"match": "*", "sparsity": 0.5, "skip": True}]}, "contradict"),
        ({"rules": {"match": "*"}}, r"\[\[rules\]\]"),
        ({"train": 3}, "must be a table"),
        ({"quantize": {"bits": 1, "clip": 1.0}}, r"\[quantize\] clip must be 0 \(no clipping\) or a factor above 1"),
        ({"quantize": {"bits": 1, "clip": -2}}, r"\[quantize\] clip must be 0"),
        ({"quantize": {"ternary": True, "refit": -1}}, r"\[quantize\] refit is the number of training steps"),
    ],
)
def test_bad_values_are_user_errors(data, match):
    with pytest.raises(UserError, match=match):
        CompressConfig.from_dict(data)


def test_invalid_toml_and_missing_file_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not valid TOML"):
        CompressConfig.from_toml(_write(tmp_path, "[prune\nsparsity = 0.9\n"))
    with pytest.raises(UserError, match="recipe .*missing.toml does not exist"):
        CompressConfig.from_toml(tmp_path / "missing.toml")


def test_rules_first_match_wins():
    config = CompressConfig(rules=(
        Rule(match="5.*", sparsity=0.5),
        Rule(op_type="Gemm", sparsity=0.9),
        Rule(match="*.weight", op_type="Conv", skip=True),
    ))
    assert config.rule_for("5.weight", "Gemm").sparsity == 0.5  # matches rules 1 and 2: the first wins
    assert config.rule_for("7.weight", "Gemm").sparsity == 0.9
    assert config.rule_for("0.weight", "Conv").skip
    assert config.rule_for("0.bias", "Conv") is None  # glob and op type must both match
    assert config.rule_for("x", "MatMul") is None
    reordered = CompressConfig(rules=config.rules[1:] + config.rules[:1])
    assert reordered.rule_for("5.weight", "Gemm").sparsity == 0.9


def test_glob_is_case_sensitive_and_whole_name():
    rule = Rule(match="conv*")
    assert rule.matches("conv1.weight", "Conv")
    assert not rule.matches("Conv1.weight", "Conv")
    assert not rule.matches("layer.conv1.weight", "Conv")


def test_replace_ignores_none_and_keeps_other_fields():
    config = CompressConfig(train=TrainConfig(lr=0.05, seed=3), prune=PruneConfig(sparsity=0.9, stages=2))
    same = config.replace(train={"lr": None, "seed": None}, admm={"epochs": None}, prune={"sparsity": None})
    assert same == config
    changed = config.replace(train={"lr": 0.1, "seed": None}, admm={"epochs": 2}, prune={"stages": None})
    assert changed.train == TrainConfig(lr=0.1, seed=3)
    assert changed.admm == ADMMConfig(epochs=2)
    assert changed.prune == PruneConfig(sparsity=0.9, stages=2)
    assert config.train.lr == 0.05  # the original is a frozen value, untouched


def test_replace_validates_the_new_values():
    with pytest.raises(UserError, match="prune.sparsity"):
        CompressConfig().replace(prune={"sparsity": 1.5})


def test_nm_structures():
    assert PruneConfig(structure="2:4").structure == "2:4"
    assert PruneConfig(structure="4:8", sparsity=0.5).sparsity == 0.5  # the sparsity the pattern implies
    assert nm_pattern("2:4") == (2, 4) and nm_pattern("16:32") == (16, 32)
    assert nm_pattern("block") is None and nm_pattern("2:4:8") is None and nm_pattern(None) is None
    assert Rule(match="fc*", structure="1:4").structure == "1:4"
    for bad, match in [("4:2", "1 <= N < M"), ("0:4", "1 <= N < M"), ("2:4:8", "N:M pattern such as"),
                       ("2 : 4", "N:M pattern such as"), ("rows", "must be one of unstructured")]:
        with pytest.raises(UserError, match=match):
            PruneConfig(structure=bad)
    with pytest.raises(UserError, match=r"prune.structure '2:4' keeps 2 of every 4 weights, sparsity 0.5, but the "
                                        r"target is 0.9; drop the sparsity or set it to 0.5"):
        CompressConfig.from_dict({"prune": {"structure": "2:4", "sparsity": 0.9}})
    with pytest.raises(UserError, match="rules.structure '1:4' keeps 1 of every 4"):
        Rule(match="*", structure="1:4", sparsity=0.5)
    with pytest.raises(UserError, match="drop prune.targets"):
        PruneConfig(structure="2:4", targets=(0.25, 0.5))


@pytest.mark.parametrize("quantize, levels, expected", [
    ({"bits": 1}, {}, True),  # binary and k-bit levels: one scale per output channel unless the recipe says
    ({"bits": 4}, {}, True),
    ({"bits": [8, 4, 2]}, {}, True),
    ({"ternary": True}, {"ternary": True}, False),  # ternary: one per tensor
    ({"bits": 4}, {"ternary": True}, False),  # a rule's own ternary levels on a 4-bit run
    ({"clusters": 16}, {"clusters": True}, False),  # a codebook is the tensor's whatever the flag
    ({"bits": 1, "per_channel": False}, {}, False),
    ({"ternary": True, "per_channel": True}, {"ternary": True}, True),
])
def test_scales_per_channel_but_ternary_unless_the_recipe_chooses(quantize, levels, expected):
    assert CompressConfig.from_dict({"quantize": quantize}).quantize.per_channel_for(**levels) is expected


def test_per_channel_must_be_a_boolean():
    with pytest.raises(UserError, match=r"^\[quantize\] per_channel must be true or false, got 'yes'$"):
        CompressConfig.from_dict({"quantize": {"bits": 4, "per_channel": "yes"}})


def test_pruning_without_labels_takes_the_default_rate():
    pruning = CompressConfig.from_dict({"prune": {"sparsity": 0.9}})
    assert pruning.lr_for(labelled=True) == (0.02, "the pruning default, recipe.PRUNE_LR")
    assert pruning.lr_for(labelled=False) == (0.01, "the label-free pruning default, recipe.DEFAULT_LR")
    assert pruning.lr == 0.02  # a plugin's labels are unknown until it runs: as with labels
    given = CompressConfig.from_dict({"prune": {"sparsity": 0.9}, "train": {"lr": 0.05}})
    assert given.lr_for(labelled=False) == (0.05, "train.lr")
    binary = CompressConfig.from_dict({"prune": {"sparsity": 0.9}, "quantize": {"bits": 1}})
    assert binary.lr_for(labelled=False)[0] == 0.03


@pytest.mark.parametrize("value, message", [
    (0, r"prune.round_to must be an integer >= 1 \(a multiple of filters to keep\), got 0"),
    (-8, r"prune.round_to must be an integer >= 1 \(a multiple of filters to keep\), got -8"),
    (2.5, r"\[prune\] round_to must be an integer, got 2.5"),
    (True, r"\[prune\] round_to must be an integer, got True"),
])
def test_round_to_is_a_positive_integer(value, message):
    with pytest.raises(UserError, match=f"^{message}$"):
        CompressConfig.from_dict({"prune": {"sparsity": 0.5, "structure": "filter", "round_to": value}})


def test_a_round_to_of_its_own_needs_filter_pruning():
    # The default (8) rides along with any recipe; a value of the recipe's own where no filters are pruned
    # would be ignored without a word.
    message = ('prune.round_to = 16 (--round-to) rounds the filters each layer keeps, and this recipe prunes no '
               'filters: prune with structure = "filter" (--structure filter) or drop it')
    for prune in ({"sparsity": 0.5, "round_to": 16}, {"round_to": 16}):
        with pytest.raises(UserError, match=f"^{re.escape(message)}$"):
            CompressConfig.from_dict({"prune": prune})
    assert CompressConfig.from_dict({"prune": {"sparsity": 0.5}}).prune.round_to == 8
    assert CompressConfig.from_dict({"prune": {"sparsity": 0.5, "structure": "filter", "round_to": 16}})
    assert CompressConfig.from_dict({"prune": {"sparsity": 0.5, "round_to": 16},
                                     "rules": [{"match": "conv*", "structure": "filter"}]})


def test_small_data_schedule_is_for_label_free_binary_runs_on_few_inputs():
    binary = CompressConfig.from_dict({"quantize": {"bits": 1}})
    assert binary.small_data_schedule(103, labelled=False) == (8, pytest.approx(0.015))
    assert binary.small_data_schedule(512, labelled=False) == (32, pytest.approx(0.03))  # 16 steps an epoch
    assert binary.small_data_schedule(1024, labelled=False) is None  # 16 steps at the default batch 64
    assert binary.small_data_schedule(103, labelled=True) is None
    for keys in ({"train": {"batch_size": 16}}, {"train": {"lr": 0.05}}):  # the recipe's own choice stands
        assert CompressConfig.from_dict({"quantize": {"bits": 1}, **keys}).small_data_schedule(103, False) is None
    for keys in ({"prune": {"sparsity": 0.975}}, {"quantize": {"ternary": True}}):  # measured for binary only
        assert CompressConfig.from_dict(keys).small_data_schedule(103, False) is None
