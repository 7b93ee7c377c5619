"""From recipe to per-stage constraints (onnx_admm.plan)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from onnx_admm.converters.errors import UserError
from onnx_admm import structures
from onnx_admm.pipeline.planning import make_plan
from onnx_admm.plan import WeightSpec, sparsity_constraints
from onnx_admm.quant_choices import KBit, TernaryLevels
from onnx_admm.projections import Filter, Unstructured, Within
from onnx_admm.recipe import CompressConfig
from onnx_admm.structured import NM, Block, Column

SPECS = [WeightSpec("conv", "conv.weight", "Conv"), WeightSpec("fc", "fc.weight", "Gemm"),
         WeightSpec("emb", "emb", "Gather", None)]


def _plan(data):
    return make_plan(SPECS, CompressConfig.from_dict(data))


def test_global_pool_and_rules():
    plan = _plan({"prune": {"sparsity": 0.9, "stages": 2, "spacing": "geometric"},
                  "rules": [{"match": "emb", "skip": True}, {"op_type": "Conv", "sparsity": 0.5}]})
    by = plan.by_name()
    assert set(by) == {"conv", "fc"} and plan.untouched(SPECS) == ["emb"]
    assert by["conv"].sparsity == pytest.approx((1 - 0.5 ** 0.5, 0.5)) and not by["conv"].shared
    assert by["fc"].shared and plan.global_stages == pytest.approx((1 - 0.1 ** 0.5, 0.9))
    assert plan.n_stages == 2
    cubic = _plan({"prune": {"sparsity": 0.9, "stages": 2}})  # the default spacing: 0.9 (1 - 0.5**3), 0.9
    assert cubic.global_stages == pytest.approx((0.7875, 0.9))


def test_bit_schedule_and_pruning_schedule_run_side_by_side():
    plan = _plan({"prune": {"sparsity": 0.9, "stages": 3}, "quantize": {"bits": [8, 4, 2]},
                  "rules": [{"match": "emb", "skip": True}]})
    assert plan.n_stages == 3
    assert [q.bits for q in plan.by_name()["fc"].quant] == [8, 4, 2]
    single = _plan({"prune": {"sparsity": 0.9, "stages": 3}, "quantize": {"bits": 4},
                    "rules": [{"match": "emb", "skip": True}]})
    # One level set: the pruning stages stay float (each can refit its pruned layers), the last quantizes.
    assert single.by_name()["fc"].quant == (None, None, KBit(per_channel=True, bits=4))  # per channel by default
    ternary = _plan({"prune": {"sparsity": 0.9, "stages": 3}, "quantize": {"ternary": True},
                     "rules": [{"match": "emb", "skip": True}]})
    assert ternary.by_name()["fc"].quant == (None, None, TernaryLevels(False))
    listed = _plan({"prune": {"sparsity": 0.9, "stages": 3}, "quantize": {"bits": [4]},
                    "rules": [{"match": "emb", "skip": True}]})
    assert listed.by_name()["fc"].quant == (None, None, KBit(per_channel=True, bits=4))  # a one-entry list is the same choice


def test_mismatched_schedules_are_an_error():
    with pytest.raises(UserError, match="same number of stages"):
        _plan({"prune": {"sparsity": 0.9, "stages": 3}, "quantize": {"bits": [8, 4]}})


def test_quantize_only_and_nothing_to_do():
    plan = _plan({"quantize": {"ternary": True}})
    assert all(w.sparsity is None and not w.shared and isinstance(w.quant[0], TernaryLevels) for w in plan.weights)
    with pytest.raises(UserError, match="nothing to compress"):
        _plan({})


def test_structure_needs_filters():
    # The run's structure on a weight without filters (a Gather table, a recurrent weight) leaves it to
    # legalize, which leaves it alone with a warning; a rule that gives it that structure by name is refused.
    assert _plan({"prune": {"sparsity": 0.5, "structure": "filter"}}).by_name()["emb"].removes_channels
    with pytest.raises(UserError, match="'emb' \\(Gather\\) has no filters or channels: structure 'filter' cannot apply"):
        _plan({"prune": {"sparsity": 0.5}, "rules": [{"op_type": "Gather", "structure": "filter"}]})
    plan = _plan({"prune": {"sparsity": 0.5, "structure": "filter"},
                  "rules": [{"op_type": "Gather", "structure": "unstructured"}]})
    assert plan.by_name()["emb"].structure == structures.Unstructured()


@pytest.mark.parametrize("structure", ["filter", "channel", "column", "block"])
def test_a_split_of_single_weights_asked_of_whole_groups_is_an_error_and_the_plan_names_the_uniform_split(structure):
    # Each layer of a filter (channel, column, block) run loses its own share of its groups: LAMP, global magnitude,
    # ERK and the sensitivity split rank single weights of a global pool, which such a run does not have.
    for allocation in ("global", "erk", "sensitivity"):
        with pytest.raises(UserError, match=f"prune.allocation '{allocation}' splits a global budget of single "
                                            f"weights .* under structure '{structure}' every layer loses its own "
                                            "share \\(0.3\\) of its groups"):
            _plan({"prune": {"sparsity": 0.3, "structure": structure, "allocation": allocation}})
    assert _plan({"prune": {"sparsity": 0.3, "structure": structure}}).allocation.method == "uniform"
    assert _plan({"prune": {"sparsity": 0.3, "structure": structure, "allocation": "uniform"}}).allocation.method == "uniform"
    # A rule that prunes one layer weight by weight puts it in a global pool: the split applies to it.
    mixed = _plan({"prune": {"sparsity": 0.3, "structure": structure, "allocation": "global"},
                   "rules": [{"match": "fc.weight", "structure": "unstructured"}]})
    assert mixed.allocation.method == "global" and mixed.by_name()["fc"].shared


@pytest.mark.parametrize("structure, kind", [("unstructured", Unstructured), ("filter", Filter),
                                              ("column", Column), ("block", Block)])
def test_stage_constraints_and_nesting(structure, kind):
    plan = _plan({"prune": {"sparsity": 0.75, "stages": 2, "structure": structure, "block": [2, 2]},
                  "rules": [{"match": "emb", "skip": True}]})
    params = {"conv": torch.randn(8, 4, 3, 3), "fc": torch.randn(8, 16)}
    first = sparsity_constraints(plan, params, 0, None)
    assert all(isinstance(c, kind) for c in first.values())
    supports = {n: c.support(params[n]) for n, c in first.items()}
    second = sparsity_constraints(plan, params, 1, supports)
    assert all(isinstance(c, Within) for c in second.values())
    for name, c in second.items():
        assert not (c.support(params[name]) & ~supports[name]).any()  # nested


def test_nm_structure_needs_no_target_and_runs_along_the_input_axis():
    specs = [WeightSpec("conv", "conv.weight", "Conv"), WeightSpec("mm", "mm", "MatMul", 1),
             WeightSpec("fc", "fc.weight", "Gemm")]
    config = CompressConfig.from_dict({"prune": {"structure": "2:4", "stages": 2},
                                       "rules": [{"match": "fc*", "structure": "unstructured", "sparsity": 0.9}]})
    plan = make_plan(specs, config)
    by = plan.by_name()
    assert by["conv"].sparsity == (0.5, 0.5) and not by["conv"].shared and by["fc"].sparsity[-1] == 0.9
    params = {"conv": torch.randn(8, 4, 3, 3), "mm": torch.randn(8, 6), "fc": torch.randn(4, 8)}
    first = sparsity_constraints(plan, params, 0, None)
    assert first["conv"] == NM(2, 4, axis=1) and first["mm"] == NM(2, 4, axis=0)  # MatMul [K, N]: K is axis 0
    assert isinstance(first["fc"], Unstructured)
    supports = {n: c.support(params[n]) for n, c in first.items()}
    second = sparsity_constraints(plan, params, 1, supports)
    assert torch.equal(second["conv"].support(params["conv"]), supports["conv"])  # the same pattern, nested
    with pytest.raises(UserError, match="'emb' \\(Gather\\) has no input axis to group along: structure '2:4'"):
        _plan({"prune": {"structure": "unstructured"}, "rules": [{"match": "emb", "structure": "2:4"}]})


def test_conv_transpose_filters_and_channels_and_nm_follow_its_own_axes():
    # A ConvTranspose weight is [in, out / groups, kH, kW]: filters are axis 1, input channels axis 0.
    specs = [WeightSpec("ct", "ct.weight", "ConvTranspose", 1, 0)]
    params = {"ct": torch.randn(6, 4, 3, 3)}
    for structure, axis, groups in (("filter", 1, 4), ("channel", 0, 6)):
        plan = make_plan(specs, CompressConfig.from_dict({"prune": {"sparsity": 0.5, "structure": structure}}))
        support = sparsity_constraints(plan, params, 0, None)["ct"].support(params["ct"])
        kept = support.movedim(axis, 0).reshape(groups, -1)
        assert kept.all(dim=1).sum() == groups // 2 and not (kept.any(dim=1) & ~kept.all(dim=1)).any()
    nm = make_plan(specs, CompressConfig.from_dict({"prune": {"structure": "2:4"}}))
    assert sparsity_constraints(nm, {"ct": torch.randn(8, 4, 3, 3)}, 0, None)["ct"] == NM(2, 4, axis=0)


# --- rules that decide nothing are errors naming the weights that exist ---


@pytest.mark.parametrize("rule, fragments", [
    ({"match": "conv1*", "sparsity": 0.5}, ['rule 1 (match = "conv1*")', "matches no compressible weight"]),
    ({"op_type": "LSTM", "skip": True}, ['rule 1 (op_type = "LSTM")', "matches no compressible weight"]),
    ({"match": "fc.*", "op_type": "Conv", "skip": True}, ['(match = "fc.*", op_type = "Conv")']),
], ids=["glob", "op-type", "both"])
def test_a_rule_that_matches_no_weight_is_an_error_naming_the_weights(rule, fragments):
    with pytest.raises(UserError) as info:
        _plan({"prune": {"sparsity": 0.9}, "rules": [{"match": "emb", "skip": True}, rule]})
    message = str(info.value).replace("rule 2", "rule 1")
    assert "\n" not in message
    for fragment in [*fragments, "conv.weight (Conv), fc.weight (Gemm), emb (Gather)", "onnx-admm inspect"]:
        assert fragment in message, message


def test_a_rule_shadowed_by_earlier_rules_is_an_error():
    with pytest.raises(UserError, match=r"rule 3 \(op_type = \"Gemm\"\) matches only fc.weight \(Gemm\), which an "
                                        r"earlier rule \(2\) claims first"):
        _plan({"prune": {"sparsity": 0.9}, "rules": [{"match": "emb", "skip": True},
                                                     {"match": "fc.*", "sparsity": 0.5},
                                                     {"op_type": "Gemm", "sparsity": 0.8}]})


def test_the_unmatched_rule_error_lists_a_dozen_names_and_counts_the_rest():
    specs = [WeightSpec(f"layer{i}", f"layers.{i}.weight", "MatMul", 1) for i in range(40)]
    with pytest.raises(UserError) as info:
        make_plan(specs, CompressConfig.from_dict({"prune": {"sparsity": 0.5}, "rules": [{"match": "conv*"}]}))
    message = str(info.value)
    assert "layers.11.weight (MatMul) and 28 more" in message and "layers.12.weight" not in message
    assert '"layers.0.*"' in message  # a glob built from a real name


def test_the_readme_recipe_applies_to_the_digits_sample(digits_sample):
    """The README's recipe block names real weights of the bundled sample (its rules all take effect)."""
    import re
    import tomllib

    import onnx

    from onnx_admm.converters.importer import import_model
    from onnx_admm.api import weight_specs

    readme = (digits_sample.dir.parent.parent / "README.md").read_text()
    block = re.search(r"## Recipes.*?```toml\n(.*?)```", readme, re.S).group(1)
    config = CompressConfig.from_dict(tomllib.loads(block))
    assert config.rules  # the example shows rules
    plan = make_plan(weight_specs(import_model(onnx.load(str(digits_sample.model)))), config)
    by_label = {w.spec.label: w for w in plan.weights}
    assert by_label["0.weight"].sparsity[-1] == 0.5 and "7.weight" not in by_label


