"""``dharma export``: a saved model as a portable graph (ONNX or torch.export).

Registered on :data:`dharma_kernel.cli.app` when that module imports this one.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from .cli import _quiet_transformers, app, out


class ExportFormat(StrEnum):
    onnx = "onnx"
    torch_export = "torch-export"


@app.command("export")
def export_command(
    model_dir: Annotated[
        Path, typer.Argument(help="A saved model, or a run directory (its best checkpoint).")
    ],
    fmt: Annotated[ExportFormat, typer.Option("--format", "-f", help="onnx or torch-export (.pt2).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The file to write.")],
) -> None:
    """Export backbone + modules for inference: (input_ids, attention_mask) -> logits, no KV cache."""
    import warnings

    from .export import export_model
    from .model import DharmaModel
    from .train.rundir import model_directory

    _quiet_transformers()
    directory = model_directory(model_dir)
    model = DharmaModel.from_pretrained(directory).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporters' deprecation chatter is not the user's to fix
        written = export_model(model, output, fmt.value)
    size = written.stat().st_size
    out.print(
        f"exported {escape(str(directory))} as {fmt.value}: {escape(str(written))} ({size / 2**20:.1f} MiB)"
    )
    out.print(
        escape(
            "inputs: input_ids, attention_mask [batch, length] int64; output: logits [batch, length, vocab]"
        )
    )
