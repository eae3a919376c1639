"""The cache of prepared data, shared by all runs and keyed by a fingerprint of what the data is made of.

    data = prepared_data(manifest, paths, strict, refs, text_config, console=console)

The fingerprint covers every input file (path, size, modification time), the settings
that change what is read, kept or packed (``data.*``, ``train.seed``), the tokenizer
(its training settings, or a digest of a given one), the modules whose concept labels
are stored (with their lexicons), the plugin readers, and a digest of the kernel's data
code. When one of them changes, the data is prepared again and the reason is said. The cache lives in
``$DHARMA_CACHE`` or else the user cache directory (``$XDG_CACHE_HOME/dharma``, else
``~/.cache/dharma``), one directory per fingerprint under ``prepared/``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import DharmaError
from ..manifest import Manifest, TrainedTokenizer
from .dataset import training_paths
from .paths import expand_paths
from .prepare import FORMAT, META, Prepared, open_prepared, prepare, tokenizer_hash

__all__ = ["cache_root", "data_inputs", "fingerprint", "is_prepared", "prepare_into", "prepared_data"]


def cache_root() -> Path:
    """``$DHARMA_CACHE``, else ``$XDG_CACHE_HOME/dharma``, else ``~/.cache/dharma``."""
    if os.environ.get("DHARMA_CACHE"):
        return Path(os.environ["DHARMA_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dharma"


def is_prepared(path: str | Path) -> bool:
    return (Path(path) / META).is_file()


def data_inputs(
    manifest: Manifest,
    paths: Sequence[str | Path] | None,
    strict: bool | None,
    refs: Sequence[str],
    tokenizer: dict[str, Any],
) -> dict[str, Any]:
    """What the prepared data depends on, as plain JSON (see the module's docstring)."""
    from .plugin_readers import plugin_readers

    train = training_paths(manifest, paths)
    evaluation = [manifest.resolve_path(path) for path in manifest.data.eval]
    data = manifest.data
    return {
        "format": FORMAT,
        "train": _files(train),
        "eval": _files(evaluation),
        "settings": {
            "strict": data.strict if strict is None else strict,
            "min_chars": data.min_chars,
            "eval_fraction": data.eval_fraction,
            "max_length": data.max_length,
            "seed": manifest.train.seed,
        },
        "tokenizer": tokenizer,
        "modules": _modules(refs),
        "readers": sorted(type(reader).__qualname__ for reader in plugin_readers()),
        "code": _code_digest(),
    }


def _code_digest() -> str:
    """A digest of the code that decides the prepared bytes (reading, cleaning, splitting, packing,
    concept labels), so a changed kernel prepares again instead of reusing stale rows."""
    from .. import concepts

    here = Path(__file__).parent
    files = sorted(here.glob("*.py")) + [Path(concepts.__file__)]
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def fingerprint(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:24]


def prepared_data(
    manifest: Manifest,
    paths: Sequence[str | Path] | None = None,
    strict: bool | None = None,
    refs: Sequence[str] = (),
    text_config: Any | None = None,
    tokenizer: Any | None = None,
    console: Any | None = None,
    prepare_here: bool = True,
) -> Prepared:
    """The manifest's data prepared: from ``--data DIR`` when that is a prepared directory, else
    from the cache, prepared there first when no entry matches the fingerprint.

    ``tokenizer``: a resumed run's; an entry prepared with another tokenizer is not used.
    ``prepare_here`` False (a distributed run's other processes) only opens the entry the main
    process made.
    """
    if paths and len(paths) == 1 and is_prepared(paths[0]):
        return _given(Path(paths[0]), manifest, refs, tokenizer)
    spec = _tokenizer_spec(manifest, text_config)
    inputs = data_inputs(manifest, paths, strict, refs, spec)
    directory = cache_root() / "prepared" / fingerprint(inputs)
    wanted = tokenizer_hash(tokenizer) if tokenizer is not None else None
    if wanted is not None and _tokenizer_of(directory) != wanted:
        # No entry made with the resumed run's tokenizer under these settings: key it by the tokenizer.
        inputs = {**inputs, "tokenizer": {"given": wanted}}
        directory = cache_root() / "prepared" / fingerprint(inputs)
    if is_prepared(directory):
        if console is not None:
            console.print(f"prepared data: {directory} (reused)", highlight=False)
        data = open_prepared(directory, tokenizer)
        data.reused = True
        return data
    if not prepare_here:
        raise DharmaError(f"{directory}: the main process did not prepare the data")
    if console is not None:
        console.print(f"preparing data in {directory}: {_why(inputs)}", highlight=False)
    directory.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(directory.parent)
    prepare(manifest, directory, paths=paths, strict=strict, refs=refs, text_config=text_config,
            tokenizer=tokenizer, inputs=inputs, console=console)  # fmt: skip
    return open_prepared(directory, tokenizer)


def prepare_into(
    manifest: Manifest,
    directory: Path,
    paths: Sequence[str | Path] | None = None,
    strict: bool | None = None,
    refs: Sequence[str] = (),
    text_config: Any | None = None,
    console: Any | None = None,
) -> Prepared:
    """The manifest's data prepared in ``directory`` (``dharma prepare -o``), or what is there
    already when its fingerprint matches (then ``reused`` is set). A directory that holds anything
    else is refused, so nothing is overwritten."""
    inputs = data_inputs(manifest, paths, strict, refs, _tokenizer_spec(manifest, text_config))
    if is_prepared(directory):
        data = open_prepared(directory)
        if data.meta.get("inputs") == inputs:
            data.reused = True
            return data
        raise DharmaError(
            f"{directory} holds data prepared from other inputs",
            hint="Remove it to prepare it again, or give another -o DIR.",
        )
    if directory.exists() and any(directory.iterdir()):
        raise DharmaError(
            f"{directory} exists and is not a prepared data directory",
            hint="Give -o a new or empty directory.",
        )
    if directory.exists():
        directory.rmdir()
    directory.parent.mkdir(parents=True, exist_ok=True)
    prepare(manifest, directory, paths=paths, strict=strict, refs=refs, text_config=text_config,
            inputs=inputs, console=console)  # fmt: skip
    return open_prepared(directory)


def _given(directory: Path, manifest: Manifest, refs: Sequence[str], tokenizer: Any | None) -> Prepared:
    """A directory from ``dharma prepare``, checked against what the run needs."""
    data = open_prepared(directory, tokenizer)
    meta = data.meta
    if meta["max_length"] != manifest.data.max_length:
        raise DharmaError(
            f"--data {directory}: prepared with max_length {meta['max_length']}, "
            f"the manifest asks for {manifest.data.max_length}",
            hint="Prepare it again with this manifest (`dharma prepare`), or set data.max_length to match.",
        )
    if list(meta["refs"]) != list(refs):
        raise DharmaError(
            f"--data {directory}: prepared for the modules {meta['refs'] or 'none'}, "
            f"the model has {list(refs) or 'none'}",
            hint="Prepare it again with this manifest: `dharma prepare MANIFEST -o DIR`.",
        )
    if tokenizer is not None and meta.get("tokenizer_hash") != tokenizer_hash(tokenizer):
        raise DharmaError(
            f"--data {directory}: prepared with another tokenizer than the run being resumed",
            hint="Resume without --data (the data is then prepared with the run's tokenizer).",
        )
    return data


def _remove_abandoned(root: Path) -> None:
    """Staging directories of preparations whose process is gone (killed while preparing)."""
    import shutil

    for path in root.glob("*.tmp-*"):
        pid = path.name.rpartition("-")[2]
        if pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # another user's process
    return True


def _files(paths: list[Path]) -> list[list[Any]]:
    found = []
    for path in expand_paths(paths):
        try:
            stat = path.stat()
        except OSError:
            continue  # reading it will report it
        found.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
    return found


def _modules(refs: Sequence[str]) -> dict[str, str]:
    """Each module ref and a digest of its lexicon, whose hits become concept labels."""
    if not refs:
        return {}
    from ..concepts import lexicons_for

    return {
        ref: hashlib.sha256("\n".join(lexicon.terms).encode()).hexdigest()[:16]
        for ref, lexicon in lexicons_for(refs).items()
    }


def _tokenizer_spec(manifest: Manifest, text_config: Any | None) -> dict[str, Any]:
    """The tokenizer the data would be tokenized with: a digest of a given one, or the settings
    of the one trained on it (which the same text and settings reproduce exactly)."""
    from ..assemble import load_tokenizer

    given = load_tokenizer(manifest)
    if given is not None:
        return {"given": tokenizer_hash(given)}
    spec = manifest.backbone.tokenizer
    if text_config is None:
        from .tokenizer import _backbone_config

        text_config = _backbone_config(manifest)
    wanted = spec.vocab_size if isinstance(spec, TrainedTokenizer) else None
    return {
        "train": True,
        "vocab_size": wanted if wanted is not None else int(text_config.vocab_size),
        "min_frequency": spec.min_frequency if isinstance(spec, TrainedTokenizer) else 2,
        "max_training_chars": (
            spec.max_training_chars if isinstance(spec, TrainedTokenizer) else TrainedTokenizer.DEFAULT_CHARS
        ),
    }


def _tokenizer_of(directory: Path) -> str | None:
    try:
        return json.loads((directory / META).read_text(encoding="utf-8")).get("tokenizer_hash")
    except (OSError, ValueError):
        return None


def _why(inputs: dict[str, Any]) -> str:
    """What differs from the newest cache entry made from the same files, in a few words."""
    entries = []
    for meta_path in (cache_root() / "prepared").glob(f"*/{META}"):
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        old = meta.get("inputs") or {}
        same_files = {f[0] for f in old.get("train", [])} & {f[0] for f in inputs["train"]}
        if same_files:
            entries.append((meta_path.stat().st_mtime, old))
    if not entries:
        return "no prepared data for these inputs yet"
    old = max(entries, key=lambda entry: entry[0])[1]
    reasons = []
    for side in ("train", "eval"):
        before = {f[0]: f[1:] for f in old.get(side, [])}
        now = {f[0]: f[1:] for f in inputs[side]}
        reasons += [f"{path} changed" for path in now if path in before and before[path] != now[path]]
        reasons += [f"{path} is new" for path in now if path not in before]
        reasons += [f"{path} is gone" for path in before if path not in now]
    for key in ("settings", "tokenizer", "modules", "readers", "format", "code"):
        if key == "settings":
            reasons += [
                f"{name} changed ({old.get('settings', {}).get(name)!r} -> {value!r})"
                for name, value in inputs["settings"].items()
                if old.get("settings", {}).get(name) != value
            ]
        elif old.get(key) != inputs[key]:
            reasons.append(f"the {key} changed")
    if not reasons:
        return "no prepared data for these inputs yet"
    shown = "; ".join(reasons[:3])
    return shown + (f"; and {len(reasons) - 3} more" if len(reasons) > 3 else "")
