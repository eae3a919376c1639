"""The served models: ``NAME=PATH`` or a path named by its directory, loaded once, each with its scheduler."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DharmaError
from .scheduler import Scheduler


def parse_spec(spec: str) -> tuple[str, Path]:
    """``name=path`` or ``path`` (named by its directory: ``runs/chatbot`` -> ``chatbot``)."""
    name, sep, path = spec.partition("=")
    if not sep:
        name, path = Path(spec).resolve().name, spec
    if not name or not path:
        raise DharmaError(f"'{spec}': give a model as PATH or NAME=PATH")
    return name, Path(path)


@dataclass
class ServedModel:
    name: str
    path: Path
    model: Any
    tokenizer: Any
    context: int
    eos_ids: frozenset[int]  # what ends a plain completion (as `dharma generate`)
    chat_stops: frozenset[int]  # what ends an assistant turn
    scheduler: Scheduler
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def heads(self) -> list[str]:
        return list(self.model.heads)

    def card(self) -> dict[str, Any]:
        return {
            "id": self.name,
            "object": "model",
            "created": self.created,
            "owned_by": "dharma",
            "dharma": {
                "path": str(self.path),
                "context_length": self.context,
                "modules": self.model.module_refs,
                "heads": self.heads,
            },
        }


def load_served(specs: list[str], max_batch: int, max_queue: int) -> dict[str, ServedModel]:
    """Every model, loaded and with its decode loop running; a DharmaError names a bad one."""
    from ..application import load_application
    from ..backbone import context_length
    from ..data.chat import ensure_chat_template, stop_token_ids

    parsed = [parse_spec(spec) for spec in specs]
    names = [name for name, _ in parsed]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise DharmaError(f"two models are named {', '.join(twice)}", hint="Name them: NAME=PATH.")
    served = {}
    for name, path in parsed:
        model, tokenizer = load_application(path)
        model.eval()
        ensure_chat_template(tokenizer)
        eos = model.generation_config.eos_token_id
        eos = eos if eos is not None else tokenizer.eos_token_id
        eos_ids = frozenset(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        served[name] = ServedModel(
            name,
            path,
            model,
            tokenizer,
            context_length(model.config.text_config),
            eos_ids,
            frozenset(stop_token_ids(tokenizer)),
            Scheduler(model, max_batch, max_queue),
        )
    return served
