"""converters.heads: attention heads and FFN units leave exported transformer encoders, proven in onnxruntime."""

from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper, numpy_helper

from onnx_admm.api import compress
from onnx_admm.check import within_tolerance
from onnx_admm.converters.graphinfo import constant_sources, tensor_value
from onnx_admm.converters.groups import channel_groups
from onnx_admm.converters.inputs import synthesize_inputs
from onnx_admm.converters.modelio import load_model
from onnx_admm.converters.shrink import count_macs, shrink
from onnx_admm.data import Dataset
from onnx_admm.recipe import CompressConfig
from exporter_models import export_torch
from models import TransformerClassifier

HEADS, HEAD_DIM, FFN = 4, 8, 64


def _run(model: onnx.ModelProto, x: np.ndarray | dict[str, np.ndarray]) -> np.ndarray:
    """The first output of ``model`` fed ``x`` (the input ``input``, or every input by name)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, x if isinstance(x, dict) else {"input": x})[0]


def _masked(model: onnx.ModelProto, zero: dict[str, tuple[int, np.ndarray]]) -> onnx.ModelProto:
    """A copy with the given (axis, indices) of initializers set to zero: the dense model that the shrunk
    one must equal."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for tensor in out.graph.initializer:
        if tensor.name in zero:
            axis, index = zero[tensor.name]
            value = numpy_helper.to_array(tensor).copy()
            cut = [slice(None)] * value.ndim
            cut[axis] = index
            value[tuple(cut)] = 0
            tensor.CopyFrom(numpy_helper.from_array(value, tensor.name))
    return out


def _shape_values(model: onnx.ModelProto) -> list[tuple[int, ...]]:
    """The constant shape of every Reshape that has one, sorted."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return sorted(tuple(inits[n.input[1]].tolist()) for n in model.graph.node
                  if n.op_type == "Reshape" and n.input[1] in inits)


def _io(model: onnx.ModelProto) -> list[str]:
    return [str(v) for v in list(model.graph.input) + list(model.graph.output)]


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_heads_and_ffn_units_leave_the_graph_and_match_the_masked_model(exporter, onnx_model_file):
    model = onnx.load(str(onnx_model_file(f"transformer_{exporter}")))
    groups = {g.unit: g for g in channel_groups(model) if g.prunable}
    heads, ffn = groups["head"], groups["channel"]
    assert (heads.n_channels, ffn.n_channels) == (HEADS, FFN)
    # The fused [E, 3E] in_proj: each head owns head_dim columns of each of Q, K, V; out_proj its columns.
    pieces = {(s.role, s.axis, s.inner, s.outer) for s in heads.slices}
    assert pieces == {("weight", 1, HEAD_DIM, 3), ("constant", 0, HEAD_DIM, 3), ("consumer", 1, HEAD_DIM, 1)}
    out_proj = next(s.tensor for s in heads.consumers)
    assert out_proj == "encoder.self_attn.out_proj.weight"

    removed_heads, removed_units = np.array([1, 3]), np.arange(0, FFN, 2)
    keep_heads = np.setdiff1d(np.arange(HEADS), removed_heads)
    result = shrink(model, {heads.name: keep_heads, ffn.name: np.setdiff1d(np.arange(FFN), removed_units)})
    shrunk = result.model
    columns = (removed_heads[:, None] * HEAD_DIM + np.arange(HEAD_DIM)).reshape(-1)
    # out_proj is a Gemm with transB=1 ([E_out, E]); linear2 a MatMul weight [FFN, E].
    masked = _masked(model, {out_proj: (1, columns), ffn.consumers[0].tensor: (0, removed_units)})
    for batch in (1, 5):
        x = np.random.default_rng(batch).standard_normal((batch, 6, 32)).astype(np.float32)
        np.testing.assert_allclose(_run(shrunk, x), _run(masked, x), atol=1e-4, rtol=0)
    assert _io(shrunk) == _io(model)  # names, types and the symbolic batch dim
    weights = {t.name: list(t.dims) for t in shrunk.graph.initializer}
    assert weights[heads.name] == [32, 3 * 2 * HEAD_DIM] and weights[out_proj] == [32, 2 * HEAD_DIM]
    assert weights[ffn.name] == [32, FFN // 2]
    # The head count (4 -> 2) and the attention width (32 -> 16) in every shape that held them; the
    # residual stream ([-1, 6, 32] after out_proj) keeps d_model.
    assert _shape_values(shrunk) == sorted({
        "torchscript": [(6, -1, 3, 16)] + [(6, -1, 8)] * 3 + [(-1, 2, 6, 8)] * 3 + [(-1, 16)],
        "dynamo": [(6, -1, 3, 16)] + [(6, -1, 8)] * 3 + [(-1, 2, 6, 8)] * 3 + [(-1, 6, 8), (-1, 2, 8, 6), (-1, 16),
                                                                             (6, -1, 32)],
    }[exporter])
    assert len(_shape_values(model)) < len(_shape_values(shrunk))  # computed shapes were frozen


def test_a_head_count_read_at_run_time_fails_the_proof(onnx_model_file):
    """The walk lets a computed scalar through (the 1/sqrt(head_dim) scale); when it is made from the head
    count itself, removing a head changes every head's output, and only the onnxruntime proof sees it."""
    model = onnx.load(str(onnx_model_file("transformer_dynamo")))
    nodes = list(model.graph.node)
    k = next(i for i, n in enumerate(nodes) if n.op_type == "Mul" and n.input[0] == "view_4")
    model.graph.initializer.append(numpy_helper.from_array(np.array(1, dtype=np.int64), "heads_axis"))
    made = [
        helper.make_node("Shape", ["view_4"], ["q_shape"], name="q_shape"),
        helper.make_node("Gather", ["q_shape", "heads_axis"], ["q_heads"], name="q_heads"),
        helper.make_node("Cast", ["q_heads"], ["q_heads_f"], name="q_heads_f", to=onnx.TensorProto.FLOAT),
        helper.make_node("Reciprocal", ["q_heads_f"], ["q_scale"], name="q_scale"),
    ]
    nodes[k].input[1] = "q_scale"
    del model.graph.node[:]
    model.graph.node.extend(nodes[:k] + made + nodes[k:])
    onnx.checker.check_model(model)
    groups = channel_groups(model)
    projection = next(g for g in groups if g.name == "val_2")
    assert not projection.prunable
    assert projection.reason == ("Reshape node_Reshape_101 splits or reorders the channel axis; as attention heads: "
                                 "removing a head changes what the graph computes beyond that head (a shape or count "
                                 "the walk does not see)")


