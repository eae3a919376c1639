"""Safetensors files a user hands us, checked: a damaged file, or tensors that do not fit the
model, is a DharmaError naming the file, never a library traceback or silently fresh weights."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import DharmaError

SHOWN = 3  # names listed per kind of problem; the count says how many there are
_DAMAGED_HINT = "Copy the file again from where it came from, or load an earlier checkpoint."


def check_safetensors(path: Path) -> None:
    """Refuse a truncated or corrupt safetensors file before a loader maps it.

    The first 8 bytes give the header's length; a length beyond the file (a cut-off copy,
    or garbage) is named with both sizes, since the library's own words do not say them.
    """
    from safetensors import SafetensorError, safe_open

    try:
        size = path.stat().st_size
        with path.open("rb") as file:
            head = file.read(8)
    except OSError as err:
        raise DharmaError(f"{path}: cannot be read ({err.strerror})") from None
    if len(head) == 8 and (declared := int.from_bytes(head, "little")) > size - 8:
        raise DharmaError(
            f"{path}: damaged weights file: its header claims {declared:,} bytes, "
            f"the whole file is {size:,} bytes",
            hint=_DAMAGED_HINT,
        )
    try:
        with safe_open(str(path), framework="pt"):
            pass
    except SafetensorError as err:
        reason = str(err).removeprefix("Error while deserializing header: ")
        if "not fully covered" in reason:
            reason = "the tensors it lists do not match its length (truncated?)"
        raise DharmaError(f"{path}: damaged weights file: {reason}", hint=_DAMAGED_HINT) from None


def read_tensors(path: Path) -> dict[str, Any]:
    """Every tensor in a checked safetensors file (never unpickles)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    check_safetensors(path)
    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as err:
        raise DharmaError(f"{path}: damaged weights file: {err}", hint=_DAMAGED_HINT) from None


def check_fit(
    where: Path | str,
    missing: Sequence[str] = (),
    unexpected: Sequence[str] = (),
    mismatched: Sequence[tuple[str, Any, Any]] = (),
) -> None:
    """Raise when the tensors of ``where`` do not fit the model: a count and the first few
    names of each kind. ``mismatched``: ``(name, shape in the file, shape the model needs)``."""
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing ({_first(sorted(missing))})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected ({_first(sorted(unexpected))})")
    if mismatched:
        shapes = [
            f"{name} is {_shape(found)}, the model needs {_shape(want)}" for name, found, want in mismatched
        ]
        problems.append(f"{len(mismatched)} of the wrong shape ({_first(sorted(shapes))})")
    if problems:
        raise DharmaError(
            f"{where}: the weights do not fit the model: of its tensors, " + "; ".join(problems),
            hint="The file is damaged, or it belongs to another model; load the directory it was saved in.",
        )


def _first(names: list[str]) -> str:
    more = len(names) - SHOWN
    return ", ".join(names[:SHOWN]) + (f" and {more} more" if more > 0 else "")


def _shape(shape: Any) -> str:
    return f"[{', '.join(str(n) for n in shape)}]"