def test_coupled_filters_keep_the_same_channels_ranked_by_their_summed_energy():
    plan = _plan({"prune": {"sparsity": 0.5, "stages": 2, "structure": "filter"},
                  "rules": [{"match": "emb", "skip": True}]})
    plan = dataclasses.replace(plan, coupled=(("conv", "fc"),))
    conv, fc = torch.zeros(8, 4, 3, 3), torch.zeros(8, 16)
    # alone, conv would keep 0-3 and fc 4, 5 and two zero rows; the summed squared norms pick 2, 3, 4, 5
    conv[:4] = torch.tensor([1.0, 1.0, 2.0, 2.0]).view(4, 1, 1, 1)  # energy 36, 36, 144, 144
    fc[4:6] = 3.0  # energy 144, 144
    params = {"conv": conv, "fc": fc}
    first = sparsity_constraints(plan, params, 1, None)  # stage 2: half of the 8 filters
    supports = {n: c.support(params[n]) for n, c in first.items()}
    rows = {n: s.reshape(8, -1).any(dim=1).nonzero().flatten().tolist() for n, s in supports.items()}
    assert rows == {"conv": [2, 3, 4, 5], "fc": [2, 3, 4, 5]}
    assert torch.equal(first["conv"].project(conv)[2:6], conv[2:6]) and not first["conv"].project(conv)[:2].any()
    # nested: a later stage keeps a subset of the channels both kept
    second = sparsity_constraints(plan, params, 1, supports)
    for name, c in second.items():
        assert not (c.support(params[name]) & ~supports[name]).any()



