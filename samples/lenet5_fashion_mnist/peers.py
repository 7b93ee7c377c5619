"""onnxsim 0.8 as a peer in the LeNet-5 benchmark: its one-shot pruning, label-free block fine-tuning and
weight-only quantization, each applied straight to the benchmark's dense ONNX file.

onnxsim is optional (the ``samples`` extra): without it ``bench.py`` skips these rows with one line
(:data:`NOTE`). The calls are onnxsim's public API:

- ``apply_wanda_pruning(model, calibration_data, sparsity, global_sparsity=True)``: |W| x the input's
  activation norm over the calibration images, one threshold over every Conv/Gemm weight;
- ``apply_magnitude_pruning(model, sparsity, global_sparsity=True)``: global |W|, no data;
- ``apply_structured_pruning(model, sparsity, global_sparsity)``: whole filters removed by L2 norm (used by
  the residual CNN's peer row, samples/resnet_fashion_mnist/onnxsim_peer.py);
- ``apply_block_finetune_all_blocks(reference, pruned, calibration_data, ..., preserve_sparsity=True)``: each
  block's weights trained with Adam to reproduce the dense model's activation at the block's output (mean
  squared error, no labels), blocks in sequence; ``preserve_sparsity`` holds the pruned zeros (without it
  every zero is refilled on the first step, onnxsim's docstring says);
- ``quantize_weight_only`` (INT8, per output channel) and ``quantize_weight_only_int4`` (INT4, blocks of 32
  along the reduction axis), each a DequantizeLinear in front of the layer.

Calibration and fine-tuning data are the training images the benchmark's own rows train on, without labels.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

logger = logging.getLogger("bench.peers")

NOTE = "onnxsim is not installed (pip install 'onnx-admm[samples]'): its peer rows are skipped"
# Block fine-tuning: Adam's usual 1e-3 rather than onnxsim's 1e-4 default (its docstring calls that a
# quantization-aware-training starting point, "not tuned" for plain fine-tuning); 500 steps of 128 images
# per block is the ~400 s budget the issue quotes for onnxsim on this model. Chosen before any test figure.
FINETUNE_STEPS, FINETUNE_LR, FINETUNE_BATCH = 500, 1e-3, 128
CALIBRATION_BATCH = 256
# onnxsim's INT4 needs opset 21 (INT4 tensors, DequantizeLinear's block_size); at the export's opset 17 its
# INT8 pass quantizes conv1 alone, so both quantization rows convert the dense model first.
QUANT_OPSET = 21
PRUNE_SCORES = ("wanda", "magnitude")


def available() -> bool:
    """Whether onnxsim 0.8's API imports (the rows need it; the rest of the benchmark does not). A folder named
    onnxsim on the path imports as an empty namespace package, so the API itself is looked for."""
    try:
        import onnxsim
    except ImportError:
        return False
    return hasattr(onnxsim, "apply_wanda_pruning")


def run(recipe: dict, sparsity: float | None, dense: Path, out: Path, images: np.ndarray,
        steps: int = FINETUNE_STEPS) -> dict:
    """Run one onnxsim row on ``dense`` and write the result to ``out``; returns what the row records.

    ``recipe`` is ``{"prune": "wanda" | "magnitude" | "channels", "finetune": bool, "global": bool}`` (with
    ``sparsity``; ``global`` defaults to True: one threshold over every layer) or
    ``{"quantize": "int8" | "int4"}``. ``images`` are the unlabelled calibration / fine-tuning inputs.
    """
    import onnx
    import onnxsim
    from onnx import version_converter

    original = onnx.load(str(dense))
    feed = original.graph.input[0].name
    calibration = [{feed: images[i:i + CALIBRATION_BATCH]} for i in range(0, len(images), CALIBRATION_BATCH)]
    info: dict = {}
    started = time.perf_counter()
    if "quantize" in recipe:
        quantize = {"int8": onnxsim.quantize_weight_only, "int4": onnxsim.quantize_weight_only_int4}[recipe["quantize"]]
        model = quantize(version_converter.convert_version(original, QUANT_OPSET))
        info["quantized_layers"] = sum(node.op_type == "DequantizeLinear" for node in model.graph.node)
    else:
        pooled = recipe.get("global", True)
        if recipe["prune"] == "wanda":
            model = onnxsim.apply_wanda_pruning(original, calibration_data=calibration, sparsity=sparsity,
                                                global_sparsity=pooled)
        elif recipe["prune"] == "magnitude":
            model = onnxsim.apply_magnitude_pruning(original, sparsity=sparsity, global_sparsity=pooled)
        else:  # "channels": whole filters removed (the graph shrinks), L2 norm
            model = onnxsim.apply_structured_pruning(original, sparsity=sparsity, global_sparsity=pooled)
        info["prune_s"] = round(time.perf_counter() - started, 1)
        drop_unused_initializers(model)
        restore_weight_names(original, model)
        if recipe.get("finetune"):
            started = time.perf_counter()
            model, blocks = onnxsim.apply_block_finetune_all_blocks(
                original, model, calibration_data=calibration, num_iterations=steps, learning_rate=FINETUNE_LR,
                batch_size=FINETUNE_BATCH, preserve_sparsity=True)
            info["finetune_s"] = round(time.perf_counter() - started, 1)
            info["finetune_steps"] = steps
            info["blocks"] = [{"ops": list(b.block.op_types), "trained": b.trained, "skipped": b.skipped_reason,
                               "loss_first_last": [b.losses[0], b.losses[-1]] if b.losses else None}
                              for b in blocks]
            # image passes per block (each block sees `steps` batches), for the epochs column
            info["epochs"] = round(steps * FINETUNE_BATCH / len(images), 2)
        if recipe["prune"] == "channels":
            info["kept_channels"] = out_channels(model)
        else:
            info["density"] = layer_density(original, model)
    drop_unused_initializers(model)
    onnx.save(model, str(out))
    return info


def drop_unused_initializers(model) -> int:
    """Remove initializers no node reads: onnxsim's passes write each new weight under a new name and leave
    the original in the file, which would double the size column. Returns how many were removed."""
    graph = model.graph
    read = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    kept = [t for t in graph.initializer if t.name in read]
    removed = len(graph.initializer) - len(kept)
    if removed:
        del graph.initializer[:]
        graph.initializer.extend(kept)
    return removed


def restore_weight_names(original, model) -> int:
    """Give each Conv/Gemm weight back its dense name (layers matched in graph order); returns how many.

    onnxsim's magnitude pruning writes every weight under a new name (``_v_19``) and its block fine-tuning
    then finds no gradient path to the weights it looks up by the reference's names: every block is
    skipped ("no gradient reaches 'qat__w0'"), so the fine-tuned row would silently equal the one-shot
    row. Wanda keeps the names. Call after :func:`drop_unused_initializers` (the originals still hold the
    names until then)."""
    layers = [node for node in original.graph.node if node.op_type in ("Conv", "Gemm")]
    tensors = {t.name: t for t in model.graph.initializer}
    renamed = 0
    for mine, theirs in zip(layers, [node for node in model.graph.node if node.op_type in ("Conv", "Gemm")]):
        old, new = theirs.input[1], mine.input[1]
        if old != new and old in tensors and new not in tensors:
            tensors[old].name = new
            for node in model.graph.node:
                node.input[:] = [new if name == old else name for name in node.input]
            renamed += 1
    return renamed


def out_channels(model) -> list[int]:
    """Output channels of each Conv/Gemm layer, in graph order (what channel pruning left)."""
    dims = {t.name: t.dims for t in model.graph.initializer}
    return [dims[node.input[1]][0] for node in model.graph.node
            if node.op_type in ("Conv", "Gemm") and node.input[1] in dims]


def layer_density(original, pruned) -> dict[str, float]:
    """Fraction of nonzero weights per Conv/Gemm layer, named by the dense model's weight (onnxsim renames
    them), so the table's per-layer column lines up with the other rows'."""
    from onnx import numpy_helper

    def weights(model) -> list[tuple[str, np.ndarray]]:
        values = {t.name: t for t in model.graph.initializer}
        return [(node.input[1], numpy_helper.to_array(values[node.input[1]])) for node in model.graph.node
                if node.op_type in ("Conv", "Gemm") and node.input[1] in values]

    names = [name for name, _ in weights(original)]
    return {name: round(float(np.count_nonzero(w)) / w.size, 5) for name, (_, w) in zip(names, weights(pruned))}