def test_dynamo_encoder_stack_with_dynamic_batch(tmp_path):
    """Two layers of nn.TransformerEncoder: each layer's heads and FFN units are their own groups."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    module = torch.nn.Sequential(torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)).eval()
    with torch.no_grad():  # the layers are copies of one: equal tensors would be merged by the exporter
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        path = export_torch(module, torch.randn(2, 5, 16), tmp_path / "stack.onnx", "dynamo")
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    model = onnx.load(str(path))
    groups = [g for g in channel_groups(model) if g.prunable]
    assert sorted((g.unit, g.n_channels) for g in groups) == [("channel", 32)] * 2 + [("head", 2)] * 2
    shrunk = shrink(model, {g.name: [0] for g in groups}).model
    x = np.random.default_rng(0).standard_normal((3, 5, 16)).astype(np.float32)
    assert _run(shrunk, x).shape == (3, 5, 16)
    assert _io(shrunk) == _io(model)


# -- Q, K and V from separate projections ---------------------------------------------------------------


class SeparateQKVEncoder(torch.nn.Module):
    """A hand-written pre-norm encoder block (ViT/BERT style): Q, K and V made as ``kv`` says, reshaped to
    heads, softmax(q k^T * scale) v, the heads merged back, an out projection, an FFN, a classifier on
    the token mean. ``kv``: ``separate`` q, k, v Linear layers; q and a fused [E, 2E] kv reshaped to
    [N, L, 2, H, head_dim] and indexed (``fused``) or split by ``chunk(2)`` (``chunk``; ``chunk_first``: kv
    made before q); one fused
    [E, 3E] qkv reshaped to [N, L, 3, H, head_dim], permuted and unbound (``qkv_unbind``, timm's ViT),
    split by ``chunk(3)`` (``qkv_chunk``) or ``split([E, E, E])`` (``qkv_split``), or sliced at 8:40, 40:72 and
    64:96 (``qkv_shifted``: not whole heads, K and V overlap). ``kv_heads=1`` is multi-query attention: K and V hold one head
    that every Q head reads; ``sdpa`` calls F.scaled_dot_product_attention instead."""

    def __init__(self, kv: str = "separate", kv_heads: int = HEADS, sdpa: bool = False) -> None:
        super().__init__()
        width, self.kv, self.kv_heads, self.sdpa = 32, kv, kv_heads, sdpa
        self.norm1, self.norm2 = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
        if kv.startswith("qkv"):
            self.qkv = torch.nn.Linear(width, 3 * width)
        else:
            self.q = torch.nn.Linear(width, width)
        if kv == "separate":
            self.k = torch.nn.Linear(width, kv_heads * HEAD_DIM)
            self.v = torch.nn.Linear(width, kv_heads * HEAD_DIM)
        elif kv in ("fused", "chunk", "chunk_first"):
            self.kv_proj = torch.nn.Linear(width, 2 * width)
        self.out = torch.nn.Linear(width, width)
        self.fc1, self.fc2 = torch.nn.Linear(width, FFN), torch.nn.Linear(FFN, width)
        self.cls = torch.nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, width = x.shape
        h = self.norm1(x)

        def split_heads(t: torch.Tensor, count: int = HEADS) -> torch.Tensor:
            return t.reshape(n, length, count, HEAD_DIM).transpose(1, 2)

        if self.kv == "qkv_unbind":
            q, k, v = self.qkv(h).reshape(n, length, 3, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4).unbind(0)
        elif self.kv == "qkv_chunk":
            q, k, v = (split_heads(t) for t in self.qkv(h).chunk(3, dim=-1))
        elif self.kv == "qkv_split":
            q, k, v = (split_heads(t) for t in self.qkv(h).split([width] * 3, dim=-1))
        elif self.kv == "qkv_shifted":
            qkv = self.qkv(h)
            q, k, v = (split_heads(qkv[..., a:a + width]) for a in (8, 40, 64))
        elif self.kv == "chunk_first":
            k, v = (split_heads(t) for t in self.kv_proj(h).chunk(2, dim=-1))
            q = split_heads(self.q(h))
        else:
            q = split_heads(self.q(h))
        if self.kv == "separate":
            k, v = split_heads(self.k(h), self.kv_heads), split_heads(self.v(h), self.kv_heads)
        elif self.kv == "chunk":
            k, v = (split_heads(t) for t in self.kv_proj(h).chunk(2, dim=-1))
        elif self.kv == "fused":
            kv = self.kv_proj(h).reshape(n, length, 2, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4)
            k, v = kv[0], kv[1]
        if self.sdpa:
            heads = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        else:
            heads = torch.softmax(q @ k.transpose(-2, -1) * HEAD_DIM ** -0.5, dim=-1) @ v
        x = x + self.out(heads.transpose(1, 2).reshape(n, length, width))
        x = x + self.fc2(torch.relu(self.fc1(self.norm2(x))))
        return self.cls(x.mean(dim=1))


@pytest.fixture(scope="module")
def separate_qkv(tmp_path_factory):
    """callable (exporter, kv, kv_heads, sdpa) -> the exported file, exported once per module."""
    folder, done = tmp_path_factory.mktemp("separate_qkv"), {}

    def get(exporter: str, kv: str = "separate", kv_heads: int = HEADS, sdpa: bool = False):
        key = (exporter, kv, kv_heads, sdpa)
        if key not in done:
            torch.manual_seed(0)
            module = SeparateQKVEncoder(kv, kv_heads, sdpa).eval()
            with torch.no_grad():  # norm1 and norm2 start equal: the exporters would merge them
                for p in module.parameters():
                    p.add_(0.1 * torch.randn_like(p))
            done[key] = export_torch(module, torch.randn(2, 6, 32), folder / f"{exporter}_{kv}_{kv_heads}_{sdpa}.onnx",
                                     exporter)
        return done[key]

    return get


def _rows(heads: np.ndarray) -> np.ndarray:
    """The features of ``heads`` along an axis of HEADS * HEAD_DIM."""
    return (heads[:, None] * HEAD_DIM + np.arange(HEAD_DIM)).reshape(-1)


def _without_heads_1_and_3(model: onnx.ModelProto, heads, sizes=((1, 6), (5, 6))) -> onnx.ModelProto:
    """``model`` shrunk without heads 1 and 3, checked to equal the model whose out projection reads
    nothing of them (within 1e-5, at each (batch, sequence length) of ``sizes``) and to keep the graph's
    inputs and outputs."""
    removed = np.array([1, 3])
    shrunk = shrink(model, {heads.name: np.setdiff1d(np.arange(HEADS), removed)}).model
    out_proj = heads.consumers[0]
    masked = _masked(model, {out_proj.tensor: (out_proj.axis, _rows(removed))})
    for batch, length in sizes:
        x = np.random.default_rng(batch).standard_normal((batch, length, 32)).astype(np.float32)
        np.testing.assert_allclose(_run(shrunk, x), _run(masked, x), atol=1e-5, rtol=0)
    assert _io(shrunk) == _io(model)
    return shrunk


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_separate_qkv_heads_leave_the_graph_and_match_the_masked_model(exporter, separate_qkv):
    model = onnx.load(str(separate_qkv(exporter)))
    groups = {g.unit: g for g in channel_groups(model) if g.prunable}
    heads = groups["head"]
    assert heads.n_channels == HEADS and len(heads.members) == 3
    assert heads.member_nodes == {"torchscript": ("/q/MatMul", "/k/MatMul", "/v/MatMul"),
                                  "dynamo": ("node_MatMul_2", "node_MatMul_10", "node_MatMul_18")}[exporter]
    # Each projection: its own head_dim columns per head (MatMul weight [32, 32]) and bias; out's rows.
    pieces = sorted((s.tensor, s.role, s.axis, s.inner, s.outer) for s in heads.slices)
    assert pieces == sorted([(m, "weight", 1, HEAD_DIM, 1) for m in heads.members]
                            + [(f"{p}.bias", "constant", 0, HEAD_DIM, 1) for p in "qkv"]
                            + [(heads.consumers[0].tensor, "consumer", 0, HEAD_DIM, 1)])

    shrunk = _without_heads_1_and_3(model, heads)
    weights = {t.name: list(t.dims) for t in shrunk.graph.initializer}
    assert [weights[m] for m in heads.members] == [[32, 2 * HEAD_DIM]] * 3
    assert [weights[f"{p}.bias"] for p in "qkv"] == [[2 * HEAD_DIM]] * 3
    assert weights[heads.consumers[0].tensor] == [2 * HEAD_DIM, 32]
    # Q, K and V split into 2 heads; the heads merged back into 16 features (32 before).
    assert [v for v in _shape_values(shrunk) if v[-1] in (HEAD_DIM, 2 * HEAD_DIM)] == [(-1, 6, 2, 8)] * 3 + [(-1, 6, 16)]
    before, after = count_macs(model)["macs"], count_macs(shrunk)["macs"]
    assert (before, after) == (51776, 38336)  # q, k, v, out and both attention MatMuls at half width


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_a_fused_kv_projection_indexed_by_k_and_v_joins_the_heads_of_q(exporter, separate_qkv):
    model = onnx.load(str(separate_qkv(exporter, kv="fused")))
    heads = next(g for g in channel_groups(model) if g.prunable and g.unit == "head")
    assert len(heads.members) == 2 and heads.n_channels == HEADS
    # kv [32, 64]: a head owns head_dim columns of each of the K and V halves.
    assert sorted((s.axis, s.inner, s.outer) for s in heads.outputs if s.role == "weight") == [
        (1, HEAD_DIM, 1), (1, HEAD_DIM, 2)]
    removed = np.array([0])
    shrunk = shrink(model, {heads.name: [1, 2, 3]}).model
    masked = _masked(model, {heads.consumers[0].tensor: (0, _rows(removed))})
    x = np.random.default_rng(0).standard_normal((3, 6, 32)).astype(np.float32)
    np.testing.assert_allclose(_run(shrunk, x), _run(masked, x), atol=1e-5, rtol=0)
    assert _io(shrunk) == _io(model)
    assert sorted(list(t.dims) for t in shrunk.graph.initializer if list(t.dims) in ([32, 24], [32, 48])) == [
        [32, 24], [32, 48]]


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_separate_qkv_heads_through_scaled_dot_product_attention(exporter, separate_qkv):
    model = onnx.load(str(separate_qkv(exporter, sdpa=True)))
    heads = next(g for g in channel_groups(model) if g.prunable and g.unit == "head")
    assert heads.n_channels == HEADS and len(heads.members) == 3
    shrunk = shrink(model, {heads.name: [0, 2]}).model
    masked = _masked(model, {heads.consumers[0].tensor: (0, _rows(np.array([1, 3])))})
    x = np.random.default_rng(0).standard_normal((3, 6, 32)).astype(np.float32)
    np.testing.assert_allclose(_run(shrunk, x), _run(masked, x), atol=1e-5, rtol=0)
    assert _io(shrunk) == _io(model)

@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_multi_query_attention_keeps_the_reason(exporter, separate_qkv):
    """K and V with one head that every Q head reads: the heads of Q cannot leave with K's and V's rows."""
    groups = channel_groups(onnx.load(str(separate_qkv(exporter, kv_heads=1))))
    assert not any(g.unit == "head" for g in groups)
    q = next(g for g in groups if g.node == {"torchscript": "/q/MatMul", "dynamo": "node_MatMul_2"}[exporter])
    k = {"torchscript": "onnx::MatMul_106", "dynamo": "val_11"}[exporter]
    assert not q.prunable
    assert q.reason.endswith(f"as attention heads: no attention heads found ('{k}' has 8 outputs, not blocks of 4 "
                             "heads of 8 (Q, K and V differ in head count or head_dim))")


def _compress_filter(path, original: onnx.ModelProto, folder):
    """``compress`` with structure "filter" at sparsity 0.5 on 32 synthesized samples (the sequence
    length, where dynamic, 8), 1 + 1 epochs; the result and the file it was saved to."""
    feeds = synthesize_inputs(original, batch=32, seed=0)
    config = CompressConfig.from_dict({"train": {"threads": 1, "batch_size": 16},
                                       "admm": {"epochs": 1, "retrain_epochs": 1},
                                       "prune": {"sparsity": 0.5, "structure": "filter"}})
    result = compress(path, Dataset(feeds, None, set(feeds)), config)
    out = folder / "s.onnx"
    result.save(out)
    return result, out


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("kv", ["separate", "qkv_unbind"])
def test_compress_filter_removes_separate_qkv_heads(kv, exporter, separate_qkv, tmp_path):
    """Separate q, k, v, and timm's fused qkv unbound into Q, K and V: the same heads and MACs."""
    path = separate_qkv(exporter, kv=kv)
    original = load_model(path)
    result, out = _compress_filter(path, original, tmp_path)
    structure = result.report["structure"]
    heads = next(g for g in channel_groups(original) if g.unit == "head")
    assert structure["kept_channels"][heads.name] == 2 and structure["channels"][heads.name] == HEADS
    written = onnx.load(str(out))
    weights = {t.name: list(t.dims) for t in written.graph.initializer}
    assert [weights[m] for m in heads.members] == {"separate": [[32, 2 * HEAD_DIM]] * 3,
                                                   "qkv_unbind": [[32, 3 * 2 * HEAD_DIM]]}[kv]
    assert _io(written) == _io(original)
    # With half the heads and half the FFN units: 26048 MACs per sample, 51776 before.
    assert (structure["macs"]["original"], structure["macs"]["compressed"]) == (51776, 26048)
    for batch in (1, 5):
        x = synthesize_inputs(original, batch=batch, seed=batch)
        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        ok, diff = within_tolerance(result.imported.run(x), session.run(None, x))
        assert ok, (batch, diff)


# -- Q, K and V split out of a fused projection by chunk, split or unbind ------------------------------


def _bounds(model: onnx.ModelProto) -> list[tuple]:
    """(op, its constant sizes or bounds) of every Split and Slice, in graph order: the edits the cut made."""
    values = {t.name: numpy_helper.to_array(t).tolist() for t in model.graph.initializer}
    values.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t).tolist() for n in model.graph.node
                   if n.op_type == "Constant"})
    return [(n.op_type, *(values.get(x, "computed") for x in n.input[1:3])) for n in model.graph.node
            if n.op_type in ("Split", "Slice")]


