"""``dharma report``: plots and an HTML page from a training run's metrics.jsonl.

Registered on :data:`dharma_kernel.cli.app`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from .options import JsonOption, QuietOption
from .output import out


def report(
    run_dir: Annotated[Path, typer.Argument(help="The run directory `dharma train` wrote.")],
    output: Annotated[
        Path | None,
        typer.Option(
            "-o", "--output", help="Directory for report.html and the PNGs (default: RUN_DIR/report)."
        ),
    ] = None,
    as_json: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Plot a run's losses, learning rate, throughput, eval perplexity and module activation by concept."""
    from ..report import write_report
    from ..run_metrics import read_run

    metrics = read_run(run_dir)
    result = write_report(metrics, output or run_dir / "report")
    if as_json:
        summary = {
            "html": str(result.html),
            "plots": {plot.name: str(plot.path) for plot in result.plots},
            "missing": result.missing,
            "steps": len(metrics.steps),
            "evals": len(metrics.evals),
        }
        typer.echo(json.dumps(summary, indent=2))
        return
    for plot in result.plots:
        out.print(f"{plot.name}: {plot.path}")
    for name, why in result.missing.items():
        out.print(f"{name}: not drawn, {why}")
    out.print(f"report: {result.html}")
