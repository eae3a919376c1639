"""``dharma new-plugin``: write a complete module or head distribution to start a plugin from."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer

from .. import registry
from ..catalogue import FAMILIES, STANDARD_HEADS, family_problem, standard_refs
from ..errors import DharmaError
from ..plugin_template import Plugin, render
from .options import Kind
from .output import out

_NAME = re.compile(r"[a-z][a-z0-9_]*")


def plan_plugin(name: str, kind: str = "module", family: str | None = None) -> Plugin:
    """The plugin ``name`` would be, or a DharmaError when the name is invalid or taken."""
    if not _NAME.fullmatch(name) or name.endswith("_") or "__" in name:
        fixed = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
        fixed = fixed if _NAME.fullmatch(fixed or "-") else f"x_{fixed}".rstrip("_")
        raise DharmaError(
            f"plugin name '{name}' is not a lower-case identifier (a-z, digits and single underscores, "
            "starting with a letter)",
            hint=f"try: dharma new-plugin {fixed}",
        )
    if kind == "head":
        if family is not None:
            raise DharmaError("--family is for modules; a head's ref is its name alone")
        taken = {info.ref for info in registry.discover("head", disabled=True)} | set(STANDARD_HEADS)
        if name in taken:
            raise DharmaError(
                f"a head named '{name}' is already installed or standard", hint="choose another name"
            )
        return Plugin("head", name, None, f"dharma-head-{name.replace('_', '-')}", f"dharma_head_{name}")
    if family is not None and family_problem(family):
        new = sorted(set(registry.families()) - set(FAMILIES))
        raise DharmaError(
            family_problem(family),
            hint=f"standard families are: {', '.join(FAMILIES)}"
            + (f"; installed plugins add: {', '.join(new)}" if new else "")
            + "; any other lower-case name (not one letter from these) starts a new family",
        )
    installed = registry.discover("module", disabled=True)
    refs = sorted({*standard_refs(), *(info.ref for info in installed)})
    same_name = [ref for ref in refs if ref.split(".", 1)[1] == name]
    if family is None and same_name:
        raise DharmaError(
            f"module name '{name}' is taken by {' and '.join(same_name)}",
            hint=f"choose another name, or a family where it is free: --family {_free_family(name, refs)}",
        )
    family = family or "paths"
    if f"{family}.{name}" in refs:
        raise DharmaError(
            f"module '{family}.{name}' is already installed or standard",
            hint=f"choose another name, or another family: --family {_free_family(name, refs)}",
        )
    # The short name is taken in another family: the distribution names both, as yoga-darshana does.
    dists = {info.distribution for info in installed} | {f"dharma-plugin-{r.split('.')[1]}" for r in refs}
    stem = name if f"dharma-plugin-{name.replace('_', '-')}" not in dists else f"{name}_{family}"
    return Plugin("module", name, family, f"dharma-plugin-{stem.replace('_', '-')}", f"dharma_plugin_{stem}")


def _free_family(name: str, refs: list[str]) -> str:
    return next((f for f in FAMILIES if f"{f}.{name}" not in refs), FAMILIES[0])


def write_plugin(plugin: Plugin, directory: Path) -> list[Path]:
    """Write the distribution into ``directory`` (new or empty); the files written."""
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise DharmaError(
            f"{directory} exists and is not empty; refusing to write into it",
            hint="choose another directory with -o, or remove that one yourself",
        )
    written = []
    for relative, text in render(plugin).items():
        path = directory / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def new_plugin(
    name: Annotated[str, typer.Argument(help="The plugin's name: a lower-case identifier, e.g. tarka.")],
    kind: Annotated[Kind, typer.Option(help="Write a module or a task head.")] = Kind.module,
    family: Annotated[
        str | None,
        typer.Option(
            help=f"The module's family: a standard one ({', '.join(FAMILIES)}), "
            "one an installed plugin declares, or a new name; default paths."
        ),
    ] = None,
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Directory to write (default: ./<distribution>).")
    ] = None,
) -> None:
    """Write a complete plugin distribution: pyproject.toml, the class, a README and conformance tests."""
    plugin = plan_plugin(name, kind.value, family)
    directory = output or Path(plugin.distribution)
    written = write_plugin(plugin, directory)
    out.print(f"wrote {plugin.kind} {plugin.ref} as {plugin.distribution} in {directory}:")
    for path in written:
        out.print(f"  {path}")
    out.print(f"next: pip install -e {directory} && pytest {directory} && dharma plugins --check")