# The projections of each form, by exporter; the Split and Slice nodes of the graph without heads 1 and 3.
SPLIT_FORMS = {
    # timm's ViT: unbind(0) of [3, N, H, L, head_dim] (TorchScript: Split + Squeeze; dynamo: Slice + Squeeze).
    ("qkv_unbind", "torchscript"): (("/qkv/MatMul",), [("Split", [1, 1, 1])]),
    ("qkv_unbind", "dynamo"): (("node_MatMul_2",), [("Slice", [0], [1]), ("Slice", [1], [2]), ("Slice", [2], [3])]),
    # chunk(3) of [N, L, 3E]: TorchScript slices at bounds computed from the width (frozen, then cut; an end
    # at the axis's end stays there); dynamo writes Split(num_outputs=3), equal pieces by themselves.
    ("qkv_chunk", "torchscript"): (("/qkv/MatMul",), [("Slice", [0], [16]), ("Slice", [16], [32]),
                                                      ("Slice", [32], [96])]),
    ("qkv_chunk", "dynamo"): (("node_MatMul_2",), [("Split",)]),
    # split([E, E, E]): TorchScript slices at constant bounds, dynamo writes Split with its sizes; the cut
    # edits both.
    ("qkv_split", "torchscript"): (("/qkv/MatMul",), [("Slice", [0], [16]), ("Slice", [16], [32]),
                                                      ("Slice", [32], [96])]),
    ("qkv_split", "dynamo"): (("node_MatMul_2",), [("Split", [16, 16, 16])]),
    ("chunk", "torchscript"): (("/q/MatMul", "/kv_proj/MatMul"), [("Slice", [0], [16]), ("Slice", [16], [64])]),
    ("chunk", "dynamo"): (("node_MatMul_2", "node_MatMul_10"), [("Split",)]),
    # The kv walked first finds its heads as 2 blocks and brings q in.
    ("chunk_first", "torchscript"): (("/kv_proj/MatMul", "/q/MatMul"), [("Slice", [0], [16]), ("Slice", [16], [64])]),
    ("chunk_first", "dynamo"): (("node_MatMul_2", "node_MatMul_19"), [("Split",)]),
}


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("form", ["qkv_unbind", "qkv_chunk", "qkv_split", "chunk", "chunk_first"])
def test_heads_of_a_projection_split_by_chunk_or_unbind_leave_the_graph(form, exporter, separate_qkv):
    model = onnx.load(str(separate_qkv(exporter, kv=form)))
    heads = next(g for g in channel_groups(model) if g.prunable and g.unit == "head")
    members, bounds = SPLIT_FORMS[(form, exporter)]
    assert heads.n_channels == HEADS and heads.member_nodes == members
    # A fused qkv [32, 96] holds each head's head_dim columns in each of its 3 blocks; q and kv in 1 and 2.
    projections = {"chunk": ["q", "kv_proj"], "chunk_first": ["kv_proj", "q"]}.get(form, ["qkv"])
    blocks = [{"q": 1, "kv_proj": 2, "qkv": 3}[p] for p in projections]
    assert [heads.blocks(m) for m in heads.members] == [(b, HEAD_DIM) for b in blocks]

    shrunk = _without_heads_1_and_3(model, heads)
    weights = {t.name: list(t.dims) for t in shrunk.graph.initializer}
    assert [weights[m] for m in heads.members] == [[32, b * 2 * HEAD_DIM] for b in blocks]
    assert [weights[f"{p}.bias"] for p in projections] == [[b * 2 * HEAD_DIM] for b in blocks]
    assert weights[heads.consumers[0].tensor] == [2 * HEAD_DIM, 32]
    assert _bounds(shrunk) == bounds
    split = [(-1, 6, 3, 2, 8)] if form == "qkv_unbind" else [(-1, 6, 2, 8)] * 3
    assert [v for v in _shape_values(shrunk) if v[-1] in (HEAD_DIM, 2 * HEAD_DIM)] == split + [(-1, 6, 16)]
    assert (count_macs(model)["macs"], count_macs(shrunk)["macs"]) == (51776, 38336)


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_a_slice_through_the_heads_keeps_the_reason(exporter, separate_qkv):
    """Q, K and V sliced out of the fused qkv at 8:40, 40:72, 64:96: no piece holds whole heads."""
    groups = channel_groups(onnx.load(str(separate_qkv(exporter, kv="qkv_shifted"))))
    assert not any(g.unit == "head" for g in groups)
    qkv = next(g for g in groups if g.n_channels == 3 * 32)
    first = {"torchscript": "/Slice", "dynamo": "node_slice_1"}[exporter]
    assert not qkv.prunable
    assert qkv.reason == (f"Slice {first} slices the channel axis; as attention heads: no attention "
                          f"heads found (Slice {first} takes entries 8..40 of the heads' axis, not whole blocks of 32 "
                          "heads of 1)")


