"""The ``dharma explain --html`` page: the text with each token highlighted by its top module.

Self-contained (inline CSS, no scripts or external resources). A token's colour is its top
module's family colour, stronger the higher the score; hovering a token lists its top
modules with their scores and the modules routed there.
"""

from __future__ import annotations

import html
import zlib
from collections import Counter

from .explain import Explanation, TokenRecord

FAMILY_COLOURS = {
    "paths": "#4e79a7",
    "consciousness": "#f28e2b",
    "life": "#59a14f",
    "energy": "#edc948",
    "crisis": "#e15759",
    "darshanas": "#b07aa1",
}
# Third-party families: a stable colour from the name, so a page and the terminal agree.
_OTHER_COLOURS = ("#76b7b2", "#ff9da7", "#9c755f", "#bab0ac", "#86bcb6", "#d4a6c8")


def family_colour(ref: str) -> str:
    family = ref.split(".")[0]
    return FAMILY_COLOURS.get(family) or _OTHER_COLOURS[zlib.crc32(family.encode()) % len(_OTHER_COLOURS)]


def rgb(colour: str) -> tuple[int, int, int]:
    return int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16)


def hover_text(record: TokenRecord) -> str:
    lines = [f"{s.module} {s.score:.3f}" for s in record.top]
    return "\n".join([*lines, f"routed: {', '.join(record.routed) or 'none'}"])


_STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 60em; color: #222; }
.text { white-space: pre-wrap; line-height: 2; font-size: 1.1em; border: 1px solid #ddd; padding: 1em; }
.tok { border-radius: 3px; padding: 0.1em 0; cursor: default; }
.tok:hover { outline: 2px solid #222; }
.tok.special { font-size: 0.75em; color: #555; border: 1px dashed #aaa; padding: 0 0.2em; margin: 0 0.2em; }
.legend { display: flex; flex-wrap: wrap; gap: 0.5em 1.5em; margin: 1em 0; font-size: 0.9em; }
.swatch { display: inline-block; width: 1em; height: 1em; border-radius: 3px; vertical-align: middle;
  margin-right: 0.3em; }
.note { color: #555; font-size: 0.9em; }
"""


def _token_span(record: TokenRecord, shown: str, special: bool) -> str:
    best = record.top[0]
    r, g, b = rgb(family_colour(best.module))
    alpha = 0.1 + 0.8 * min(max(best.score, 0.0), 1.0)
    kind = "tok special" if special else "tok"
    return (
        f'<span class="{kind}" style="background: rgba({r}, {g}, {b}, {alpha:.2f})" '
        f'data-module="{html.escape(best.module)}" title="{html.escape(hover_text(record))}">'
        f"{html.escape(shown)}</span>"
    )


def _body(explanation: Explanation) -> str:
    """The text in order, each token a span; characters between tokens plain; a token whose
    characters an earlier token already showed (one character, several tokens) an empty span."""
    parts, cursor, text = [], 0, explanation.text
    for record in explanation.tokens:
        if record.end <= record.start:
            parts.append(_token_span(record, record.token, special=True))
            continue
        start = max(record.start, cursor)
        parts.append(html.escape(text[cursor:start]))
        parts.append(_token_span(record, text[start : record.end], special=False))
        cursor = max(cursor, record.end)
    parts.append(html.escape(text[cursor:]))
    return "".join(parts)


def _legend(explanation: Explanation) -> str:
    tops = Counter(record.top[0].module for record in explanation.tokens)
    families: dict[str, list[str]] = {}
    for ref in sorted(tops):
        families.setdefault(ref.split(".")[0], []).append(f"{ref.split('.', 1)[-1]} ({tops[ref]})")
    items = [
        f'<span><span class="swatch" style="background: {family_colour(family)}"></span>'
        f"<b>{html.escape(family)}</b>: {html.escape(', '.join(names))}</span>"
        for family, names in families.items()
    ]
    return f'<div class="legend">{"".join(items)}</div>'


def render_page(explanation: Explanation, model: str, composition: str) -> str:
    """The page for ``explanation`` of ``model`` (its path), whose modules are composed ``composition``."""
    e = html.escape
    meaning = (
        "the router's probability that the module's concept has come up in the text by this token"
        if composition == "routed"
        else "the module's own activation score at the token"
    )
    dropped = (
        f" The first {explanation.dropped} tokens did not fit the model's context and are not shown."
        if explanation.dropped
        else ""
    )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>dharma explain: {e(model)}</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>Modules by token</h1>",
        f'<p class="note">Model {e(model)} ({e(composition)} composition), {len(explanation.tokens)} tokens. '
        f"Each token is coloured by the family of its top-scoring module, stronger the higher the score; "
        f"a module's score is {meaning}. Hover a token for its top modules and the modules routed "
        f"there.{e(dropped)}</p>",
        "<h2>Top module by family (tokens)</h2>",
        _legend(explanation),
        f'<div class="text">{_body(explanation)}</div>',
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"
