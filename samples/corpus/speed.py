"""Training-step time of the converted module against onnxruntime's inference time on the same batch.

``python samples/corpus/speed.py MODEL.onnx [--batch 64] [--profile]`` prints the median of both and
their ratio (the corpus sweep's ``train/infer`` column); ``--profile`` adds torch.profiler's table of
the slowest operators of one training step. Inputs are synthesized from the graph as ``check`` does.
A step is forward + KL-to-teacher-style loss (a mean of the float outputs squared) + backward + SGD.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from onnx_admm.api import import_for_data  # noqa: E402
from onnx_admm.converters.graphinfo import graph_inputs  # noqa: E402
from onnx_admm.converters.importer import import_model  # noqa: E402
from onnx_admm.data import from_arrays  # noqa: E402
from onnx_admm.converters.inputs import synthesize_inputs  # noqa: E402
from onnx_admm.converters.modelio import load_model  # noqa: E402
from onnx_admm.validate import open_session  # noqa: E402


def train_and_infer_ms(path: Path, batch: int = 64, repeats: int = 5, feeds: dict | None = None,
                       profile: bool = False) -> tuple[float, float]:
    """Median ms of one training step of the imported module and of one onnxruntime run, same batch."""
    original = load_model(path)
    if feeds is None:
        imported = import_model(original)
        feeds = synthesize_inputs(imported.original, batch=batch, seed=0)
    else:  # an If that reads weights runs as the branch the feeds take
        imported = import_for_data(original, from_arrays(feeds, graph_inputs(original)), None)
    args = [torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in imported.input_names]
    module = imported.module.train()
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        outs = [o for o in module(*args) if o.is_floating_point()]
        sum(o.float().pow(2).mean() for o in outs).backward()
        opt.step()

    step()  # warm-up
    train = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        train.append((time.perf_counter() - t) * 1e3)
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as run_profile

        with run_profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
            step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    session = open_session(path, 1)
    names = [i.name for i in session.get_inputs()]
    ort_feeds = {k: v for k, v in feeds.items() if k in names}
    session.run(None, ort_feeds)
    infer = []
    for _ in range(repeats):
        t = time.perf_counter()
        session.run(None, ort_feeds)
        infer.append((time.perf_counter() - t) * 1e3)
    module.eval()
    return statistics.median(train), statistics.median(infer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    train, infer = train_and_infer_ms(args.model, args.batch, profile=args.profile)
    print(f"train step {train:.1f} ms, onnxruntime {infer:.1f} ms, ratio {train / infer:.2f}")


if __name__ == "__main__":
    main()
