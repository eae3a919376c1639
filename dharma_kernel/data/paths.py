"""Turning the paths a user names (files, directories, globs) into the files to read."""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable
from pathlib import Path

from ..errors import DharmaError

__all__ = ["expand_paths"]


def expand_paths(paths: Iterable[str | Path]) -> list[Path]:
    """Every file the paths name, each once, in the order given.

    A directory gives its files recursively, sorted, without hidden files or
    directories; a glob (``data/**/*.jsonl``) gives its matches, sorted.
    """
    files: list[Path] = []
    seen: set[Path] = set()
    for given in paths:
        for path in _expand(given):
            if path.resolve() not in seen:
                seen.add(path.resolve())
                files.append(path)
    return files


def _expand(given: str | Path) -> list[Path]:
    path = Path(given)
    if path.is_dir():
        return _walk(path)
    if path.exists():
        return [path]
    if any(char in str(given) for char in "*?["):
        matches = [Path(match) for match in sorted(glob.glob(str(given), recursive=True))]
        if not matches:
            raise DharmaError(f"{given}: no files match this pattern")
        return [file for match in matches for file in (_walk(match) if match.is_dir() else [match])]
    raise DharmaError(f"{given}: no such file or directory")


def _walk(directory: Path) -> list[Path]:
    found = []
    for root, dirs, names in os.walk(directory):
        dirs[:] = [name for name in dirs if not name.startswith(".")]
        found += [Path(root, name) for name in names if not name.startswith(".")]
    return sorted(found, key=lambda path: path.relative_to(directory).parts)
