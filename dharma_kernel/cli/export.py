"""``dharma export``: a saved model as a portable graph (ONNX or torch.export).

Registered on :data:`dharma_kernel.cli.app`.
"""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from .options import JsonOption, QuietOption
from .output import _quiet_transformers, out, warn


class ExportFormat(StrEnum):
    onnx = "onnx"
    torch_export = "torch-export"


def export_command(
    model_dir: Annotated[
        Path, typer.Argument(help="A saved model, or a run directory (its best checkpoint).")
    ],
    fmt: Annotated[ExportFormat, typer.Option("--format", "-f", help="onnx or torch-export (.pt2).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The file to write.")],
    check: Annotated[
        bool,
        typer.Option(
            "--check/--no-check", help="Run the exported file and compare its logits with PyTorch's."
        ),
    ] = True,
    as_json: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Export backbone + modules for inference: (input_ids, attention_mask) -> logits, no KV cache."""
    import warnings

    from ..application import is_application, load_application
    from ..export import INPUTS, OUTPUTS, export_model, max_difference
    from ..model import DharmaModel
    from ..train.rundir import model_directory

    _quiet_transformers()
    if is_application(model_dir):  # its foundation with the fine-tuned weights applied
        directory, model = Path(model_dir), load_application(model_dir)[0].eval()
    else:
        directory = model_directory(model_dir)
        model = DharmaModel.from_pretrained(directory).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporters' deprecation notes are not the user's to act on
        written = export_model(model, output, fmt.value)
        difference = max_difference(model, written, fmt.value) if check else None
    result = {
        "model": str(directory),
        "format": fmt.value,
        "output": str(written),
        "bytes": written.stat().st_size,
        "inputs": {name: "int64 [batch, length]" for name in INPUTS},
        "outputs": {name: "float [batch, length, vocab]" for name in OUTPUTS},
        "max_abs_difference": difference,
    }
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    size = result["bytes"] / 2**20
    out.print(f"exported {escape(str(directory))} as {fmt.value}: {escape(str(written))} ({size:.1f} MiB)")
    out.print(
        escape(
            "inputs: input_ids, attention_mask [batch, length] int64; output: logits [batch, length, vocab]"
        )
    )
    if difference is not None:
        out.print(f"checked on 4 inputs: logits at real tokens within {difference:.1e} of PyTorch's")
    elif check:
        warn("not checked: ONNX Runtime is not installed (pip install 'dharma-kernel[export]')")
