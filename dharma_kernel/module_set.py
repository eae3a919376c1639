"""A saved run or model against what its manifest's ``include`` resolves to now.

``all`` and family names take in every installed third-party module, so installing or removing a
plugin changes them. A saved model keeps the modules it was built with; these functions say so
when the manifest now means another set, naming the modules added and missing.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from .errors import DharmaError
from .registry import PluginWarning


class ModuleSetWarning(PluginWarning):
    """A saved model's manifest now resolves to other modules than the model has."""


def saved_refs(directory: str | Path) -> list[str] | None:
    """The module refs a saved model directory was built with (None: not a readable model)."""
    try:
        layout = json.loads((Path(directory) / "config.json").read_text())["layout"]
        return [spec["ref"] for spec in layout["modules"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def change(saved: list[str], now: list[str]) -> str | None:
    """``"added a, b; missing c"`` between two module sets (None when they hold the same refs)."""
    added = [ref for ref in now if ref not in saved]
    missing = [ref for ref in saved if ref not in now]
    parts = [f"{label} {', '.join(refs)}" for label, refs in (("added", added), ("missing", missing)) if refs]
    return "; ".join(parts) or None


def resolve_now(modules: dict[str, Any]) -> list[str] | None:
    """What a manifest's ``[modules]`` (as a dict) selects with the plugins installed now (None: it
    cannot be resolved now, which loading the model reports on its own)."""
    from .assemble import select_modules

    try:
        return select_modules(list(modules.get("include") or []), list(modules.get("exclude") or []))
    except DharmaError:
        return None


def what_include_means(modules: dict[str, Any]) -> str:
    include = modules.get("include") or []
    exclude = modules.get("exclude") or []
    return f"include = {json.dumps(include)}" + (f" minus {json.dumps(exclude)}" if exclude else "")


def warn_if_changed(directory: str | Path, refs: list[str], manifest: dict[str, Any] | None) -> None:
    """Warn when the manifest saved with a model now resolves to other modules than ``refs``."""
    modules = (manifest or {}).get("modules") or {}
    now = resolve_now(modules) if modules.get("include") else None
    difference = change(refs, now) if now is not None else None
    if difference is None:
        return
    warnings.warn(
        f"{directory} was built with {len(refs)} modules; its manifest's {what_include_means(modules)} "
        f"now resolves to {len(now)} ({difference}): the model runs with the {len(refs)} it was built with",
        ModuleSetWarning,
        stacklevel=2,
    )


def run_change_line(run_root: Path, latest: Path | None, refs_now: list[str]) -> str | None:
    """What ``dharma validate`` adds when the manifest's run directory holds a run built with other
    modules than the manifest resolves to now."""
    saved = saved_refs(latest) if latest is not None else None
    difference = change(saved, refs_now) if saved is not None else None
    if difference is None:
        return None
    return (
        f"the run in {run_root} was trained with {len(saved)} modules; this manifest now "
        f"resolves to {len(refs_now)} ({difference}). `dharma train --resume` refuses the change "
        "unless --run-modules keeps the run's own modules"
    )


def resume_refusal(latest: Path, saved: list[str], now: list[str], modules: dict[str, Any]) -> DharmaError:
    """The error for resuming a run with another module set than it was trained with."""
    return DharmaError(
        f"{latest} was trained with {len(saved)} modules; the manifest's {what_include_means(modules)} now "
        f"resolves to {len(now)} ({change(saved, now)})",
        hint="Pass --run-modules to resume with the run's own modules, or start a new run with --output "
        "to train the new set.",
    )
