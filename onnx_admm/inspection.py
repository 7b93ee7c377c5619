"""``inspect``: what a model holds that onnx-admm can compress, and what it cannot import and why."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from onnx_admm.converters.fused import unfuse, weights_view
from onnx_admm.converters.errors import UserError
from onnx_admm.converters.graphinfo import compressible_weights, graph_inputs
from onnx_admm.converters.groups import channel_groups, channel_groups_summary
from onnx_admm.converters.scores import find_score_output
from onnx_admm.converters.importer import import_model, unsupported_nodes
from onnx_admm.converters.modelio import load_model
from onnx_admm.converters.ort_nodes import in_onnxruntime
from onnx_admm.converters.normalize import normalize
from onnx_admm.converters.quantized import dequantize_model


def inspect_model(path: str | Path, filters: bool = False) -> dict[str, Any]:
    """A JSON-ready description: inputs, outputs, score output, compressible weights, import problems; with
    ``filters``, the channel groups filter pruning would cut (each layer's filters, a recurrent layer's hidden
    units, attention heads), or why a layer keeps them."""
    quantized = load_model(path)
    # A model quantized by onnxruntime is compressed as its float form: describe that one's weights.
    model, dequantized = dequantize_model(quantized)
    view, decoded = weights_view(model)  # weights behind decoders or read by onnxruntime's fused ops
    weights = [dataclasses.replace(w, location="decoded") if w.name in decoded else w
               for w in compressible_weights(view)]
    score = find_score_output(model)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    problems: list[str] = []
    trainable = None
    imported = None
    try:
        imported = import_model(quantized)
        trainable = len(imported.weights)
    except UserError as exc:
        problems.append(str(exc))
        try:
            problems += unsupported_nodes(normalize(unfuse(model).model))
        except UserError:
            pass
    return {
        "model": str(path),
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "opset": opset,
        "inputs": [{"name": s.name, "dtype": str(s.dtype), "shape": list(s.shape) if s.shape is not None else None}
                   for s in graph_inputs(model)],
        "outputs": [o.name for o in model.graph.output],
        "score_output": None if score is None else {"name": score.name, "kind": score.kind,
                                                    **({"feeds": score.feeds} if score.feeds else {})},
        "weights": [
            {"name": w.name, "op_type": w.op_type, "shape": list(w.shape), "params": w.size,
             "location": w.location, "consumers": [c.node for c in w.consumers]}
            for w in weights
        ],
        "total_params": sum(w.size for w in weights),
        "trainable_tensors": trainable,
        "importable": not problems,
        "problems": problems,
        # What training sees: the outputs the torch module computes, and the graph outputs the original
        # graph computes from them with parts onnx-admm does not convert (kept as they are).
        "trained_outputs": imported.output_names if imported else [],
        "passed_through": imported.passed_through if imported else [],
        "not_converted": imported.not_converted if imported else [],
        # Nodes without a torch converter that no gradient crosses: the module runs them in onnxruntime.
        "onnxruntime_nodes": in_onnxruntime(imported.normalized) if imported else [],
        "baked_batch": imported.baked_batch if imported else None,
        "fixed_batch": imported.fixed_batch if imported else None,
        "fixed_batch_reason": imported.fixed_batch_reason if imported else None,
        # onnxruntime-quantized nodes replaced by float ones in the graph compress writes into.
        "dequantized": dequantized,
        # onnxruntime's fused nodes the import spells in standard ops (compress keeps them in the file).
        "unfused": unfuse(model).lines,
        **({"filter_groups": channel_groups_summary(channel_groups(model))} if filters else {}),
    }


def format_inspection(info: dict[str, Any]) -> str:
    lines = [f"{info['model']}  ({info['producer'] or 'unknown producer'}, opset {info['opset']})"]
    for i in info["inputs"]:
        lines.append(f"  input  {i['name']}: {i['dtype']} {i['shape']}")
    score = info["score_output"]
    for name in info["outputs"]:
        mark = f"  <- score output ({score['kind']})" if score and score["name"] == name else ""
        if score and score.get("feeds") == name:
            mark = f"  <- integer ids; the loss uses the float tensor {score['name']!r} ({score['kind']}) behind them"
        lines.append(f"  output {name}{mark}")
    lines.append(f"  {'weight':<40} {'op':<14} {'shape':<20} {'params':>10}  stored as")
    for w in info["weights"]:
        lines.append(f"  {w['name']:<40} {w['op_type']:<14} {str(tuple(w['shape'])):<20} {w['params']:>10}  {w['location']}")
    lines.append(f"  {len(info['weights'])} compressible weights, {info['total_params']} parameters")
    if info["weights"]:
        first = info["weights"][0]["name"]
        lines.append(f"  recipe rules match these weight names: [[rules]] match = \"{first}\" (a glob: \"*\" and "
                     "\"?\" work), and/or op_type")
    if info["importable"]:
        lines.append(f"  imports into PyTorch: {info['trainable_tensors']} trainable tensors")
        if info["passed_through"]:
            lines.append(f"  trains {', '.join(info['trained_outputs'])}; passes through "
                         f"{', '.join(info['passed_through'])}, computed by nodes kept as they are:")
            lines += [f"    {p}" for p in info["not_converted"]]
        if info["onnxruntime_nodes"]:
            lines.append("  runs in onnxruntime inside the module (no gradient crosses them, no torch converter):")
            lines += [f"    {n}" for n in info["onnxruntime_nodes"]]
        if info["baked_batch"] is not None:
            lines.append(f"  exported with a fixed batch of {info['baked_batch']}: trains at any batch size; "
                         f"onnxruntime runs the original in batches of {info['baked_batch']}")
        if info["fixed_batch"] is not None:
            lines.append(f"  runs only at its fixed batch of {info['fixed_batch']} ({info['fixed_batch_reason']}): "
                         f"trains in chunks of {info['fixed_batch']}, accumulating gradients up to the batch size")
    if info["dequantized"]:
        lines.append("  quantized by onnxruntime: imported and written back as its float form, replacing")
        lines += [f"    {d}" for d in info["dequantized"]]
    if info["unfused"]:
        lines.append("  optimized by onnxruntime: its fused nodes import as standard ops and stay in the written file")
        lines += [f"    {u}" for u in info["unfused"]]
    if "filter_groups" in info:
        lines += _format_groups(info["filter_groups"])
    if not info["importable"]:
        lines.append("  cannot import:")
        lines += [f"    {p}" for p in info["problems"]]
    return "\n".join(lines)


def _format_groups(groups: list[dict[str, Any]]) -> list[str]:
    """The filter-pruning section of ``format_inspection``: a line per group, its units or why it keeps them."""
    prunable = sum(g["prunable"] for g in groups)
    lines = [f"  filter pruning (--structure filter): {prunable} of {len(groups)} groups can lose units",
             f"    {'group (first weight)':<40} {'op':<14} {'units':>8}  the weights that lose them with it, or why not"]
    for g in groups:
        units = f"{g['channels']} {g['unit']}s" if g["unit"] != "channel" else str(g["channels"])
        why = ", ".join(g["members"][1:]) if g["prunable"] else f"keeps them: {g['reason']}"
        lines.append(f"    {g['name']:<40} {g['op_type']:<14} {units:>8}  {why}".rstrip())
    return lines
