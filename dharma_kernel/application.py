"""Application directories: what fine-tuning changed, on top of a foundation model it names.

    apps/classifier/
      application.json      foundation path and sha256, head specs, plugin lock, trainable names, manifest
      adapter.safetensors   the head weights and every parameter that was trainable
      tokenizer files

Like a PEFT adapter: small, and only meaningful with its foundation, whose weights
must hash to the recorded sha256. ``--merge`` writes a standalone model directory
instead (:func:`dharma_kernel.checkpoint.save`). Loading never unpickles.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError

from .checkpoint import LockEntry, SavedJson, load_saved_tokenizer, write_directory
from .errors import DharmaError, first_line
from .module_set import warn_if_changed
from .padding import save_tokenizer

APPLICATION_FILE = "application.json"
ADAPTER_FILE = "adapter.safetensors"
FORMAT = "dharma-application/1"


def is_application(path: str | Path) -> bool:
    return (Path(path) / APPLICATION_FILE).is_file()


def foundation_checksum(directory: str | Path) -> str:
    """sha256 over the model directory's safetensors files, in name order (one file: its own sha256)."""
    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise DharmaError(f"{directory}: no safetensors weights to check the foundation against")
    digest = hashlib.sha256()
    for path in files:
        with path.open("rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


def add_heads(model: Any, specs: list[dict[str, Any]]) -> None:
    """Build each head of ``specs`` (``{"plugin", "config"}``) onto ``model`` and into its layout and lock."""
    from .backbone import hidden_size
    from .checkpoint import make_lock
    from .model import build_head

    layout = dict(model.config.layout or {})
    heads = [spec for spec in layout.get("heads", []) if spec["plugin"] not in {s["plugin"] for s in specs}]
    width = hidden_size(model.config.text_config)
    device = next(model.parameters()).device
    for spec in specs:
        require_head(spec["plugin"])
        model.heads[spec["plugin"]] = build_head(spec, width).to(device)
        heads.append(spec)
    layout["heads"] = heads
    model.config.layout = layout
    model.config.lock = make_lock(layout)


def require_head(name: str) -> None:
    """The head plugin ``name`` is installed, else a DharmaError saying what to pip install."""
    from . import registry
    from .catalogue import distribution_for

    try:
        registry.resolve(name, "head")
    except DharmaError:
        if off := registry.why_disabled(name, "head"):
            raise DharmaError(f"this needs the head plugin '{name}', which {off}") from None
        raise DharmaError(
            f"this needs the head plugin '{name}', which is not installed",
            hint=f"pip install {distribution_for(name, 'head')}",
        ) from None


def save_application(
    model: Any,
    directory: str | Path,
    foundation: str | Path,
    trainable: list[str],
    tokenizer: Any = None,
) -> Path:
    """Write the application: head weights, the ``trainable`` parameters and the foundation's reference."""
    from safetensors.torch import save_file

    target = Path(directory).resolve()
    foundation = Path(foundation).resolve()
    heads = tuple(f"heads.{name}." for name in model.heads)
    keep = set(trainable)
    tensors = {
        name: param.detach().cpu().contiguous()
        for name, param in model.named_parameters()
        if name in keep or name.startswith(heads)
    }
    info = {
        "format": FORMAT,
        "foundation": os.path.relpath(foundation, target),
        "foundation_absolute": str(foundation),
        "foundation_sha256": foundation_checksum(foundation),
        "heads": (model.config.layout or {}).get("heads", []),
        "lock": [entry for entry in (model.config.lock or []) if entry["kind"] == "head"],
        "trainable": sorted(tensors),
        "manifest": model.config.manifest,
    }

    def write(staging: Path) -> None:
        save_file(tensors, str(staging / ADAPTER_FILE), metadata={"format": FORMAT})
        (staging / APPLICATION_FILE).write_text(json.dumps(info, indent=2))
        if tokenizer is not None:
            save_tokenizer(tokenizer, staging)

    write_directory(target, write, lambda d: (d / APPLICATION_FILE).exists(), "an application directory")
    return target


class HeadEntry(SavedJson):
    plugin: str = Field(min_length=1)
    config: dict[str, Any] = {}


class ApplicationInfo(SavedJson):
    """``application.json``, as :func:`save_application` writes it."""

    format: Literal[FORMAT]
    foundation: str = Field(min_length=1)
    foundation_absolute: str | None = None
    foundation_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    heads: list[HeadEntry] = []
    lock: list[LockEntry] = []
    trainable: list[str] = []
    manifest: dict[str, Any] | None = None


def read_application(directory: str | Path) -> dict[str, Any]:
    """``application.json`` checked against :class:`ApplicationInfo`; a damaged one names its field."""
    from .validation import format_validation_error

    path = Path(directory) / APPLICATION_FILE
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as err:  # ValueError: not UTF-8, or not JSON
        raise DharmaError(f"{path}: unreadable ({first_line(err)})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        found = info.get("format") if isinstance(info, dict) else type(info).__name__
        raise DharmaError(f"{path}: not a {FORMAT} file (format {found!r})")
    try:
        return ApplicationInfo.model_validate(info).model_dump()
    except ValidationError as err:
        raise DharmaError(
            format_validation_error(err, model=ApplicationInfo, source=str(path)),
            hint="The file is damaged; fine-tune again, or restore it from a copy.",
        ) from None


def find_foundation(directory: Path, info: dict[str, Any]) -> Path:
    """The foundation the application names: relative to it, else the absolute path recorded."""
    recorded = [Path(info["foundation_absolute"])] if info["foundation_absolute"] else []
    for candidate in (directory / info["foundation"], *recorded):
        if (candidate / "config.json").exists():
            return candidate.resolve()
    raise DharmaError(
        f"{directory}: its foundation model {info['foundation']} "
        f"(at fine-tuning: {info.get('foundation_absolute')}) is missing",
        hint="Put the foundation back where it was, or load the merged model (dharma finetune --merge).",
    )


def load_application(path: str | Path) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from an application, a saved model or a run directory (its best)."""
    from .model import DharmaModel
    from .train.rundir import model_directory

    directory = Path(path)
    if not is_application(directory):
        directory = model_directory(directory)
        model = DharmaModel.from_pretrained(directory)
        warn_if_changed(directory, model.module_refs, model.config.manifest)
        return model, load_saved_tokenizer(directory)
    info = read_application(directory)
    for spec in info["heads"]:
        require_head(spec["plugin"])
    foundation = find_foundation(directory, info)
    checksum = foundation_checksum(foundation)
    if checksum != info["foundation_sha256"]:
        raise DharmaError(
            f"{directory} was fine-tuned from a different foundation: {foundation} has weights with sha256 "
            f"{checksum[:16]}..., the application expects {info['foundation_sha256'][:16]}...",
            hint="Use the foundation it was fine-tuned from, or fine-tune again from this one.",
        )
    model = DharmaModel.from_pretrained(foundation)
    warn_if_changed(foundation, model.module_refs, model.config.manifest)
    add_heads(model, info["heads"])
    _load_adapter(model, directory / ADAPTER_FILE, info["trainable"])
    model.config.manifest = info["manifest"]
    return model, load_saved_tokenizer(directory)


def _load_adapter(model: Any, path: Path, trainable: list[str]) -> None:
    """The adapter's tensors into ``model``: exactly the ``trainable`` ones its application lists."""
    from .weights import check_fit, read_tensors

    tensors = read_tensors(path)
    params = dict(model.named_parameters())
    shapes = [(n, t.shape, params[n].shape) for n, t in tensors.items() if n in params]
    check_fit(
        path,
        missing=sorted(set(trainable) - set(tensors)),
        unexpected=sorted(set(tensors) - set(params)),
        mismatched=[(name, found, want) for name, found, want in shapes if found != want],
    )
    model.load_state_dict(tensors, strict=False)
