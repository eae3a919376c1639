"""``dharma translate``: translate text with an application that has the translation head.

Registered on :data:`dharma_kernel.cli.app`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ..errors import DharmaError
from .options import JsonOption, QuietOption
from .output import _quiet_transformers, out

HEAD = "translation"


def translate(
    app_dir: Annotated[
        Path,
        typer.Argument(help="An application (dharma finetune --head translation) or a model with the head."),
    ],
    texts: Annotated[list[str], typer.Argument(help="The text(s) to translate, one translation each.")],
    beams: Annotated[
        int | None,
        typer.Option("--beams", min=1, help="Beam search width; 1 is greedy (default: the head's)."),
    ] = None,
    max_new_tokens: Annotated[
        int | None, typer.Option("--max-new-tokens", min=1, help="Longest translation in tokens.")
    ] = None,
    as_json: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Translate each TEXT (Sanskrit to English, or the pair the head was fine-tuned for)."""
    from ..application import load_application
    from ..head_data import predict_records

    for number, text in enumerate(texts, 1):  # before the model loads
        if not text.strip():
            raise DharmaError(f"text {number} is empty; give the text to translate")
    _quiet_transformers()
    model, tokenizer = load_application(app_dir)
    if HEAD not in model.heads:
        has = ", ".join(model.heads) or "no head"
        raise DharmaError(
            f"{app_dir} has no translation head ({has})",
            hint="Fine-tune one: dharma finetune FOUNDATION --head translation --data PAIRS.jsonl -o APP",
        )
    head = model.heads[HEAD]
    model.eval()
    options = {k: v for k, v in (("beams", beams), ("max_new_tokens", max_new_tokens)) if v is not None}
    records = [{"source": text, **options} for text in texts]
    predictions = predict_records(head, model, tokenizer, records)
    if as_json:
        rows = [{"source": r["source"], **p} for r, p in zip(records, predictions, strict=True)]
        typer.echo(json.dumps(rows if len(rows) > 1 else rows[0], ensure_ascii=False))
        return
    for prediction in predictions:
        out.print(head.format_prediction(prediction), markup=False)