# -- text encoders: a dynamic batch and a dynamic sequence length ---------------------------------------


class SequenceFirstClassifier(torch.nn.Module):
    """TransformerClassifier with ``batch_first=False``: the input [N, L, E] transposed to [L, N, E]."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = torch.nn.TransformerEncoderLayer(32, HEADS, FFN, dropout=0.0)
        self.fc = torch.nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.encoder(x.transpose(0, 1)).mean(dim=0))


TEXT_ENCODERS = {"batch_first": TransformerClassifier, "sequence_first": SequenceFirstClassifier,
                 "separate": SeparateQKVEncoder}


@pytest.fixture(scope="module")
def text_encoder(tmp_path_factory):
    """callable (exporter, form of TEXT_ENCODERS) -> the file exported with a dynamic batch N and sequence
    length L, exported once per module."""
    folder, done = tmp_path_factory.mktemp("text_encoder"), {}

    def get(exporter: str, form: str):
        if (exporter, form) not in done:
            torch.manual_seed(0)
            module = TEXT_ENCODERS[form]().eval()
            with torch.no_grad():  # layer norms start equal: the exporters would merge them
                for p in module.parameters():
                    p.add_(0.1 * torch.randn_like(p))
            fastpath = torch.backends.mha.get_fastpath_enabled()
            torch.backends.mha.set_fastpath_enabled(False)
            try:
                done[(exporter, form)] = export_torch(module, torch.randn(2, 6, 32), folder / f"{exporter}_{form}.onnx",
                                                      exporter, sequence=True)
            finally:
                torch.backends.mha.set_fastpath_enabled(fastpath)
        return done[(exporter, form)]

    return get


def _frozen_after(shrunk: onnx.ModelProto, heads) -> dict[str, list[int]]:
    """The constant each frozen shape (or shape piece) of ``heads`` holds in ``shrunk``, by node."""
    sources = constant_sources(shrunk)  # a shape with zeros may be stored sparse
    return {f.node: tensor_value(shrunk, sources[f.tensor]).tolist() for f in heads.frozen}


# The projections of each form, by exporter, and the frozen shapes (and shape pieces) without heads 1 and 3:
# 0 copies the input's dim at the same index (N or L), -1 takes the one varying dim left (N*H).
MHA_FROZEN = {
    "node_view": [0, 0, 3, 16],  # the fused [L, N, 3E] in_proj output unflattened to [L, N, 3, E]
    **{f"node_view_{k}": [0, -1, 8] for k in (1, 2, 3)},  # Q, K, V [L, N, E] -> [L, N*H, head_dim]
    "node_Concat_36": [2],  # [N*H, L, d] -> [N, H, L, d] stays computed: its head count piece is edited
}
TEXT_FORMS = {
    ("dynamo", "batch_first"): (("node_MatMul_4",), {**MHA_FROZEN, "node_Reshape_111": [-1, 16]}),
    ("dynamo", "sequence_first"): (("node_MatMul_4",), {**MHA_FROZEN, "node_Reshape_110": [-1, 16]}),
    ("dynamo", "separate"): (("node_MatMul_4", "node_MatMul_12", "node_MatMul_20"),
                             {"node_view": [0, 0, 2, 8], "node_view_1": [0, 0, 2, 8], "node_view_2": [0, 0, 2, 8],
                              "node__unsafe_view": [0, 0, 16]}),
    ("torchscript", "separate"): (("/q/MatMul", "/k/MatMul", "/v/MatMul"),
                                  {"/Reshape": [0, 0, 2, 8], "/Reshape_1": [0, 0, 2, 8], "/Reshape_2": [0, 0, 2, 8],
                                   "/Reshape_3": [0, 0, 16]}),
}


@pytest.mark.parametrize(("exporter", "form"), sorted(TEXT_FORMS))
def test_heads_leave_a_text_encoder_with_a_dynamic_sequence(exporter, form, text_encoder):
    model = onnx.load(str(text_encoder(exporter, form)))
    heads = next(g for g in channel_groups(model) if g.prunable and g.unit == "head")
    members, frozen = TEXT_FORMS[(exporter, form)]
    assert heads.n_channels == HEADS and heads.member_nodes == members
    # (batch, sequence length): 1 and 3, 5 and 7 (the proof's own check), 2 and 11 (no probe's or check's).
    shrunk = _without_heads_1_and_3(model, heads, sizes=((1, 3), (5, 7), (2, 11)))
    dims = [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in shrunk.graph.input]
    assert dims == [["N", "L", 32]]
    assert _frozen_after(shrunk, heads) == frozen


def test_torchscript_multihead_attention_fixes_the_sequence_length(text_encoder):
    """The TorchScript exporter writes nn.MultiheadAttention's K and V views with the example's sequence
    length (6) baked in: the graph runs at no other length, so its shapes cannot be measured and its heads
    stay (its FFN units still leave)."""
    path = text_encoder("torchscript", "batch_first")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with pytest.raises(Exception, match="/encoder/self_attn/Reshape_4"):
        session.run(None, {"input": np.zeros((2, 7, 32), np.float32)})
    groups = channel_groups(onnx.load(str(path)))
    assert not any(g.unit == "head" for g in groups) and any(g.prunable and g.n_channels == FFN for g in groups)
    in_proj = next(g for g in groups if g.n_channels == 3 * 32)
    # As channels the walk passes the Shape that reads their dims, and stops at a Reshape whose shape inference
    # could not size (the baked-in length).
    assert in_proj.reason.startswith("the shapes around Reshape /encoder/self_attn/Reshape_2 are unknown; as "
                                     "attention heads: onnxruntime could not run the graph to measure its shapes (")


def test_compress_filter_removes_heads_of_a_text_encoder_and_runs_at_any_length(text_encoder, tmp_path):
    """Trained at one sequence length (8), the written graph runs at others."""
    path = text_encoder("dynamo", "batch_first")
    original = load_model(path)
    result, out = _compress_filter(path, original, tmp_path)
    heads = next(g for g in channel_groups(original) if g.unit == "head")
    assert result.report["structure"]["kept_channels"][heads.name] == 2
    written = onnx.load(str(out))
    assert _io(written) == _io(original)
    assert {t.name: list(t.dims) for t in written.graph.initializer}[heads.name] == [32, 3 * 2 * HEAD_DIM]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for batch, length in ((1, 3), (5, 7), (3, 13)):
        x = {"input": np.random.default_rng(length).standard_normal((batch, length, 32)).astype(np.float32)}
        ok, diff = within_tolerance(result.imported.run(x), session.run(None, x))
        assert ok, (batch, length, diff)


# -- text encoders with a key-padding mask input -------------------------------------------------------


class PaddedEncoder(torch.nn.Module):
    """nn.TransformerEncoder (``layers`` layers, batch_first) with a key-padding mask input [N, L] (True or
    -inf: padding)."""

    def __init__(self, layers: int = 1) -> None:
        super().__init__()
        layer = torch.nn.TransformerEncoderLayer(32, HEADS, FFN, dropout=0.0, batch_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.fc = torch.nn.Linear(32, 10)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.fc(self.encoder(x, src_key_padding_mask=mask).mean(dim=1))


class MaskedQKVEncoder(SeparateQKVEncoder):
    """SeparateQKVEncoder with separate q, k, v and an additive mask input [N, L] (-inf: padding) that
    ``add`` meets the scores with: ``scores`` adds ``mask[:, None, None, :]`` (broadcast over the heads),
    ``sdpa`` passes it as F.scaled_dot_product_attention's attn_mask, ``repeat`` adds it repeated once per
    head (Tile), ``expand`` adds it expanded to [N, H, L, L] (an Expand of a computed shape)."""

    def __init__(self, add: str) -> None:
        super().__init__()
        self.add = add

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        n, length, width = x.shape
        h = self.norm1(x)
        q, k, v = (t.reshape(n, length, HEADS, HEAD_DIM).transpose(1, 2) for t in (self.q(h), self.k(h), self.v(h)))
        m = mask[:, None, None, :]
        if self.add == "sdpa":
            heads = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m)
        else:
            m = {"scores": m, "repeat": m.repeat(1, HEADS, 1, 1)}.get(self.add, m.expand(n, HEADS, length, length))
            heads = torch.softmax(q @ k.transpose(-2, -1) * HEAD_DIM ** -0.5 + m, dim=-1) @ v
        x = x + self.out(heads.transpose(1, 2).reshape(n, length, width))
        x = x + self.fc2(torch.relu(self.fc1(self.norm2(x))))
        return self.cls(x.mean(dim=1))


@pytest.fixture(scope="module")
def masked_encoder(tmp_path_factory):
    """callable (exporter, form) -> the file exported with inputs ``input`` [N, L, 32] and ``mask`` [N, L]
    (a dynamic batch and sequence length), once per module. Forms: ``padding_bool``, ``padding_float``,
    ``padding_stack`` (PaddedEncoder; the stack: two layers, a bool mask), or MaskedQKVEncoder's ``add``."""
    folder, done = tmp_path_factory.mktemp("masked_encoder"), {}

    def get(exporter: str, form: str):
        if (exporter, form) not in done:
            torch.manual_seed(0)
            module = (PaddedEncoder(2 if form == "padding_stack" else 1) if form.startswith("padding")
                      else MaskedQKVEncoder(form)).eval()
            with torch.no_grad():  # layer norms start equal: the exporters would merge them
                for p in module.parameters():
                    p.add_(0.1 * torch.randn_like(p))
            bool_mask = form in ("padding_bool", "padding_stack")
            mask = torch.zeros(2, 6, dtype=torch.bool if bool_mask else torch.float32)
            path, fastpath = folder / f"{exporter}_{form}.onnx", torch.backends.mha.get_fastpath_enabled()
            torch.backends.mha.set_fastpath_enabled(False)
            try:
                with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                    warnings.simplefilter("ignore")
                    if exporter == "dynamo":
                        n, length = torch.export.Dim("N"), torch.export.Dim("L")
                        torch.onnx.export(module, (torch.randn(2, 6, 32), mask), str(path), dynamo=True,
                                          input_names=["input", "mask"], output_names=["logits"],
                                          dynamic_shapes=({0: n, 1: length}, {0: n, 1: length}))
                    else:
                        axes = {"input": {0: "N", 1: "L"}, "mask": {0: "N", 1: "L"}, "logits": {0: "N"}}
                        torch.onnx.export(module, (torch.randn(2, 6, 32), mask), str(path), dynamo=False,
                                          opset_version=17, input_names=["input", "mask"],
                                          output_names=["logits"], dynamic_axes=axes)
            finally:
                torch.backends.mha.set_fastpath_enabled(fastpath)
            done[(exporter, form)] = path
        return done[(exporter, form)]

    return get


