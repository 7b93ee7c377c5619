"""Tensor batches a phase reads: chunks of a feed, steps, and the one-ahead fetch a GPU uses."""

import numpy as np
import torch

from onnx_admm.pipeline.batch import one_ahead, to_batches


def test_one_ahead_keeps_order_and_fetches_exactly_one_item_ahead():
    fetched = []

    def items():
        for i in range(4):
            fetched.append(i)
            yield i

    stream = one_ahead(items())
    assert fetched == []  # nothing is read before the first item is asked for
    assert next(stream) == 0 and fetched == [0, 1]
    assert next(stream) == 1 and fetched == [0, 1, 2]
    assert list(stream) == [2, 3] and fetched == [0, 1, 2, 3]
    assert list(one_ahead(iter([]))) == []


def test_to_batches_splits_feeds_into_chunks_and_steps_on_the_cpu():
    feeds = [{"x": np.arange(10, dtype=np.float32).reshape(5, 2), "table": np.ones(3, np.float32),
              "labels": np.arange(5)}]
    chunks = list(to_batches(feeds, ["x", "table"], torch.device("cpu"), chunk=2, batched={"x"}))
    assert [len(b.inputs[0]) for b in chunks] == [2, 2, 1]
    assert all(torch.equal(b.inputs[1], torch.ones(3)) for b in chunks)  # not batched: whole in every chunk
    assert torch.equal(torch.cat([b.labels for b in chunks]), torch.arange(5))
    (step,) = list(to_batches(feeds, ["x", "table"], torch.device("cpu"), chunk=2, batched={"x"}, steps=True))
    assert [len(b.inputs[0]) for b in step] == [2, 2, 1]
