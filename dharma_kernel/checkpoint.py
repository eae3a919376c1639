"""Saved model directories: Hugging Face layout, safetensors only, a lock of the plugins used."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from packaging.version import InvalidVersion, Version
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from . import registry
from .catalogue import distribution_for
from .errors import DharmaError, first_line
from .hub import write_card
from .padding import save_tokenizer
from .weights import check_safetensors

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
WEIGHTS = ("model.safetensors", "model.safetensors.index.json")  # one file, or shards


class LockWarning(UserWarning):
    """A saved model's plugin is installed at another compatible version (same major, or minor below 1.0)."""


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
        dist = entry.get("distribution") or distribution_for(entry["ref"], entry["kind"])
        want = f"{dist}=={entry['version']}" if entry.get("version") else dist
        try:
            info = registry.resolve(entry["ref"], entry["kind"])
        except DharmaError:
            off = registry.why_disabled(entry["ref"], entry["kind"])
            problems.append(f"{entry['ref']} {off or f'is not installed; run: pip install {want!r}'}")
            continue
        saved_api, installed_api = entry.get("module_api"), info.module_api
        if saved_api and installed_api and saved_api.split(".")[0] != installed_api.split(".")[0]:
            problems.append(
                f"{entry['ref']} was saved with MODULE_API {saved_api}, the installed {dist} speaks "
                f"{installed_api}; run: pip install '{want}'"
            )
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
                f"{entry['ref']}: saved with {entry['distribution']} {saved}, loading with {installed}; "
                f"for the version it was saved with: pip install '{want}'",
                LockWarning,
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
        return  # a hub id: transformers resolves it (safetensors only); plugins are checked as they load
    if not any((directory / name).exists() for name in WEIGHTS):
        pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise DharmaError(
                f"{directory}: weights are pickled ({', '.join(pickles)}); Dharma loads safetensors only, "
                "because unpickling can run arbitrary code",
                hint="Convert them where you trust the file: load with torch and save_pretrained(...) again.",
            )
        raise DharmaError(f"{directory}: no model.safetensors; is this a saved Dharma model directory?")
    config = read_config(directory)
    check_saved_config(directory / "config.json", config)
    check_lock(config.get("lock") or [])
    for weights in sorted(directory.glob("*.safetensors")):
        check_safetensors(weights)


def weights_path(path: str | Path) -> str:
    """What a load error should name: the one weights file of a directory, else the path given."""
    single = Path(path) / WEIGHTS[0]
    return str(single) if single.is_file() else str(path)


def read_config(directory: Path) -> dict[str, Any]:
    """``config.json`` of a model directory, or a DharmaError saying what is wrong with it."""
    path = directory / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise DharmaError(f"{directory}: no config.json; is this a saved Dharma model directory?") from None
    except (OSError, ValueError) as err:  # ValueError: not UTF-8, or not JSON
        raise DharmaError(f"{path}: unreadable ({first_line(err)})") from None
    if not isinstance(config, dict):
        raise DharmaError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


class SavedJson(BaseModel):
    """A record of a JSON file Dharma wrote. Strict: JSON values are already typed, so a string
    where a list belongs is damage, not something to convert."""

    model_config = ConfigDict(extra="forbid", strict=True)


class LockEntry(SavedJson):
    kind: Literal["module", "head"]
    ref: str = Field(min_length=1)
    distribution: str | None = None
    version: str | None = None
    module_api: str | None = None


class _TextConfig(BaseModel):
    # The backbone's own keys are transformers' to check.
    model_config = ConfigDict(extra="allow", strict=True)
    model_type: str = Field(min_length=1)


class SavedConfig(BaseModel):
    """The keys of a saved model's ``config.json`` that Dharma writes and reads itself."""

    model_config = ConfigDict(extra="allow", strict=True)
    model_type: Literal["dharma"]
    text_config: _TextConfig
    layout: dict[str, Any] | None = None
    manifest: dict[str, Any] | None = None
    lock: list[LockEntry] | None = None


def check_saved_config(path: Path, config: dict[str, Any]) -> None:
    """A damaged ``config.json`` is a DharmaError naming the key, before transformers reads it."""
    from .validation import format_validation_error

    try:
        SavedConfig.model_validate(config)
    except ValidationError as err:
        raise DharmaError(
            format_validation_error(err, model=SavedConfig, source=str(path)).splitlines()[0],
            hint="The file is damaged; restore it from a copy, or load an earlier checkpoint.",
        ) from None


def is_model_directory(path: Path) -> bool:
    try:
        return read_config(path).get("model_type") == "dharma"
    except DharmaError:
        return False