def test_coupled_heads_keep_the_same_heads_ranked_by_their_summed_energy():
    """Separate projections of one attention block (converters.heads) lose the same heads: each ranks its
    units by its own blocks of rows (conv: 4 heads of 2 rows; fc: 4 heads of 1 row in each of 2 halves)."""
    plan = _plan({"prune": {"sparsity": 0.5, "structure": "filter"}, "rules": [{"match": "emb", "skip": True}]})
    layouts = {"conv": structures.Filters(1, 2), "fc": structures.Filters(2, 1)}
    plan = dataclasses.replace(plan, coupled=(("conv", "fc"),), weights=tuple(
        dataclasses.replace(w, structure=layouts[w.spec.name]) for w in plan.weights))
    conv, fc = torch.zeros(8, 4, 3, 3), torch.zeros(8, 16)
    # alone, conv would keep heads 0, 1 and fc heads 2, 3; summed (72, 18, 32, 288) they keep 0 and 3
    conv[0:2], conv[2:4] = 1.0, 0.5  # head energy 72, 18
    fc[[2, 6]], fc[[3, 7]] = 1.0, 3.0  # head energy 32, 288
    params = {"conv": conv, "fc": fc}
    constraints = sparsity_constraints(plan, params, 0, None)
    rows = {n: c.support(params[n]).reshape(8, -1).any(dim=1).nonzero().flatten().tolist()
            for n, c in constraints.items()}
    assert rows == {"conv": [0, 1, 6, 7], "fc": [0, 3, 4, 7]}