def _masked_feed(model: onnx.ModelProto, batch: int, length: int) -> dict[str, np.ndarray]:
    """Random inputs and a random mask that pads about a third of the positions (never the first: a row
    padded wholly is NaN)."""
    rng = np.random.default_rng(batch * 100 + length)
    padded = rng.random((batch, length)) < 0.35
    padded[:, 0] = False
    bool_mask = model.graph.input[1].type.tensor_type.elem_type == onnx.TensorProto.BOOL
    additive = np.where(padded, -np.inf, rng.standard_normal((batch, length))).astype(np.float32)
    mask = padded if bool_mask else additive
    return {"input": rng.standard_normal((batch, length, 32)).astype(np.float32), "mask": mask}


# The projections of each form, by exporter, and the constants of their own without heads 1 and 3. A mask
# repeated per head: its Expand's shape or Tile's repeats hold 2 heads (4 before); nn.MultiheadAttention
# reshapes the copies to [N*H, 1, L], N*H from a Mul by the head count (a scalar, 4 before), and back to
# [N, H, 1, L] by a Concat with a head count piece; the rest as in MHA_FROZEN and TEXT_FORMS.
SEPARATE_FROZEN = {"dynamo": {"node_view": [0, 0, 2, 8], "node_view_1": [0, 0, 2, 8], "node_view_2": [0, 0, 2, 8]},
                   "torchscript": {"/Reshape": [0, 0, 2, 8], "/Reshape_1": [0, 0, 2, 8], "/Reshape_2": [0, 0, 2, 8],
                                   "/Reshape_3": [0, 0, 16]}}
