"""ADMM quantization end to end on the digits sample: levels exact, export in DequantizeLinear/codebook,
onnxruntime equal to the torch module holding the projected float weights, re-import and re-compress."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from onnx_admm.converters.dequantize import decoded_view
from onnx_admm.converters.graphinfo import constant_sources, tensor_value
from onnx_admm.converters.modelio import load_model
from onnx_admm.api import compress
from onnx_admm.check import check, within_tolerance
from onnx_admm.cli import main
from onnx_admm.recipe import CompressConfig

WEIGHTS = ("0.weight", "2.weight", "5.weight", "7.weight")


def _config(quantize, prune=None, admm=1, retrain=1):
    tables = {"quantize": quantize, "prune": prune}
    return CompressConfig.from_dict({"train": {"threads": 1}, "admm": {"epochs": admm, "retrain_epochs": retrain},
                                     **{k: v for k, v in tables.items() if v}})


def _weights(path):
    """The weight values a runtime sees (decoders evaluated), by name."""
    view, _ = decoded_view(load_model(path))
    sources = constant_sources(view)
    return {n: tensor_value(view, sources[n]) for n in WEIGHTS}


def _ort(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})


@pytest.fixture
def rates(monkeypatch):
    """The learning rate of every optimizer the run makes, in order."""
    from onnx_admm.pipeline import stages

    seen, make = [], stages.make_optimizer

    def recording(params, kind, lr, *rest):
        seen.append(lr)
        return make(params, kind, lr, *rest)

    monkeypatch.setattr(stages, "make_optimizer", recording)
    return seen


@pytest.mark.parametrize("quantize, ops, max_levels", [
    ({"bits": 4, "per_channel": False}, {"DequantizeLinear"}, 16),  # int4 holds -8..7
    ({"bits": 4}, {"DequantizeLinear"}, None),  # k-bit and binary levels default to one scale per channel
    ({"bits": 1}, {"DequantizeLinear"}, None),
    ({"bits": 1, "per_channel": False}, {"DequantizeLinear"}, 2),
    ({"ternary": True}, {"DequantizeLinear"}, 3),  # ternary levels to one per tensor
    ({"bits": 1, "per_channel": True}, {"DequantizeLinear"}, None),
    ({"ternary": True, "per_channel": True}, {"DequantizeLinear"}, None),
    ({"bits": 1, "per_channel": True, "refit": 0, "clip": 0}, {"DequantizeLinear"}, None),
    ({"clusters": 16}, {"Cast", "Gather"}, 16),
])
def test_quantized_export_matches_torch_and_reimports(digits_sample, tmp_path, quantize, ops, max_levels,
                                                      rates, caplog):
    caplog.set_level("INFO", logger="onnx_admm.api")
    result = compress(digits_sample.model, str(digits_sample.train), _config(quantize),
                      val_data=str(digits_sample.test))
    # No train.lr in the recipe: binary weights train at 0.03, levels alone (no pruning) at 0.01.
    expected = 0.03 if quantize.get("bits") == 1 else 0.01
    assert rates and set(rates) == {expected}
    assert result.report["config"]["train"]["lr"] == expected
    source = "the binary default, recipe.BINARY_LR" if expected == 0.03 else "the default, recipe.DEFAULT_LR"
    assert f"training at lr {expected:g} ({source})" in caplog.text  # said in the log
    out = tmp_path / "q.onnx"
    result.save(out)
    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    assert ops <= {n.op_type for n in model.graph.node}
    weights = _weights(out)
    per_channel = quantize.get("per_channel", not quantize.get("ternary") and quantize.get("clusters") is None)
    for name, value in weights.items():
        levels = np.unique(value)
        if max_levels is not None:
            assert levels.size <= max_levels, (name, levels.size)
        # One level set per tensor, or per output channel (axis 0 of Conv and Gemm(transB=1) weights).
        for channel in (value.reshape(value.shape[0], -1) if per_channel else [value]):
            levels = np.unique(channel)
            if quantize.get("bits") == 1:  # within {-a_c, +a_c}: no zero, one magnitude
                assert 0 not in levels and np.unique(np.abs(levels)).size == 1, (name, levels)
            if quantize.get("ternary"):  # within {-a_c, 0, +a_c}
                assert np.unique(np.abs(levels[levels != 0])).size == 1, (name, levels)
        if not per_channel and (quantize.get("bits") == 1 or quantize.get("ternary")):
            assert np.unique(value).size == (2 if quantize.get("bits") == 1 else 3), name  # every level used
        if per_channel and quantize.get("clusters") is None:
            assert np.unique(np.abs(value).max(axis=tuple(range(1, value.ndim)))).size > 1  # scales differ
    # The reference is the torch module holding the projected float weights, not the exported integers.
    x = np.load(digits_sample.test)["input"][:32]
    ok, diff = within_tolerance(result.imported.run({"input": x}), _ort(out, x))
    assert ok, diff
    for layer in result.report["layers"]:
        assert layer["levels"] == np.unique(weights[layer["name"]]).size
        assert layer["per_channel"] is per_channel  # the granularity the run used, in the report
    assert check(out).passed  # a compressed model imports again and writes back faithfully


def test_joint_pruning_and_4bit_keeps_zeros_and_is_small(digits_sample, tmp_path, rates):
    result = compress(digits_sample.model, str(digits_sample.train),
                      _config({"bits": 4, "per_channel": True}, {"sparsity": 0.9}, admm=2, retrain=1),
                      val_data=str(digits_sample.test))
    out = tmp_path / "pq.onnx"
    result.save(out)
    weights = _weights(out)
    nonzero = sum(int(np.count_nonzero(w)) for w in weights.values())
    assert nonzero <= round(0.1 * 38160)  # the pruning target holds; 4-bit rounding may add zeros
    for w in weights.values():  # per output channel: at most 15 nonzero 4-bit levels (q in -8..7, q != 0)
        assert all(np.unique(row[row != 0]).size <= 15 for row in w.reshape(w.shape[0], -1))
    report = result.report
    assert report["compressed"]["bytes_gzip"] * 10 < report["original"]["bytes_gzip"]
    assert report["storage_bits"]["compressed"] * 12 < report["storage_bits"]["original"]  # measured 16.8x
    assert report["metrics"]["compressed_accuracy"] > 0.85
    assert rates and set(rates) == {0.02} and report["config"]["train"]["lr"] == 0.02  # pruning: recipe.PRUNE_LR


def test_pruning_without_labels_trains_at_the_default_rate(digits_sample, tmp_path, rates, caplog):
    # Distilling the original on a few representative inputs, 0.02 fits them at the cost of the rest
    # (recipe.CompressConfig.lr_for): weight-by-weight pruning without labels keeps 0.01.
    caplog.set_level("INFO", logger="onnx_admm.api")
    np.savez(tmp_path / "unlabelled.npz", input=np.load(digits_sample.train)["input"][:256])
    result = compress(digits_sample.model, str(tmp_path / "unlabelled.npz"), _config(None, {"sparsity": 0.5}))
    assert rates and set(rates) == {0.01} and result.report["config"]["train"]["lr"] == 0.01
    assert "training at lr 0.01 (the label-free pruning default, recipe.DEFAULT_LR)" in caplog.text


def test_binary_without_labels_on_few_inputs_takes_more_steps(digits_sample, tmp_path, rates, caplog):
    # 128 label-free inputs at the default batch 64 gave binary weights 2 steps an epoch; such a run now trains at
    # batch 8 and half BINARY_LR (recipe.small_data_schedule): a Keras CTC reader 0.42 -> 0.93 of its sequences.
    caplog.set_level("INFO", logger="onnx_admm.api")
    np.savez(tmp_path / "few.npz", input=np.load(digits_sample.train)["input"][:128])
    result = compress(digits_sample.model, str(tmp_path / "few.npz"), _config({"bits": 1}))
    n = 103  # 128 less the held-out and selection splits (25)
    lr = result.report["config"]["train"]["lr"]
    assert lr == pytest.approx(0.015) and rates and set(rates) == {lr}
    assert result.report["batch"]["train_batch"] == 8 and result.report["config"]["train"]["batch_size"] == 8
    assert (f"binary weights without labels on {n} training inputs: batch 8 for {n // 8} steps an epoch"
            in caplog.text), caplog.text


def test_filter_pruning_trains_at_the_default_rate(digits_sample, rates):
    # whole filters keep 0.01 (a residual CNN broke in two of three runs at 0.02), single weights train at 0.02
    result = compress(digits_sample.model, str(digits_sample.train),
                      _config(None, {"sparsity": 0.5, "structure": "filter"}, admm=1, retrain=1))
    assert rates and set(rates) == {0.01} and result.report["config"]["train"]["lr"] == 0.01


def test_progressive_bits_and_cli_flags(digits_sample, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[train]\nthreads = 1\n[admm]\nepochs = 1\nretrain_epochs = 1\n[quantize]\nbits = [8, 4, 2]\n')
    out, report = tmp_path / "b.onnx", tmp_path / "b.json"
    result = CliRunner().invoke(main, ["compress", str(digits_sample.model), "--data", str(digits_sample.train),
                                       "--val-data", str(digits_sample.test), "--recipe", str(recipe), "-o", str(out),
                                       "--report", str(report), "-q"])
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert len(data["stages"]) == 3
    assert {layer["quantization"] for layer in data["layers"]} == {"2-bit"}
    # int2 holds -2..1: at most 4 levels in each output channel (k-bit levels default to per-channel scales)
    assert all(np.unique(c).size <= 4 for w in _weights(out).values() for c in w.reshape(w.shape[0], -1))
    bad = CliRunner().invoke(main, ["compress", str(digits_sample.model), "--data", str(digits_sample.train),
                                    "--bits", "4", "--ternary", "-o", str(tmp_path / "x.onnx")])
    assert bad.exit_code == 2 and "choose one of" in bad.output
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize("quantize, per_channel_levels", [({"bits": 4}, 16), ({"bits": 1}, 2), ({"ternary": True}, 3)])
def test_conv_transpose_weights_get_one_scale_per_output_channel(tmp_path, quantize, per_channel_levels):
    """A ConvTranspose weight is [in, out / groups, kH, kW]: its output channels are axis 1, so per-channel
    levels, the stored scales and DequantizeLinear's axis follow axis 1, not the input channels."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(6, 3, 2, 2)).astype(np.float32)
    w *= np.array([1.0, 10.0, 100.0], np.float32)[None, :, None, None]  # output channels of very different ranges
    model = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("ConvTranspose", ["x", "W"], ["y"], strides=[2, 2])], "ct",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 6, 4, 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 3, 8, 8])],
        [onnx.numpy_helper.from_array(w, "W")]), opset_imports=[onnx.helper.make_opsetid("", 17)])
    x = rng.normal(size=(64, 6, 4, 4)).astype(np.float32)
    config = CompressConfig.from_dict({"train": {"threads": 1, "batch_size": 32},
                                       "admm": {"epochs": 0, "retrain_epochs": 0},
                                       "quantize": {**quantize, "per_channel": True}})
    result = compress(model, {"x": x}, config, metric_floor=0)
    written = result.model()
    dq = next(n for n in written.graph.node if n.op_type == "DequantizeLinear")
    assert onnx.helper.get_attribute_value(next(a for a in dq.attribute if a.name == "axis")) == 1
    scale = next(onnx.numpy_helper.to_array(i) for i in written.graph.initializer if i.name == dq.input[1])
    assert scale.shape == (3,)
    # Each output channel sits on its own levels (4-bit grid, {-a_c, +a_c}, {-a_c, 0, +a_c}), scales 10x apart.
    value = tensor_value(*(lambda v: (v, constant_sources(v)["W"]))(decoded_view(written)[0]))
    for c in range(3):
        assert np.unique(value[:, c]).size <= per_channel_levels
        assert np.unique(np.abs(value[:, c][value[:, c] != 0])).size <= (8 if per_channel_levels == 16 else 1)  # int4: |q| in 1..8
    assert scale[2] / scale[0] > 20
