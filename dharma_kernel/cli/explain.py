"""``dharma explain``: per token, the modules that score highest and the modules routed there.

Registered on :data:`dharma_kernel.cli.app`;
``dharma generate --explain`` prints the same table for the generated tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape

from ..errors import DharmaError, first_line
from .options import JsonOption, QuietOption
from .output import _quiet_transformers, out, warn

if TYPE_CHECKING:
    from ..explain import Explanation

TopOption = Annotated[int, typer.Option("--top", min=1, help="Modules to list per token, by score.")]


def explain(
    model_dir: Annotated[
        Path, typer.Argument(help="A saved model, a run directory (its best checkpoint) or an application.")
    ],
    text: Annotated[str, typer.Argument(help="The text to explain.")],
    top: TopOption = 3,
    html: Annotated[
        Path | None, typer.Option("--html", help="Also write a self-contained HTML page here.")
    ] = None,
    as_json: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Per token of TEXT, the modules that fired: the top ones by activation score and the routed ones."""
    from ..application import is_application, load_application
    from ..backbone import context_length
    from ..explain import explain_text, require_modules
    from ..train.rundir import model_directory

    _quiet_transformers()
    model, tokenizer = load_application(model_dir)
    require_modules(model)
    model.eval()
    directory = model_dir if is_application(model_dir) else model_directory(model_dir)
    context = context_length(model.config.text_config, default=0) or None
    explanation = explain_text(model, tokenizer, text, top, context)
    if explanation.dropped:
        warn(
            f"the text has {explanation.dropped + len(explanation.tokens)} tokens, more than the model's "
            f"context of {context}: explaining the last {len(explanation.tokens)}"
        )
    composition = composition_of(model)
    if html is not None:
        write_page(explanation, html, str(directory), composition)
    if as_json:
        result = {
            "model": str(directory),
            "composition": composition,
            "dropped": explanation.dropped,
            "html": None if html is None else str(html),
            "tokens": [record.as_dict() for record in explanation.tokens],
        }
        typer.echo(json.dumps(result, indent=2, ensure_ascii=False))
        return
    out.print(f"{escape(str(directory))}: {len(explanation.tokens)} tokens, {composition} composition")
    print_table(explanation, model)
    if html is not None:
        out.print(f"page: {escape(str(html))}")


def composition_of(model: Any) -> str:
    return (model.config.layout or {}).get("composition", "sequential")


def write_page(explanation: Explanation, path: Path, model: str, composition: str) -> None:
    from ..explain_page import render_page

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render_page(explanation, model, composition), encoding="utf-8")
    except OSError as error:
        raise DharmaError(f"{path}: cannot write the page ({first_line(error)})") from None


def print_table(explanation: Explanation, model: Any) -> None:
    """One line per token: position, token, its top modules with scores (family colours), routed ones."""
    from rich.table import Table

    from ..explain_page import family_colour

    def named(ref: str) -> str:
        return f"[{family_colour(ref)}]{escape(ref)}[/]"

    every = len(model.module_refs)
    width = max((len(r.top) for r in explanation.tokens), default=0)
    table = Table("#", "token", *(f"top {n + 1}" for n in range(width)), "routed", box=None)
    for index, record in enumerate(explanation.tokens):
        token = record.token.replace("\n", "\\n").replace("\t", "\\t")
        cells = [f"{named(s.module)} {s.score:.3f}" for s in record.top]
        routed = "all" if len(record.routed) == every else ", ".join(map(named, record.routed)) or "none"
        table.add_row(str(index), escape(token), *cells, routed)
    out.print(table)
    if composition_of(model) == "routed":
        out.print("score: the router's probability that the module's concept has come up in the text so far")
    else:
        out.print("score: the module's own activation score at the token; every module runs at every token")