SEPARATE_DYNAMO = ("node_MatMul_6", "node_MatMul_8", "node_MatMul_10")
SEPARATE_TORCHSCRIPT = ("/q/MatMul", "/k/MatMul", "/v/MatMul")
MASK_FORMS = {
    ("dynamo", "padding_bool"): (("node_MatMul_11",), {
        "node_expand_1": [1, 2, 1, 1], "node_mul_46": 2, "node_Concat_59": [2], "node_view": [0, 0, 3, 16],
        **{f"node_view_{k}": [0, -1, 8] for k in (1, 2, 3)}, "node_Concat_65": [2], "node_Reshape_145": [-1, 16]}),
    ("dynamo", "padding_float"): (("node_MatMul_6",), {
        "node_expand": [1, 2, 1, 1], "node_mul_39": 2, "node_Concat_55": [2], "node_view": [0, 0, 3, 16],
        **{f"node_view_{k}": [0, -1, 8] for k in (1, 2, 3)}, "node_Concat_61": [2], "node_Reshape_140": [-1, 16]}),
    ("dynamo", "scores"): (SEPARATE_DYNAMO, {**SEPARATE_FROZEN["dynamo"], "node__unsafe_view": [0, 0, 16]}),
    ("dynamo", "sdpa"): (("node_MatMul_4", "node_MatMul_6", "node_MatMul_8"),
                         {**SEPARATE_FROZEN["dynamo"], "node_view_3": [0, 0, 16]}),
    ("dynamo", "repeat"): (SEPARATE_DYNAMO, {"node_repeat": [1, 2, 1, 1], **SEPARATE_FROZEN["dynamo"],
                                             "node__unsafe_view": [0, 0, 16]}),
    ("torchscript", "scores"): (SEPARATE_TORCHSCRIPT, SEPARATE_FROZEN["torchscript"]),
    ("torchscript", "sdpa"): (SEPARATE_TORCHSCRIPT, SEPARATE_FROZEN["torchscript"]),
    ("torchscript", "repeat"): (SEPARATE_TORCHSCRIPT, {"/Tile": [1, 2, 1, 1], **SEPARATE_FROZEN["torchscript"]}),
}


