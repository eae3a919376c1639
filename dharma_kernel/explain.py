"""Which modules fire at each token: the records ``dharma explain`` and ``generate --explain`` show.

A module's score at a token is ``DharmaOutput.module_scores``: under routed composition the
router's probability that the module's concept has come up by that token, else the module's own
activation score. ``routed`` lists the modules that actually ran at the token (the router
chose them at some layer; every module under sequential or parallel composition).
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import DharmaError


@dataclass
class ModuleScore:
    module: str
    score: float


@dataclass
class TokenRecord:
    """One token: its text, its character span in the explained text, its top modules, the routed ones."""

    token: str
    start: int
    end: int
    top: list[ModuleScore]
    routed: list[str]

    def as_dict(self) -> dict[str, Any]:
        return {
            "token": self.token,
            "start": self.start,
            "end": self.end,
            "top": [{"module": s.module, "score": s.score} for s in self.top],
            "routed": self.routed,
        }


@dataclass
class Explanation:
    """The records of the explained tokens, and the text their ``start``/``end`` index into.

    dropped: tokens cut from the front because the text was longer than the model's context.
    """

    text: str
    tokens: list[TokenRecord] = field(default_factory=list)
    dropped: int = 0


def require_modules(model: Any) -> None:
    if not model.module_refs:
        raise DharmaError(
            "this model has no modules, so there is nothing to explain",
            hint="Explain a model assembled with [modules] in its manifest.",
        )


def token_scores(model: Any, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward over ``ids``: scores ``[T, M]`` and where each module ran ``[T, M]`` (bool),
    columns in ``model.module_refs`` order."""
    require_modules(model)
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=False)
    refs = model.module_refs
    scores = torch.stack([out.module_scores[ref][0] for ref in refs], dim=-1).float().cpu()
    active = torch.stack([out.module_active[ref][0] for ref in refs], dim=-1).cpu()
    return scores, active


def records(
    model: Any, ids: list[int], spans: list[tuple[int, int]], texts: list[str], top: int = 3, first: int = 0
) -> list[TokenRecord]:
    """Records for ``ids[first:]``, scored with all of ``ids`` as context; ``spans`` and ``texts``
    give each of those tokens' character span and text."""
    scores, active = token_scores(model, ids)
    refs = model.module_refs
    k = min(top, len(refs))
    result = []
    for position, (span, text) in enumerate(zip(spans, texts, strict=True), start=first):
        row = scores[position]
        order = torch.argsort(row, descending=True, stable=True).tolist()
        result.append(
            TokenRecord(
                token=text,
                start=span[0],
                end=span[1],
                top=[ModuleScore(refs[i], float(row[i])) for i in order[:k]],
                routed=[refs[i] for i in order if active[position, i]],
            )
        )
    return result


def explain_text(
    model: Any, tokenizer: Any, text: str, top: int = 3, context: int | None = None
) -> Explanation:
    """Every token of ``text`` (the last ``context`` when it is longer), spans indexing into ``text``.

    ``tokenizer`` must be a fast tokenizer (it gives character offsets).
    """
    require_modules(model)
    if not text.strip():
        raise DharmaError("the text is empty", hint="Give some text to explain.")
    if not getattr(tokenizer, "is_fast", False):
        raise DharmaError(
            f"the model's tokenizer ({type(tokenizer).__name__}) gives no character offsets",
            hint="Save the model with a fast (tokenizers-backed) tokenizer.",
        )
    encoded = tokenizer(text, return_offsets_mapping=True, truncation=False)
    ids, offsets = list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]]
    dropped = max(0, len(ids) - context) if context else 0
    ids, offsets = ids[dropped:], offsets[dropped:]
    # Special tokens (BOS) have an empty span: show the token itself.
    texts = [text[s:e] if e > s else tokenizer.decode([i]) for i, (s, e) in zip(ids, offsets, strict=True)]
    return Explanation(text, records(model, ids, offsets, texts, top), dropped)


def explain_generated(
    model: Any, tokenizer: Any, ids: list[int], prompt_length: int, top: int = 3, context: int | None = None
) -> Explanation:
    """The tokens after the first ``prompt_length`` of ``ids``, scored in one forward over all of them
    (the last ``context`` when longer); spans index into the decoded generated text."""
    require_modules(model)
    generated = ids[prompt_length:]
    # Each token's text is what it adds to the decoded text; a character split over several
    # tokens (byte-level BPE) is pending, shown as U+FFFD, until the token that completes it.
    decoded = [tokenizer.decode(generated[:n], skip_special_tokens=True) for n in range(len(generated) + 1)]
    settled = [d.rstrip("\ufffd") for d in decoded[:-1]] + [decoded[-1]]
    spans, texts = [], []
    for before, after in itertools.pairwise(settled):
        start = len(os.path.commonprefix([before, after]))
        spans.append((start, len(after)))
        texts.append(after[start:])
    dropped = max(0, len(ids) - context) if context else 0
    if dropped > prompt_length:
        skip = dropped - prompt_length
        spans, texts = spans[skip:], texts[skip:]
    kept = ids[dropped:]
    first = len(kept) - len(spans)
    return Explanation(decoded[-1], records(model, kept, spans, texts, top, first), dropped)