def save(
    model: Any,
    directory: str | Path,
    tokenizer: Any = None,
    extra: Callable[[Path], None] | None = None,
    state_dict: dict[str, Any] | None = None,
) -> Path:
    """Write ``directory`` so a failure while writing leaves what was there untouched.

    The model is written beside the target, then swapped in by two renames. Only a
    missing path, an empty directory or a saved Dharma model is ever replaced.
    ``extra(staging)`` may add files (training state) that must appear with the model
    or not at all. ``state_dict``: the weights to write instead of the model's own (a sharded
    model's, gathered).
    """
    target = Path(directory).resolve()

    def write(staging: Path) -> None:
        model.save_pretrained(staging, safe_serialization=True, state_dict=state_dict)
        if tokenizer is not None:
            save_tokenizer(tokenizer, staging)
        write_card(staging, model.config, source=target)  # README.md: manifest, plugins, data, metrics
        if extra is not None:
            extra(staging)

    weights = state_dict if state_dict is not None else model.state_dict()
    write_directory(target, write, is_model_directory, "a saved Dharma model", needs=tensor_bytes(weights))
    return target


def tensor_bytes(tensors: dict[str, Any]) -> int:
    """Bytes the tensors take, a storage shared by several names (a tied embedding) counted once."""
    storages = {}
    for tensor in tensors.values():
        if hasattr(tensor, "untyped_storage"):
            storage = tensor.untyped_storage()
            storages[(storage.data_ptr(), tensor.device)] = storage.nbytes()
    return sum(storages.values())


def write_directory(target: Path, write: Callable[[Path], None], replaceable: Callable[[Path], bool],
                    what: str, needs: int | None = None) -> None:  # fmt: skip
    """``write(staging)`` fills a directory beside ``target`` that then replaces it by two renames,
    so a failure at any point leaves what was there untouched. Only a missing path, an empty
    directory or one that ``replaceable`` accepts (``what`` names it) is ever replaced.
    ``needs``: bytes the write needs at least (the weights), for the message of a full disk."""
    if target.exists() and not (target.is_dir() and (not any(target.iterdir()) or replaceable(target))):
        raise DharmaError(
            f"{target} exists and is not {what}; refusing to replace it",
            hint="Choose another output directory, or remove that one yourself.",
        )
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    except OSError as err:
        raise DharmaError(f"cannot write {target}: {first_line(err)}") from None
    try:
        mask = _umask()
        staging.chmod(0o777 & ~mask)  # mkdtemp makes it private; a model directory is not
        write(staging)
        for path in staging.iterdir():  # nor its files (safetensors writes its weights private)
            if path.is_file():
                path.chmod(0o666 & ~mask)
        _replace(staging, target)
    except BaseException as err:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(err, Exception) and _disk_full(err, target.parent, needs):
            free = shutil.disk_usage(target.parent).free / 2**20
            need = f"at least {needs / 2**20:,.1f} MiB for the weights" if needs else "more than was free"
            raise DharmaError(
                f"no space left on device writing {target}: it needs {need}, {free:,.1f} MiB free there",
                hint="Free some space (a lower train.keep_last keeps fewer checkpoints), then try again; "
                "what was saved before is untouched.",
            ) from None
        if isinstance(err, OSError):
            raise DharmaError(f"cannot write {target}: {first_line(err)}") from None
        raise


def _disk_full(err: Exception, where: Path, needs: int | None) -> bool:
    """Whether a failed write ran out of space. safetensors reports it as a SafetensorError
    ("os error 28"), torch.save as a RuntimeError without the cause ("unexpected pos", "file
    write failed"): those count when the filesystem now has less free than the write needs."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err)
    if "os error 28" in text or "No space left on device" in text:
        return True
    if needs and ("unexpected pos" in text or "file write failed" in text):
        return shutil.disk_usage(where).free < needs
    return False


def load_saved_tokenizer(directory: Path) -> Any:
    """The tokenizer saved in a model or application directory, or a DharmaError saying there is none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError):
        raise DharmaError(
            f"{directory} was saved without a tokenizer",
            hint="`dharma train` saves one with every checkpoint; "
            "for `dharma assemble`, set backbone.tokenizer.",
        ) from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _replace(staging: Path, target: Path) -> None:
    if not target.exists():
        staging.rename(target)
        return
    retired = target.with_name(f".{target.name}.old")
    shutil.rmtree(retired, ignore_errors=True)
    target.rename(retired)
    staging.rename(target)
    shutil.rmtree(retired, ignore_errors=True)