@pytest.mark.parametrize(("exporter", "form"), sorted(MASK_FORMS))
def test_heads_leave_a_text_encoder_with_a_key_padding_mask(exporter, form, masked_encoder):
    """A mask broadcast over the heads passes them by; one repeated per head by a constant count loses
    the removed heads' copies. Shrunk == masked at sizes and masks no probe used, padding included."""
    model = onnx.load(str(masked_encoder(exporter, form)))
    heads = next(g for g in channel_groups(model) if g.prunable and g.unit == "head")
    members, frozen = MASK_FORMS[(exporter, form)]
    assert heads.n_channels == HEADS and heads.member_nodes == members
    removed = np.array([1, 3])
    shrunk = shrink(model, {heads.name: np.setdiff1d(np.arange(HEADS), removed)}).model
    out_proj = heads.consumers[0]
    masked = _masked(model, {out_proj.tensor: (out_proj.axis, _rows(removed))})
    for batch, length in ((1, 3), (5, 7), (2, 11)):
        feed = _masked_feed(model, batch, length)
        got, want = _run(shrunk, feed), _run(masked, feed)
        assert np.isfinite(want).all()
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert _io(shrunk) == _io(model)
    assert _frozen_after(shrunk, heads) == frozen


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_a_mask_expanded_to_a_computed_head_count_keeps_the_heads_with_the_reason(exporter, masked_encoder):
    """``mask[:, None, None, :].expand(N, H, L, L)``: the Expand's shape is computed at run time, so the
    count of copies is not edited: the heads meet a branch from the mask and stay (the FFN still shrinks)."""
    groups = channel_groups(onnx.load(str(masked_encoder(exporter, "expand"))))
    assert not any(g.unit == "head" for g in groups) and any(g.prunable and g.n_channels == FFN for g in groups)
    q = next(g for g in groups if g.node == {"torchscript": "/q/MatMul", "dynamo": "node_MatMul_6"}[exporter])
    add = {"torchscript": "Add /Add", "dynamo": "Add node_add_88"}[exporter]
    assert q.reason.endswith(f"as attention heads: no attention heads found (coupled through {add} with a branch "
                             "from the graph input 'mask')")


