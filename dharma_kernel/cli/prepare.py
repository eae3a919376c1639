"""``dharma prepare``: a manifest's data read, cleaned, tokenized and packed once, for every run after.

Registered on :data:`dharma_kernel.cli.app`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .options import DataOption, JsonOption, QuietOption, StrictOption
from .output import _quiet_transformers, echo_json, err, out


def prepare(
    manifest: Annotated[Path, typer.Argument(help="The manifest TOML file.")],
    data: DataOption = None,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Directory to prepare into (default: the shared cache)."),
    ] = None,
    strict: StrictOption = None,
    as_json: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Read, clean and tokenize the data once into memory-mapped token shards; `dharma train` reuses them."""
    from ..assemble import plan
    from ..data.cache import prepare_into, prepared_data
    from ..manifest import check_requires, load_manifest

    _quiet_transformers()
    loaded = load_manifest(manifest)
    check_requires(loaded)
    config = plan(loaded).config
    refs = [spec["ref"] for spec in config.layout["modules"]]
    console = err if as_json else out  # with --json, stdout holds only the JSON
    if output is not None:
        prepared = prepare_into(loaded, output, data, strict, refs, config.text_config, console)
    else:
        prepared = prepared_data(loaded, data, strict, refs, config.text_config, console=console)
    reused = prepared.reused
    splits = prepared.meta["splits"]
    if as_json:
        echo_json(
            {
                "directory": str(prepared.directory.resolve()),
                "reused": reused,
                "max_length": prepared.meta["max_length"],
                "dtype": prepared.meta["dtype"],
                "vocabulary": prepared.meta["vocabulary"],
                "train": splits["train"],
                "eval": splits["eval"],
                "files_read": prepared.report.files_read,
                "records_kept": prepared.report.records_kept,
            }
        )
        return
    if reused and output is not None:
        out.print(f"{output} is up to date with its inputs")
    out.print(prepared.report.summary(), highlight=False)
    length = prepared.meta["max_length"]
    for name in ("train", "eval"):
        out.print(f"{name}: {splits[name]['rows']:,} rows of {length}, {splits[name]['tokens']:,} tokens")
    out.print(f"prepared data: {prepared.directory}", highlight=False)
