"""Fake installed distributions: a ``.dist-info`` with entry points in a directory on sys.path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def install(
    site: Path,
    dist: str,
    entries: dict[str, dict[str, str]],
    sources: dict[str, str] | None = None,
    version: str = "0.1",
) -> None:
    """``<dist>-<version>.dist-info`` with ``entries`` as entry points, plus ``sources`` as module files."""
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    lines = []
    for group, items in entries.items():
        lines += [f"[{group}]", *(f"{name} = {value}" for name, value in items.items()), ""]
    (info / "entry_points.txt").write_text("\n".join(lines))
    for module, source in (sources or {}).items():
        (site / f"{module}.py").write_text(source)


def run_dharma(
    site: Path | None,
    *args: str,
    code: str | None = None,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
):
    """``python -m dharma_kernel ARGS`` (or ``python -c CODE``) with ``site`` on the path, output piped.

    ``env`` adds to (or, where a value is None, removes from) the environment.
    """
    env = {**os.environ, "NO_COLOR": "1", **(env or {})}
    env = {key: value for key, value in env.items() if value is not None}
    env.pop("COLUMNS", None)
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(site) if site else None, os.environ.get("PYTHONPATH")])
    )
    command = [sys.executable, "-c", code] if code else [sys.executable, "-m", "dharma_kernel", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, cwd=cwd)
