"""What a saved model says about itself: its card (README.md), written on every save and pushed with it.

The card lists the manifest (as TOML), every plugin with its distribution and version
(from the config's lock), the data, the metrics of the run that produced it, and the
commands that reproduce it. Metrics come from the run directory when the model is a
step checkpoint of one (``<run>/checkpoints/step-N``): ``metrics.jsonl`` up to step N,
and ``eval_results.json`` where there is one.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

from .padding import save_tokenizer
from .version import __version__

CARD = "README.md"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)
_STEP = re.compile(r"step-(\d+)$")
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


# -- where the metrics are ---------------------------------------------------------------------


def run_of(directory: str | Path | None) -> tuple[Path | None, int | None]:
    """The run directory and step of a step checkpoint ``<run>/checkpoints/step-N``, else (None, None)."""
    if directory is None:
        return None, None
    path = Path(directory).resolve()
    match = _STEP.search(path.name)
    if match is None or path.parent.name != "checkpoints":
        return None, None
    return path.parent.parent, int(match.group(1))


def read_metrics(run: Path | None, step: int | None) -> list[dict[str, Any]]:
    """``metrics.jsonl`` records up to ``step`` (unreadable lines skipped)."""
    if run is None or not (run / "metrics.jsonl").is_file():
        return []
    records = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and (step is None or record.get("step", 0) <= step):
            records.append(record)
    return records


def _eval_results(*places: Path | None) -> dict[str, Any]:
    for place in places:
        path = place / "eval_results.json" if place is not None else None
        if path is not None and path.is_file():
            try:
                data = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if isinstance(data, dict):
                return data
    return {}


# -- the card ----------------------------------------------------------------------------------


def model_card(
    config: Any, source: str | Path | None = None, repo_id: str | None = None, tags: list[str] | None = None
) -> str:
    """The card of a model with ``config`` (a DharmaConfig or its dict), saved at ``source``."""
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    manifest = data.get("manifest") or {}
    layout = data.get("layout") or {}
    lock = data.get("lock") or []
    text = data.get("text_config") or {}
    name = (manifest.get("model") or {}).get("name") or "dharma-model"
    run, step = run_of(source)
    families = sorted({entry["ref"].split(".")[0] for entry in lock if entry.get("kind") == "module"})
    parts = [
        _front_matter(list(dict.fromkeys(["dharma", *families, *(tags or [])]))),
        f"# {name}\n",
        _summary(text, layout, data.get("dharma_version") or __version__),
        _loading(repo_id or name),
        _plugins(lock),
        _manifest(manifest),
        _data(manifest),
        _metrics(read_metrics(run, step), _eval_results(run, Path(source) if source else None), step),
        _reproduce(lock, manifest, data.get("dharma_version") or __version__),
    ]
    return "\n".join(part for part in parts if part)


def write_card(
    directory: str | Path,
    config: Any,
    source: str | Path | None = None,
    repo_id: str | None = None,
    tags: list[str] | None = None,
) -> Path:
    """Write the card into ``directory``; ``source``: where the model is (or will be) saved."""
    path = Path(directory) / CARD
    try:
        text = model_card(config, source if source is not None else directory, repo_id, tags)
    except Exception as err:  # a card must never cost a checkpoint
        warnings.warn(f"model card incomplete: {type(err).__name__}: {err}", stacklevel=2)
        text = _front_matter(["dharma"]) + "\nA Dharma model; see config.json for its manifest and plugins.\n"
    path.write_text(text)
    return path


def _front_matter(tags: list[str]) -> str:
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation", "tags:"]
    lines += [f"- {tag}" for tag in tags]
    return "\n".join([*lines, "---", ""])


def _summary(text: dict[str, Any], layout: dict[str, Any], version: str) -> str:
    architecture = text.get("model_type", "?")
    depth = text.get("n_layer") or text.get("num_hidden_layers") or "?"
    width = text.get("n_embd") or text.get("hidden_size") or "?"
    modules = layout.get("modules") or []
    line = f"A Dharma model: a {architecture} backbone ({depth} layers, width {width}, "
    line += f"vocabulary {text.get('vocab_size', '?')})"
    if modules:
        composition = layout.get("composition", "?")
        routed = f", top_k {layout.get('top_k')}" if composition == "routed" else ""
        routed += f", capacity factor {layout['capacity_factor']}" if layout.get("capacity_factor") else ""
        line += f" with {len(modules)} modules after blocks {layout.get('at_layers')}, {composition}{routed}"
    heads = [h["plugin"] for h in layout.get("heads") or []]
    if heads:
        line += f", heads {', '.join(heads)}"
    return f"{line}. Saved by dharma-kernel {version}.\n"


def _loading(where: str) -> str:
    return (
        "## Loading\n\n"
        "Install the plugins listed below (see Reproducing), then:\n\n"
        "```python\n"
        "import dharma_kernel  # registers Dharma models with transformers' Auto classes\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'model = AutoModelForCausalLM.from_pretrained("{where}")\n'
        f'tokenizer = AutoTokenizer.from_pretrained("{where}")\n'
        "```\n"
    )


def _plugins(lock: list[dict[str, Any]]) -> str:
    if not lock:
        return "## Plugins\n\nNone: the bare backbone.\n"
    rows = ["| ref | kind | distribution | version | MODULE_API |", "| --- | --- | --- | --- | --- |"]
    for entry in lock:
        cells = [entry.get(k) or "-" for k in ("ref", "kind", "distribution", "version", "module_api")]
        rows.append("| " + " | ".join(cells) + " |")
    return "## Plugins\n\n" + "\n".join(rows) + "\n"


def _manifest(manifest: dict[str, Any]) -> str:
    if not manifest:
        return ""
    return (
        "## Manifest\n\nThe resolved manifest (defaults filled in); save it as `manifest.toml`.\n\n"
        f"```toml\n{to_toml(manifest)}```\n"
    )


def _data(manifest: dict[str, Any]) -> str:
    data = manifest.get("data") or {}
    if not data:
        return ""
    lines = ["## Data", "", "Paths are relative to the manifest.", ""]
    lines.append(f"- train: {', '.join(data.get('train') or []) or 'none'}")
    if data.get("eval"):
        lines.append(f"- eval: {', '.join(data['eval'])}")
    elif "eval_fraction" in data:
        lines.append(f"- eval: {data['eval_fraction']:g} of the training records, drawn by hash")
    if "max_length" in data:
        lines.append(f"- max_length: {data['max_length']} tokens per packed sequence")
    tokenizer = (manifest.get("backbone") or {}).get("tokenizer")
    if isinstance(tokenizer, dict) and tokenizer.get("train"):
        lines.append(
            f"- tokenizer: byte-level BPE trained on the training text ({tokenizer.get('vocab_size')})"
        )
    elif tokenizer:
        lines.append(f"- tokenizer: {tokenizer}")
    return "\n".join(lines) + "\n"


def _metrics(records: list[dict[str, Any]], results: dict[str, Any], step: int | None) -> str:
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    if not train and not evals and not results:
        return "## Metrics\n\nNone recorded with this model (it was not saved from a training run).\n"
    lines = ["## Metrics", ""]
    if train:
        last = train[-1]
        tokens = sum(r.get("tokens", 0) for r in train)
        lines.append(
            f"Training, from the run's metrics.jsonl up to step {step}: {last['step']} steps, "
            f"{tokens:,.0f} tokens; last loss {_number(last['loss'])}"
            + (f" (lm {_number(last['lm'])})" if "lm" in last else "")
            + "."
        )
        lines.append("")
    if evals:
        rows = ["| step | eval loss | eval perplexity |", "| --- | --- | --- |"]
        rows += [
            f"| {r['step']} | {_number(r['eval_loss'])} | {_number(r.get('eval_ppl'))} |" for r in evals[-20:]
        ]
        best = min(evals, key=lambda r: r["eval_loss"])
        lines += [
            *rows,
            "",
            f"Best eval perplexity {_number(best.get('eval_ppl'))} at step {best['step']}.",
            "",
        ]
    if results:
        lines += ["| eval_results.json | value |", "| --- | --- |"]
        lines += [f"| {key} | {_number(value)} |" for key, value in results.items()]
        lines.append("")
    return "\n".join(lines)


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if math.isfinite(value) and abs(value) < 1e6 else f"{value:.4g}"
    return "-" if value is None else str(value)


def _reproduce(lock: list[dict[str, Any]], manifest: dict[str, Any], version: str) -> str:
    pins = [f"dharma-kernel=={version}"]
    pins += [
        f"{e['distribution']}=={e['version']}" for e in lock if e.get("distribution") and e.get("version")
    ]
    lines = ["## Reproducing", "", "```", f"pip install {' '.join(dict.fromkeys(pins))}"]
    if manifest:
        data = manifest.get("data") or {}
        output = (manifest.get("train") or {}).get("output", "runs/<name>")
        lines.append("dharma train manifest.toml        # the manifest above, beside the data it names")
        if data.get("eval"):
            lines.append(f"dharma eval {output} --data {' '.join(data['eval'])}")
    return "\n".join([*lines, "```", ""])


# -- TOML ------------------------------------------------------------------------------------


def to_toml(data: dict[str, Any]) -> str:
    """``data`` (JSON-like: tables, arrays, strings, numbers, booleans) as TOML that parses back to it.

    Keys are sorted, as config.json stores them, so a loaded model's card is the saved one's.
    """
    lines: list[str] = []
    _table(_sorted(data), [], lines)
    return "\n".join(lines).lstrip("\n") + "\n"


def _table(data: dict[str, Any], path: list[str], lines: list[str]) -> None:
    scalars = {k: v for k, v in data.items() if not _is_table(v) and not _is_table_array(v)}
    if path and (scalars or not data):
        lines += ["", f"[{'.'.join(map(_key, path))}]"]
    lines += [f"{_key(k)} = {_value(v)}" for k, v in scalars.items()]
    for key, value in data.items():
        if _is_table(value):
            _table(value, [*path, key], lines)
        elif _is_table_array(value):
            for item in value:
                lines += ["", f"[[{'.'.join(map(_key, [*path, key]))}]]"]
                _inline_table_body(item, lines)


def _sorted(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _sorted(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [_sorted(v) for v in value]
    return value


def _inline_table_body(item: dict[str, Any], lines: list[str]) -> None:
    lines += [f"{_key(k)} = {_value(v)}" for k, v in item.items()]


def _is_table(value: Any) -> bool:
    return isinstance(value, dict)


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _key(key: str) -> str:
    return key if _BARE_KEY.match(key) else json.dumps(key, ensure_ascii=False)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


# -- pushing -----------------------------------------------------------------------------------


def push_to_hub(model: Any, repo_id: str, *, tokenizer: Any = None, **options: Any) -> Any:
    """Upload ``model`` (weights, config, card, and the tokenizer) to the Hub repository ``repo_id``.

    The card is the one saved with the model: made from the config and, for a step
    checkpoint, its run's metrics. The tokenizer is ``tokenizer``, else the one saved
    in the directory the model was loaded from. ``options``: as PreTrainedModel.push_to_hub.
    """
    from transformers.utils.hub import hf_api

    source = _local_source(model)
    repo = hf_api().create_repo(
        repo_id, private=options.pop("private", None), token=options.get("token"), exist_ok=True
    )
    with tempfile.TemporaryDirectory() as staging:
        model.save_pretrained(staging, max_shard_size=options.pop("max_shard_size", "50GB"))
        if tokenizer is not None:
            save_tokenizer(tokenizer, staging)
        elif source is not None:
            for name in TOKENIZER_FILES:
                if (source / name).is_file():
                    shutil.copy2(source / name, Path(staging) / name)
        tags = options.pop("tags", None)
        write_card(staging, model.config, source, repo.repo_id, tags)  # no source: the staging one
        return model._upload_modified_files(staging, repo.repo_id, files_timestamps={}, **options)


def _local_source(model: Any) -> Path | None:
    where = getattr(model, "name_or_path", None) or ""
    path = Path(where) if where else None
    return path.resolve() if path is not None and path.is_dir() else None
