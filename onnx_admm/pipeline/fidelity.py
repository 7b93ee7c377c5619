"""The written file against the trained module: does onnxruntime compute what training measured?

Validation runs the file in onnxruntime, so a runtime that reads the stored weights otherwise than the spec
(onnxruntime 1.32 fused an int2 DequantizeLinear + MatMul into MatMulNBits and misread it) shows up as a
model the compression destroyed, and the report's advice (train longer, compress less) points the wrong
way. This step runs the final weights in torch and the file in onnxruntime (as ``check`` does: MatMulNBits at
accuracy level 0, float activations; the int2 misread shows there too) on a few held-out samples, and says
which it is.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from onnx_admm.check import relative_mean_diff, trained_outputs_in_onnxruntime
from onnx_admm.data import LABELS, Dataset
from onnx_admm.pipeline.results import CompressResult
from onnx_admm.pipeline.rollback import load_values

# Mean |difference| over mean |output|, per trained output: float32 summation order stays near 1e-6 (a model
# that amplifies rounding, far less than this); the int2 misread was about 1.
RTOL = 0.05
SAMPLES = 16


def written_vs_trained(result: CompressResult, model: onnx.ModelProto, path: Path, held_out: Dataset,
                       scratch: Path) -> dict | None:
    """``{"samples", "outputs": {name: relative mean difference}, "worst", "agrees"}`` for the file at
    ``path`` (``model`` as written) against the module with the final stage's weights; None with int8
    activations (their rounding is the activation report's to measure) or no sample."""
    if result.config.output.activations != "float" or len(held_out) == 0:
        return None
    imported = result.imported
    feed = held_out.take(SAMPLES).as_feed()
    feed.pop(LABELS, None)
    feeds = {name: np.asarray(array) for name, array in feed.items()}
    load_values(imported, result.stages[-1].values)
    imported.module.eval()
    trained = imported.run(feeds)
    written = trained_outputs_in_onnxruntime(model, path, feeds, imported, scratch)
    # Integer ids an ArgMax gives are left out: they follow the scores compared beside them.
    outputs = {name: rel for name, ours, theirs in zip(imported.output_names, trained, written)
               if np.shape(ours) == np.shape(theirs) and (rel := relative_mean_diff(ours, theirs)) is not None}
    worst = max(outputs.values(), default=0.0)
    return {"samples": len(next(iter(feeds.values()))) if feeds else 0, "outputs": outputs, "worst": worst,
            "agrees": bool(worst <= RTOL)}


def disagreement(check: dict | None) -> str | None:
    """The warning when the file does not compute what was trained (None when it does)."""
    if check is None or check["agrees"]:
        return None
    name, worst = max(check["outputs"].items(), key=lambda item: item[1])
    return (f"onnxruntime does not compute what was trained: on {check['samples']} held-out samples its output "
            f"{name!r} differs from the trained weights' in torch by {100 * worst:.1f}% of its mean magnitude (at "
            f"most {100 * RTOL:.0f}% is rounding), so the figures above measure the runtime, not the compression; "
            "report it with the file (onnx-admm check COMPRESSED shows the same difference)")
