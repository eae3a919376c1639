"""``dharma plugins``: the installed module and head plugins, and the families they make up.

Reads entry-point metadata only (no torch, no plugin imported) unless ``--check`` asks to import each.
"""

from __future__ import annotations

import contextlib
import json
import sys
import warnings
from typing import Annotated, Any

import typer
from rich.markup import escape

from .. import registry
from .options import JsonOption, Kind, QuietOption
from .output import out, warn


def plugins_command(
    kind: Annotated[Kind | None, typer.Option(help="Only modules or only heads.")] = None,
    check: Annotated[bool, typer.Option("--check", help="Import each plugin to find broken ones.")] = False,
    as_json: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """List installed module and head plugins from their metadata; --check also imports them."""
    infos = registry.discover(kind.value if kind else None, disabled=True)
    timeout = registry.import_timeout()
    # A plugin printing while it imports must not corrupt --json on stdout.
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("always", registry.PluginWarning)
        rows = [_row(info, check, timeout) for info in infos]
    for w in caught:
        if issubclass(w.category, registry.PluginWarning):
            warn(str(w.message))
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        what = f"{kind.value} plugins" if kind else "plugins"
        example = "dharma-head-qa" if kind is Kind.head else "dharma-plugin-vedanta"
        out.print(f"No {what} are installed. Install one with: pip install {example}")
        return
    from rich.table import Table

    table = Table("ref", "distribution", "version", "family", "MODULE_API", "status", box=None)
    for row in rows:
        status = "ok" if row["error"] is None else f"[red]{row['status']}: {escape(row['error'])}[/]"
        cells = [row[key] or "-" for key in ("ref", "distribution", "version", "family", "module_api")]
        table.add_row(*map(escape, cells), status)
    out.print(table)
    if kind is not Kind.head:
        _print_families()
    broken = sum(row["status"] == "broken" for row in rows)
    disabled = sum(row["status"] == "disabled" for row in rows)
    note = "" if check else " (metadata only; --check imports each)"
    counts = f"{len(rows)} plugin{'' if len(rows) == 1 else 's'}, {broken} broken"
    out.print(counts + (f", {disabled} disabled" if disabled else "") + note)


def _print_families() -> None:
    """Each family with installed modules: the names ``include`` and ``--freeze`` take as a group."""
    from ..catalogue import FAMILIES

    listed = {family: refs for family, refs in registry.families().items() if refs}
    if not listed:
        return
    out.print("families (include or freeze each by name):")
    width = max(map(len, listed))
    for family, refs in listed.items():
        origin = "" if family in FAMILIES else "  (new family, from plugins)"
        names = ", ".join(ref.split(".", 1)[1] for ref in refs)
        out.print(f"  {family:<{width}}  {escape(names)}{origin}")


def _row(info: registry.PluginInfo, check: bool, timeout: float) -> dict[str, Any]:
    """One plugin as ``--json`` lists it; status is ok, broken (error says why) or disabled."""
    error = info.disabled or info.problem
    if error is None and check:
        error = registry.check(info, timeout)  # a hanging import is abandoned after ``timeout`` s
    status = "disabled" if info.disabled else "ok" if error is None else "broken"
    return {
        "ref": info.ref,
        "name": info.name,
        "kind": info.kind,
        "family": info.family,
        "distribution": info.distribution,
        "version": info.version,
        "module_api": info.module_api,
        "status": status,
        "error": error,
    }
