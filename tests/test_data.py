"""Tests for onnx_admm.data and onnx_admm.sources: .npz loading rules and messages, Dataset, loader plugins."""

import sys
import textwrap

import numpy as np
import pytest

from onnx_admm.converters.errors import UserError
from onnx_admm.converters.graphinfo import InputSpec
from onnx_admm.data import Dataset, required_batch_size
from onnx_admm.sources import PluginData, load_npz, load_plugin, resolve_data

F32 = np.dtype("float32")
I64 = np.dtype("int64")
SPECS = [InputSpec("x", F32, ("N", 3))]


def _npz(tmp_path, name="d.npz", **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def _x(n=10, dtype=np.float64):
    return np.arange(n * 3, dtype=dtype).reshape(n, 3)


# --- load_npz: what it accepts ---


def test_load_casts_float64_and_int_labels(tmp_path):
    data = load_npz(_npz(tmp_path, x=_x(), labels=np.arange(10, dtype=np.int32) % 3), SPECS)
    assert len(data) == 10
    assert data.inputs["x"].dtype == np.float32
    assert data.labels.dtype == np.int64
    assert data.batched == {"x"}


def test_unbatched_input_passed_as_is(tmp_path):
    specs = SPECS + [InputSpec("state", F32, (2, 5))]
    state = np.ones((2, 5))
    data = load_npz(_npz(tmp_path, x=_x(7), state=state), specs)
    assert data.batched == {"x"}
    feeds = list(data.batches(3))
    assert [len(f["x"]) for f in feeds] == [3, 3, 1]
    for feed in feeds:
        np.testing.assert_array_equal(feed["state"], state)
        assert "labels" not in feed


def test_fixed_batch_model_takes_first_axis_as_samples(tmp_path):
    specs = [InputSpec("x", F32, (1, 3))]
    data = load_npz(_npz(tmp_path, x=_x(6)), specs)
    assert data.batched == {"x"} and len(data) == 6
    assert required_batch_size(specs, data.batched) == 1
    assert required_batch_size(SPECS, {"x"}) is None


def test_npy_for_single_input(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, _x(4))
    assert len(load_npz(path, SPECS)) == 4


def test_unknown_spec_shape_batches_first_axis(tmp_path):
    specs = [InputSpec("x", F32, None)]
    assert len(load_npz(_npz(tmp_path, x=_x(5)), specs)) == 5


# --- load_npz: one message per problem ---


@pytest.mark.parametrize(
    ("arrays", "specs", "message"),
    [
        ({"y": _x()}, SPECS, "has no array for graph input(s) 'x': it has ['y'], the graph wants ['x']"),
        ({"x": _x(), "extra": _x()}, SPECS, "has key(s) 'extra', neither a graph input nor 'labels'"),
        ({"x": _x().reshape(10, 3, 1)}, SPECS, "input 'x' has shape (10, 3, 1) (rank 3), but the graph wants rank 2 [N, 3]"),
        ({"x": _x().reshape(15, 2)}, SPECS, "input 'x' dim 1 is 2, but the graph fixes it to 3 [N, 3]"),
        (
            {"x": _x(dtype=np.int64)},
            SPECS,
            "input 'x' holds int64 values, but the graph wants float32; convert it with .astype(numpy.float32) and scale",
        ),
        ({"x": _x()}, [InputSpec("x", I64, ("N", 3))], "input 'x' holds float64 values, but the graph wants int64"),
        ({"x": _x(0)}, SPECS, "holds no samples"),
        ({"x": _x(), "labels": np.arange(9)}, SPECS, "inconsistent sample counts (first-axis lengths) {'x': 10, 'labels': 9}"),
        ({"x": _x(), "labels": np.zeros(10)}, SPECS, "'labels' must be integer class ids, got float64"),
        ({"x": _x(), "labels": np.zeros((10, 3), np.int64)}, SPECS, "'labels' must be 1-D class ids [N], got shape (10, 3) (one-hot"),
        (
            {"x": _x(), "state": np.ones((4, 5))},
            SPECS + [InputSpec("state", F32, (2, 5))],
            "input 'state' dim 0 is 4, neither the graph's fixed size 2 [2, 5] nor the sample count 10",
        ),
    ],
)
def test_load_errors(tmp_path, arrays, specs, message):
    with pytest.raises(UserError) as info:
        load_npz(_npz(tmp_path, **arrays), specs)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="data file .*nope.npz does not exist; pass an .npz"):
        load_npz(tmp_path / "nope.npz", SPECS)


def test_not_an_npz(tmp_path):
    path = tmp_path / "d.npz"
    path.write_text("x,y\n1,2\n")
    with pytest.raises(UserError, match=r"d.npz is not an .npz archive; write it with numpy.savez"):
        load_npz(path, SPECS)


def test_truncated_npz(tmp_path):
    path = _npz(tmp_path, x=_x())
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(UserError, match=r"cannot read data file .* as .npz \(BadZipFile"):
        load_npz(path, SPECS)


def test_npy_for_several_inputs(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, _x())
    with pytest.raises(UserError, match=r"holds a single .npy array, but the graph has 2 inputs"):
        load_npz(path, SPECS + [InputSpec("z", F32, ("N",))])


