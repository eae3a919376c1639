"""'Did you mean' for misspelt keys, refs and groups."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def closest(name: str, choices: Iterable[str]) -> str | None:
    """The choice ``name`` was most likely meant to be, or None if none is close."""
    matches = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return matches[0] if matches else None


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest choice, or an empty string."""
    guess = closest(name, choices)
    return f"; did you mean '{guess}'?" if guess else ""


def matching_refs(name: str, refs: Iterable[str]) -> list[str]:
    """``name`` itself if it is a ref, else the refs whose short name (after the family) it is."""
    refs = list(refs)
    if name in refs:
        return [name]
    return [ref for ref in refs if ref.rpartition(".")[2] == name]


def pick_ref(name: str, refs: Iterable[str], where: str, among: str = "a known module") -> str:
    """The one ref ``name`` means among ``refs``; a DharmaError naming ``where`` if none or several."""
    from .errors import DharmaError

    refs = list(refs)
    found = matching_refs(name, refs)
    if len(found) == 1:
        return found[0]
    if found:
        raise DharmaError(f"{where}: '{name}' is ambiguous: {' or '.join(found)}; write the full ref")
    short = [ref.rpartition(".")[2] for ref in refs]
    raise DharmaError(f"{where}: '{name}' is not {among}{did_you_mean(name, refs + short)}")