ENGINE = ("projections", "structured", "structures", "quant_base", "quantizers", "signs", "quant_choices", "allocation",
          "admm", "levels", "schedule", "plan", "train", "metrics", "sensitivity")


def test_the_engine_imports_nothing_of_the_product():
    """The engine is usable from a training loop of one's own: its modules import only each other (no recipe,
    no UserError, no ONNX side), besides torch, numpy and the standard library."""
    import ast
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "onnx_admm"
    for name in ENGINE:
        tree = ast.parse((folder / f"{name}.py").read_text())
        for node in ast.walk(tree):
            modules = ([node.module] if isinstance(node, ast.ImportFrom) and node.module
                       else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            for module in modules:
                top = module.split(".")[0]
                assert top not in ("converters", "onnx", "onnxruntime", "click"), f"{name} imports {module}"
                if top == "onnx_admm":
                    assert module.split(".")[1] in ENGINE, f"engine module {name} imports the product's {module}"


def test_recurrent_weights_lose_units_along_their_gate_rows_and_keep_a_scale_per_direction(tmp_path):
    # W / R [directions, gates * hidden, input]: a unit is a row of each gate block (axis 1), an input channel
    # a column (axis 2); quantization keeps one scale per direction (axis 0: a scale per gate row made the
    # files 5-13% larger at the same agreement).
    from exporter_models import export_torch, recurrent_classifier
    from onnx_admm.api import weight_specs
    from onnx_admm.converters.importer import import_model
    from onnx_admm.converters.modelio import load_model

    path = export_torch(recurrent_classifier("lstm"), torch.zeros(2, 7, 10), tmp_path / "lstm.onnx", "torchscript")
    specs = weight_specs(import_model(load_model(path)))
    axes = {(s.op_type, s.out_axis, s.in_axis, s.scale_axis) for s in specs}
    assert axes == {("LSTM", 1, 2, 0), ("Gemm", 0, 1, 0)}
    plan = make_plan(specs, CompressConfig.from_dict({"prune": {"sparsity": 0.5, "structure": "filter"},
                                                      "quantize": {"bits": 4}}))
    lstm = next(w for w in plan.weights if w.spec.op_type == "LSTM")
    assert lstm.scale_axis == 0 and lstm.quantizer(plan.n_stages - 1).axis == 0
    # a unit of a 12-wide layer under filter pruning: 4 gate rows of W (after legalize gives the blocks)
    constraint = dataclasses.replace(lstm.structure, outer=4).constraint((4, 48, 24), 0.5, (1, 2))
    assert (constraint.dim, constraint.outer, constraint.keep_groups) == (1, 4, 6)
    # input channels: whole columns of axis 2 (this raised TypeError before the weight had axes)
    w = torch.randn(2, 48, 24)
    support = structures.Channels().constraint(tuple(w.shape), 0.5, (1, 2)).support(w)
    columns = support.movedim(2, 0).reshape(24, -1)
    assert int(columns.all(dim=1).sum()) == 12 and not (columns.any(dim=1) & ~columns.all(dim=1)).any()


def test_a_rule_asking_n_m_of_a_recurrent_weight_is_an_error():
    # A recurrent weight has gate rows and input columns now (filter pruning removes its units), but no N:M
    # kernel reads it: a rule that names it with a pattern is a mistake, as it was before it had those axes.
    specs = [WeightSpec("w", "W", "LSTM", 1, 2, 0), WeightSpec("fc", "fc.weight", "Gemm", 0, 1)]
    with pytest.raises(UserError, match="'W' \\(LSTM\\): structure '2:4' applies to Conv, Gemm, MatMul weights"):
        make_plan(specs, CompressConfig.from_dict({"prune": {"sparsity": 0.5},
                                                   "rules": [{"match": "W", "structure": "2:4"}]}))
    plan = make_plan(specs, CompressConfig.from_dict({"prune": {"sparsity": 0.5, "structure": "2:4"}}))
    assert {w.spec.name for w in plan.weights} == {"w", "fc"}  # the run's own pattern: legalize leaves W alone
