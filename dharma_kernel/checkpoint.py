"""Saved model directories: Hugging Face layout, safetensors only, a lock of the plugins used."""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

from packaging.version import InvalidVersion, Version

from . import registry
from .catalogue import distribution_for
from .errors import DharmaError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
WEIGHTS = "model.safetensors"


def make_lock(layout: dict[str, Any]) -> list[dict[str, str | None]]:
    """Distribution, version and MODULE_API of every plugin the layout uses."""
    entries = [("module", spec["ref"]) for spec in layout.get("modules", [])]
    entries += [("head", spec["plugin"]) for spec in layout.get("heads", [])]
    lock = []
    for kind, ref in entries:
        info = registry.resolve(ref, kind)
        lock.append(
            {
                "kind": kind,
                "ref": info.ref,
                "distribution": info.distribution,
                "version": info.version,
                "module_api": info.module_api,
            }
        )
    return lock


def check_lock(lock: list[dict[str, Any]]) -> None:
    """Every locked plugin is installed at a compatible version: else a DharmaError saying what to install."""
    problems = []
    for entry in lock:
        want = (
            f"{entry['distribution']}=={entry['version']}" if entry.get("version") else entry["distribution"]
        )
        try:
            info = registry.resolve(entry["ref"], entry["kind"])
        except DharmaError:
            dist = entry.get("distribution") or distribution_for(entry["ref"], entry["kind"])
            problems.append(f"{entry['ref']} is not installed; run: pip install '{want or dist}'")
            continue
        saved, installed = _version(entry.get("version")), _version(info.version)
        if saved is None or installed is None or saved == installed:
            continue
        if saved.major != installed.major or (saved.major == 0 and saved.minor != installed.minor):
            problems.append(
                f"{entry['ref']} was saved with {entry['distribution']} {saved}, "
                f"but {installed} is installed; run: pip install '{want}'"
            )
        else:
            warnings.warn(
                f"{entry['ref']}: saved with {entry['distribution']} {saved}, loading with {installed}",
                stacklevel=3,
            )
    if problems:
        raise DharmaError("cannot load this model:\n  " + "\n  ".join(problems))


def _version(text: str | None) -> Version | None:
    try:
        return Version(text) if text else None
    except InvalidVersion:
        return None


def check_directory(path: str | Path) -> None:
    """Refuse a local directory whose weights are pickles; check its plugin lock."""
    directory = Path(path)
    if not directory.is_dir():
        return  # a hub id: transformers resolves it, safetensors only
    if not (directory / WEIGHTS).exists():
        pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise DharmaError(
                f"{directory}: weights are pickled ({', '.join(pickles)}); Dharma loads safetensors only, "
                "because unpickling can run arbitrary code",
                hint="Convert them where you trust the file: load with torch and save_pretrained(...) again.",
            )
        raise DharmaError(f"{directory}: no {WEIGHTS}; is this a saved Dharma model directory?")
    config_path = directory / "config.json"
    if config_path.exists():
        config = json.loads(config_path.read_text())
        check_lock(config.get("lock") or [])


def save(model: Any, directory: str | Path, tokenizer: Any = None) -> Path:
    """Write ``directory`` atomically: a crash mid-save leaves the previous contents intact."""
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        _replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _replace(staging: Path, target: Path) -> None:
    if not target.exists():
        staging.rename(target)
        return
    retired = target.with_name(f".{target.name}.old")
    shutil.rmtree(retired, ignore_errors=True)
    target.rename(retired)
    staging.rename(target)
    shutil.rmtree(retired, ignore_errors=True)
