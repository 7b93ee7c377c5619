"""Structured ADMM end to end: filters pruned through ADMM, removed from the graph, proven in onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnx_admm.converters.inputs import synthesize_inputs
from onnx_admm.converters.modelio import load_model
from onnx_admm.api import compress
from onnx_admm.check import within_tolerance
from onnx_admm.data import Dataset
from onnx_admm.recipe import CompressConfig
from onnx_admm.structured import rounded_keep


def _config(sparsity, structure="filter", admm=1, retrain=1, **extra):
    return CompressConfig.from_dict({"train": {"threads": 1, "batch_size": 32},
                                     "admm": {"epochs": admm, "retrain_epochs": retrain},
                                     "prune": {"sparsity": sparsity, "structure": structure}, **extra})


def _shapes(path):
    model = onnx.load(str(path))
    return {t.name: list(t.dims) for t in model.graph.initializer}


def _ort(path, feeds):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


def test_digits_filters_removed_and_shrunk_graph_matches_the_masked_model(digits_sample, tmp_path):
    result = compress(digits_sample.model, str(digits_sample.train), _config(0.5),
                      val_data=str(digits_sample.test))
    out = tmp_path / "f.onnx"
    result.save(out)
    shapes = _shapes(out)
    # 7.weight feeds the graph output: its filters stay; it loses the input columns of fc 64's removed units.
    assert shapes["0.weight"] == [8, 1, 3, 3] and shapes["2.weight"] == [16, 8, 3, 3]
    assert shapes["5.weight"] == [32, 16 * 16] and shapes["7.weight"] == [10, 32]
    assert result.report["left_alone"]["7.weight"] == (
        "the channels reach the graph output 'logits' (it keeps its filters, and its input channels still leave "
        "with the filters of '5.weight')")
    original, written = load_model(digits_sample.model), onnx.load(str(out))
    assert [i.SerializeToString() for i in written.graph.input] == [i.SerializeToString() for i in original.graph.input]
    assert [o.SerializeToString() for o in written.graph.output] == [o.SerializeToString() for o in original.graph.output]
    assert [n.name for n in written.graph.node] == [n.name for n in original.graph.node]
    # The masked dense model in torch (what was trained) computes what the shrunk graph computes.
    x = np.load(digits_sample.test)["input"][:16]
    ok, diff = within_tolerance(result.imported.run({"input": x}), _ort(out, {"input": x}))
    assert ok, diff
    structure = result.report["structure"]
    assert structure["macs"]["compressed"] < structure["macs"]["original"] / 3
    assert structure["kept_channels"] == {"0.weight": 8, "2.weight": 16, "5.weight": 32}
    assert set(structure["latency"]) == {"batch_1", "batch_64"}
    assert result.report["metrics"]["compressed_accuracy"] > 0.8


@pytest.mark.parametrize("key", ["mobilenet_block_torchscript", "resnet_block_torchscript", "lenet5_dynamo",
                                 "transformer_torchscript", "transformer_dynamo", "same_padding"])
def test_filter_pruning_without_labels_on_test_models(onnx_model_file, key, tmp_path):
    path = onnx_model_file(key)
    original = load_model(path)
    feeds = synthesize_inputs(original, batch=96, seed=0)
    data = Dataset(feeds, None, set(feeds))
    result = compress(path, data, _config(0.5, admm=1, retrain=1))
    out = tmp_path / "s.onnx"
    result.save(out)
    onnx.checker.check_model(str(out))
    kept = result.report["structure"]["kept_channels"]
    # Half of each layer's filters, moved to the nearest multiple of 8 (prune.round_to's default): LeNet-5's
    # 120 and 84 units keep 64 and 40.
    assert kept and all(n == rounded_keep(c // 2, c, 8)
                        for n, c in zip(kept.values(), result.report["structure"]["channels"].values()))
    for batch in (1, 5):
        x = synthesize_inputs(original, batch=batch, seed=batch)
        ok, diff = within_tolerance(result.imported.run(x), _ort(out, x))
        assert ok, (key, batch, diff)
    if key == "resnet_block_torchscript":
        # the stem and the block's second conv are coupled through the residual Add: pruned as one group
        assert kept == {"stem.weight": 4, "conv1.weight": 4}
        shapes = _shapes(out)
        assert shapes["stem.weight"] == [4, 3, 3, 3] and shapes["conv2.weight"] == [4, 4, 3, 3]
        assert shapes["fc.weight"] == [10, 4]
        assert set(result.report["left_alone"]) == {"fc.weight"}
    if key == "same_padding":
        # SAME-padded convs, an uneven AveragePool and a SAME ConvTranspose (whose weight [C_in, C_out, k, k]
        # loses rows to conv2's filters and columns to its own) keep graph and attributes, lose half their filters
        assert kept == {"conv1_w": 4, "conv2_w": 4, "up_w": 2}
        shapes = _shapes(out)
        assert (shapes["conv1_w"], shapes["conv2_w"], shapes["up_w"], shapes["up_b"], shapes["fc_w"]) == (
            [4, 3, 3, 3], [4, 4, 2, 2], [4, 2, 3, 3], [2], [10, 32])
        assert set(result.report["left_alone"]) == {"fc_w"}
        assert [(n.op_type, list(n.attribute)) for n in onnx.load(str(out)).graph.node] == [
            (n.op_type, list(n.attribute)) for n in original.graph.node]
    if key.startswith("transformer"):
        # 2 of the 4 heads leave the fused QKV projection and out_proj; 32 of the FFN's 64 units leave linear1/2
        assert sorted(kept.values()) == [2, 32]
        shapes = _shapes(out)
        assert shapes["encoder.self_attn.out_proj.weight"] == [32, 16] and shapes["encoder.self_attn.in_proj_bias"] == [48]
        assert [n.name for n in onnx.load(str(out)).graph.node] == [n.name for n in original.graph.node]


def test_a_coupled_group_is_left_alone_whole_when_the_recipe_spares_a_member(onnx_model_file):
    path = onnx_model_file("resnet_block_torchscript")
    feeds = synthesize_inputs(load_model(path), batch=64, seed=0)
    config = _config(0.5, rules=[{"match": "conv2.weight", "skip": True}])
    result = compress(path, Dataset(feeds, None, set(feeds)), config)
    reason = result.report["left_alone"]["stem.weight"]
    assert "coupled with conv2.weight" in reason and "pruned whole or not at all" in reason
    assert result.report["structure"]["kept_channels"] == {"conv1.weight": 4}


def test_round_to_keeps_a_multiple_of_filters_per_layer(digits_sample):
    # 40% of 16 / 32 / 64 filters leaves 10 / 19 / 38; with round_to 8 each layer keeps the nearest
    # multiple of 8 (onnxruntime's blocked kernels run those faster): 8 / 16 / 40, the default.
    kept = {}
    for multiple in (1, 8, None):
        rounding = {} if multiple is None else {"round_to": multiple}
        config = CompressConfig.from_dict({"train": {"threads": 1, "batch_size": 32},
                                           "admm": {"epochs": 1, "retrain_epochs": 1},
                                           "prune": {"sparsity": 0.4, "structure": "filter", **rounding}})
        result = compress(digits_sample.model, str(digits_sample.train), config)
        kept[multiple] = result.report["structure"]["kept_channels"]
    assert kept[1] == {"0.weight": 10, "2.weight": 19, "5.weight": 38}
    assert kept[8] == kept[None] == {"0.weight": 8, "2.weight": 16, "5.weight": 40}