def test_layers_that_share_one_repeated_mask_lose_their_own_heads(masked_encoder):
    """The dynamo exporter repeats the mask once for the whole nn.TransformerEncoder and every layer adds
    those copies: each layer gets its own copy of the chain, so each layer's heads are a group of their
    own, and the two layers lose different heads (the written graph carries both chains)."""
    model = onnx.load(str(masked_encoder("dynamo", "padding_stack")))
    heads = [g for g in channel_groups(model) if g.prunable and g.unit == "head"]
    assert [(g.n_channels, g.member_nodes) for g in heads] == [(HEADS, ("node_MatMul_11",)),
                                                               (HEADS, ("node_MatMul_121",))]
    assert [[c.tensor for c in g.consumers] for g in heads] == [
        [f"encoder.layers.{k}.self_attn.out_proj.weight"] for k in (0, 1)]
    removed = [np.array([1, 3]), np.array([0])]
    shrunk = shrink(model, {g.name: np.setdiff1d(np.arange(HEADS), r) for g, r in zip(heads, removed)}).model
    masked = _masked(model, {g.consumers[0].tensor: (g.consumers[0].axis, _rows(r)) for g, r in zip(heads, removed)})
    # Each layer's repeat (the Expand of a constant shape) holds its own head count: 2 and 3 of 4 kept.
    inits = {t.name: numpy_helper.to_array(t) for t in shrunk.graph.initializer}
    repeats = sorted(inits[n.input[1]].tolist() for n in shrunk.graph.node
                     if n.op_type == "Expand" and n.input[1] in inits)
    assert repeats == [[1, 2, 1, 1], [1, 3, 1, 1]]
    for batch, length in ((1, 3), (5, 7), (2, 11)):
        feed = _masked_feed(model, batch, length)
        np.testing.assert_allclose(_run(shrunk, feed), _run(masked, feed), atol=1e-5, rtol=0)
    assert _io(shrunk) == _io(model)
