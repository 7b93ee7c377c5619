"""The test models themselves: valid, runnable at any batch, faithful to torch, and shaped as intended.

If these fail, every other test's fixtures are suspect, so they check the properties other tests rely
on: external data in dynamo files, BatchNormalization kept with distinct tensors, Constant-node and
shared weights in the hand-written graphs, and the digits sample's accuracy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from models import DigitsSample, OnnxFile, expected_weight_names, has_external_data

BATCH = 3


def _run(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def test_model_is_valid_and_matches_torch(any_onnx_model: OnnxFile) -> None:
    spec, path = any_onnx_model.spec, any_onnx_model.path
    # By path, so the checker reads the external data of dynamo files too.
    onnx.checker.check_model(str(path), full_check=True)
    x = spec.example_input(BATCH, seed=1)
    outputs = _run(path, {"input": x})
    assert [o.shape[0] for o in outputs] == [BATCH] * len(spec.output_names)
    if spec.factory is not None:
        with torch.no_grad():
            expected = spec.build()(torch.from_numpy(x))
        expected = expected if isinstance(expected, tuple) else (expected,)
        for got, want in zip(outputs, expected, strict=True):
            np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-5)


def test_oracle_finds_what_a_user_expects(any_onnx_model: OnnxFile) -> None:
    model = onnx.load(str(any_onnx_model.path), load_external_data=False)
    assert len(expected_weight_names(model)) == len(any_onnx_model.spec.weights)


def test_external_data_only_in_dynamo_files(any_onnx_model: OnnxFile) -> None:
    model = onnx.load(str(any_onnx_model.path), load_external_data=False)
    dynamo = any_onnx_model.exporter == "dynamo"
    assert has_external_data(model) == dynamo
    assert any_onnx_model.path.with_name(any_onnx_model.path.name + ".data").exists() == dynamo
    if not dynamo:
        # onnx2torch reads opset 17 as is; the dynamo files (opset 20) exercise the down-conversion.
        assert model.opset_import[0].version == 17


def test_lenet5_weights_are_the_torch_parameters(
    lenet5_torchscript_onnx: Path, lenet5_dynamo_onnx: Path
) -> None:
    for path in (lenet5_torchscript_onnx, lenet5_dynamo_onnx):
        names = expected_weight_names(onnx.load(str(path)))
        assert names == ["conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"]


def test_resnet_block_keeps_batchnorm_with_distinct_tensors(resnet_block_torchscript_onnx: Path) -> None:
    model = onnx.load(str(resnet_block_torchscript_onnx))
    batchnorms = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    assert len(batchnorms) == 3
    params = [name for n in batchnorms for name in n.input[1:]]
    # Randomised statistics: the exporter had no equal tensors to merge.
    assert len(set(params)) == len(params) == 12
    assert set(params) <= {t.name for t in model.graph.initializer}


def test_constant_weights_has_no_initializers(constant_weights_onnx: Path) -> None:
    model = onnx.load(str(constant_weights_onnx))
    assert not model.graph.initializer
    constants = {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    assert set(expected_weight_names(model)) <= constants


def test_shared_gemm_weight_reaches_both_gemms_through_identity(shared_gemm_onnx: Path) -> None:
    model = onnx.load(str(shared_gemm_onnx))
    identities = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Identity"}
    gemm_weights = [identities[n.input[1]] for n in model.graph.node if n.op_type == "Gemm"]
    assert gemm_weights == ["shared_w", "shared_w"]
    assert expected_weight_names(model) == ["shared_w"]


def test_shared_matmul_weight_is_used_twice(shared_matmul_onnx: Path) -> None:
    model = onnx.load(str(shared_matmul_onnx))
    right_operands = [n.input[1] for n in model.graph.node if n.op_type == "MatMul"]
    assert right_operands == ["w", "w", "head_w"]
    assert not any(n.op_type == "Gemm" for n in model.graph.node)


def test_two_outputs_second_is_softmax_of_first(two_outputs_torchscript_onnx: Path) -> None:
    model = onnx.load(str(two_outputs_torchscript_onnx))
    producers = {o: n for n in model.graph.node for o in n.output}
    logits, probs = (o.name for o in model.graph.output)
    assert producers[probs].op_type == "Softmax" and producers[probs].input[0] == logits


def test_digits_sample(digits_sample: DigitsSample) -> None:
    sizes = [p.stat().st_size for p in (digits_sample.model, digits_sample.train, digits_sample.test)]
    assert sum(sizes) < 400_000
    test = np.load(digits_sample.test)
    assert set(test.files) == {"input", "labels"}
    assert test["input"].dtype == np.float32 and test["input"].shape[1:] == (1, 8, 8)
    assert test["labels"].dtype == np.int64
    (logits,) = _run(digits_sample.model, {"input": test["input"]})
    assert (logits.argmax(axis=1) == test["labels"]).mean() >= 0.95


def test_dynamo_file_runs_at_other_batches(lenet5_dynamo_onnx: Path) -> None:
    # The dynamo exporter bakes the example batch into Reshape shapes unless the axis is declared.
    for batch in (1, 5):
        (out,) = _run(lenet5_dynamo_onnx, {"input": np.zeros((batch, 1, 28, 28), np.float32)})
        assert out.shape == (batch, 10)
