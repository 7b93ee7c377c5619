"""``onnx-admm analyze``: the command-line face of ``onnx_admm.analyze``.

The function carries its options only: cli.py makes it a command of the group (``main.command``), so it
gets the group's command class (one-line errors, signals) like every other command.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

# schedule holds the defaults without torch, which the command line loads only when a command runs.
from onnx_admm.schedule import ANALYZE_LEVELS, SENSITIVITY_SAMPLES


def _ratio(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    from onnx_admm.analyze import parse_ratio

    if value is None:
        return None
    try:
        return parse_ratio(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _levels(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[float, ...]:
    from onnx_admm.sensitivity import check_levels

    if value is None:
        return ANALYZE_LEVELS
    try:
        return check_levels(float(part) for part in value.split(",") if part.strip())
    except ValueError as exc:
        message = str(exc) if "level" in str(exc) else f"expected sparsities such as 0.5,0.9,0.98, got {value!r}"
        raise click.BadParameter(message) from None


@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--data", required=True, type=str, help="Samples to measure on (.npz; optional `labels`).")
@click.option("--val-data", type=str, help="Measure on these instead (held-out samples, when you have them).")
@click.option("--labels", "labels", type=click.Path(dir_okay=False),
              help="Class ids of the measured samples (.npy, or .npz with `labels`) when their file has none.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the measurements as JSON here.")
@click.option("--levels", callback=_levels, help="Sparsities each layer is pruned to alone [default: "
              + ",".join(f"{s:g}" for s in ANALYZE_LEVELS) + "].")
@click.option("--bits", multiple=True, type=click.IntRange(1, 8),
              help="Also quantize each layer alone to this many bits (per channel; 1 = binary); repeatable.")
@click.option("--layer", "layers", multiple=True, help="Measure only this weight (ONNX name); repeatable.")
@click.option("--samples", default=SENSITIVITY_SAMPLES, show_default=True, type=click.IntRange(min=1),
              help="Samples per measurement (a seeded random subset).")
@click.option("--recipe", type=click.Path(dir_okay=False),
              help="Recipe whose rules choose the layers (skip) and minimums (prune.min_keep, floor).")
@click.option("--suggest", callback=_ratio, help="Suggest per-layer targets for this global ratio, e.g. 40x.")
@click.option("--recipe-out", type=click.Path(dir_okay=False), help="Write the suggested recipe (TOML) here.")
@click.option("--threads", type=click.IntRange(min=1), help="torch threads.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def analyze(model: str, data: str, val_data: str | None, labels: str | None, output: str | None,
            levels: tuple[float, ...], bits: tuple[int, ...], layers: tuple[str, ...], samples: int,
            recipe: str | None, suggest: float | None, recipe_out: str | None, threads: int | None,
            quiet: bool) -> None:
    """Prune (or quantize) each layer of MODEL alone and print what the metric loses: which layers to spare."""
    from onnx_admm.converters.modelio import save_json, save_text
    from onnx_admm.analyze import BadLayer, format_table, recipe_text
    from onnx_admm.analyze import analyze as run_analyze
    from onnx_admm.analyze import suggest as run_suggest
    from onnx_admm.outputs import check_collisions, input_files
    from onnx_admm.preflight import check_writable
    from onnx_admm.progress import console
    from onnx_admm.recipe import CompressConfig

    if recipe_out and suggest is None:
        raise click.UsageError("--recipe-out writes the --suggest recipe: pass --suggest RATIO (e.g. 40x) too")
    outputs = [(label, Path(path)) for label, path in (("the JSON output", output), ("the suggested recipe", recipe_out))
               if path]
    for label, path in outputs:
        check_writable(path, label)
    check_collisions(outputs, input_files(model, data, val_data, {"the recipe": recipe, "the labels": labels}))
    config = CompressConfig.from_toml(recipe) if recipe else CompressConfig()
    config = config.replace(train={"threads": threads})
    with console("off" if quiet else "auto") as emit:
        try:
            report = run_analyze(model, data, val_data=val_data, labels=labels, config=config, levels=levels,
                                 bits=bits, layers=layers or None, samples=samples, progress=emit)
        except BadLayer as exc:
            raise click.BadParameter(str(exc), param_hint="--layer") from None
    suggestion = run_suggest(report, suggest) if suggest is not None else None
    if suggestion is not None:
        report["suggestion"] = suggestion
    click.echo(format_table(report, suggestion))
    if output:
        save_json(report, output)
    if suggestion is not None:
        text = recipe_text(suggestion, Path(model).name)
        if recipe_out:
            save_text(text, recipe_out)
        click.echo("\n" + text)
    if not report["onnxruntime_check"]["agrees"]:
        click.echo(f"onnx-admm analyze: torch and onnxruntime disagree beyond the tolerance: "
                   f"{report['onnxruntime_check']['summary']}", err=True)
        sys.exit(1)