# --- Dataset ---


def _dataset(n=20):
    return Dataset({"x": _x(n).astype(np.float32)}, np.arange(n) % 4, {"x"})


def test_split_is_deterministic_and_labels_follow():
    data = _dataset(20)
    train, val = data.split(0.25, seed=3)
    train2, val2 = data.split(0.25, seed=3)
    _, val_other = data.split(0.25, seed=4)
    assert (len(train), len(val)) == (15, 5)
    np.testing.assert_array_equal(val.inputs["x"], val2.inputs["x"])
    np.testing.assert_array_equal(train.labels, train2.labels)
    assert not np.array_equal(val.inputs["x"], val_other.inputs["x"])
    # Row i of x is [3i, 3i+1, 3i+2] with label i % 4: the pairing survives the split.
    for part in (train, val):
        np.testing.assert_array_equal(part.labels, (part.inputs["x"][:, 0] // 3).astype(int) % 4)
    together = np.sort(np.concatenate([train.inputs["x"][:, 0], val.inputs["x"][:, 0]]))
    np.testing.assert_array_equal(together, data.inputs["x"][:, 0])


def test_split_small_and_bad_fraction():
    assert len(_dataset(3).split(0.01)[1]) == 1
    assert len(_dataset(3).split(0.0)[1]) == 0
    with pytest.raises(UserError, match="cannot hold out a validation split from 1 sample"):
        _dataset(1).split(0.1)
    with pytest.raises(ValueError):
        _dataset(3).split(1.0)


def test_batches_shuffle_and_take():
    data = _dataset(10)
    plain = list(data.batches(4))
    assert [len(f["labels"]) for f in plain] == [4, 4, 2]
    assert [len(f["x"]) for f in data.batches(4, drop_last=True)] == [4, 4]
    first = np.concatenate([f["labels"] for f in data.batches(3, shuffle=True, seed=1)])
    again = np.concatenate([f["labels"] for f in data.batches(3, shuffle=True, seed=1)])
    np.testing.assert_array_equal(first, again)
    assert sorted(first) == sorted(data.labels)
    assert len(data.take(3)) == 3 and len(data.take(50)) == 10


# --- loader plugins ---


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    (tmp_path / "myloader.py").write_text(
        textwrap.dedent(
            """
            import numpy as np

            CALLS = []
            NOT_A_FUNCTION = 3

            def load():
                CALLS.append(1)
                for start in range(0, 10, 3):  # chunks of 3, 3, 3, 1
                    n = min(3, 10 - start)
                    yield {"x": np.arange(start * 3, (start + n) * 3).reshape(n, 3), "labels": np.arange(start, start + n)}

            def load_float():
                yield {"x": np.zeros((2, 3)), "bogus": np.zeros(2)}
            """
        ).replace("np.arange(start * 3", "np.arange(start * 3.0")
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("myloader", None)


def test_plugin_rebatches_and_is_called_per_epoch(plugin_dir):
    data = resolve_data("myloader:load", SPECS)
    assert isinstance(data, PluginData)
    feeds = list(data.batches(4))
    assert [len(f["x"]) for f in feeds] == [4, 4, 2]
    assert feeds[0]["x"].dtype == np.float32
    np.testing.assert_array_equal(np.concatenate([f["labels"] for f in feeds]), np.arange(10))
    assert [len(f["x"]) for f in data.batches(4, drop_last=True)] == [4, 4]
    assert [len(f["x"]) for f in data.batches(None)] == [3, 3, 3, 1]
    assert len(sys.modules["myloader"].CALLS) == 3
    taken = data.take(5)
    assert len(taken) == 5 and list(taken.labels) == [0, 1, 2, 3, 4]


def test_plugin_keys_checked_like_npz(plugin_dir):
    data = load_plugin("myloader:load_float")
    with pytest.raises(UserError, match=r"loader plugin 'p' \(item 1\) has key\(s\) 'bogus', neither a graph input"):
        list(PluginData(data, SPECS, name="p").batches(2))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_colon", "loader plugin 'no_colon' is not of the form 'package.module:function'"),
        ("bad-name:f", "is not of the form 'package.module:function'"),
        ("surely_missing_module_xyz:f", "cannot import module 'surely_missing_module_xyz' of loader plugin"),
        ("myloader:absent", "module 'myloader' has no attribute 'absent'; check loader plugin 'myloader:absent'"),
        ("myloader:NOT_A_FUNCTION", "'myloader:NOT_A_FUNCTION' names a 'int' object, not a function"),
    ],
)
def test_plugin_errors(plugin_dir, spec, message):
    with pytest.raises(UserError) as info:
        load_plugin(spec)
    assert message in str(info.value)


def test_resolve_data(tmp_path, plugin_dir):
    assert isinstance(resolve_data(str(_npz(tmp_path, x=_x())), SPECS), Dataset)
    with pytest.raises(UserError, match="does not exist"):
        resolve_data(str(tmp_path / "missing.npz"), SPECS)
    with pytest.raises(UserError, match="neither an existing .npz file nor a loader plugin"):
        resolve_data("not a thing", SPECS)
