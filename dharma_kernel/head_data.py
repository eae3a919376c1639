"""Task data for heads: records read and checked, encoded by the head, padded into batches.

    records = read_head_records(Head, ["train.jsonl"])            # checked: inputs and targets present
    config = fit_head_config(Head, config, records)               # e.g. the label list
    data = encode_records(head, records, tokenizer, max_length)   # HeadData
    loss = model(**data.batch([0, 1, 2, 3])).loss

Every problem with a record is a DharmaError naming its file and record number (the
line of a ``.jsonl`` file). Padding is on the right; ``attention_mask`` marks real tokens.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .data.fields import TOO_DEEP
from .data.paths import expand_paths
from .data.report import DataReport
from .errors import DharmaError
from .padding import pad_id
from .protocol import HeadModule, RecordError

IGNORE = -100
MODEL_KEYS = ("input_ids", "attention_mask", "labels")  # features the model itself takes


@dataclass
class HeadRecords:
    """Records (plain dicts) and where each came from, ``file:record`` for messages."""

    records: list[dict[str, Any]]
    where: list[str]

    def __len__(self) -> int:
        return len(self.records)


def read_head_records(
    head: type[HeadModule],
    paths: Sequence[str | Path],
    targets: bool = True,
    report: DataReport | None = None,
) -> HeadRecords:
    """The records in ``paths`` (files, directories, globs), each checked for the head's fields.

    A file is read by the head's :meth:`~HeadModule.read` when it knows the format, else as
    JSONL (one object per line; blank lines are skipped but counted). ``targets=False``
    accepts records without the target fields (prediction input). Without ``report``, the
    first problem raises; with one, each unreadable file and malformed record is counted
    there and skipped (raised when ``report.strict``), as :func:`~dharma_kernel.data.read_records`
    does for text.
    """
    files = expand_paths([str(p) for p in paths])
    if not files:
        raise DharmaError(f"no data files in {', '.join(map(str, paths))}")
    records, where = [], []
    for path in files:
        try:
            own = head.read(path)
            numbered = list(enumerate(own, 1)) if own is not None else _jsonl(path)
        except DharmaError as err:
            if report is None:
                raise
            report.bad_file(str(path), err.message.removeprefix(f"{path}: "))
            continue
        if report is not None:
            report.files_read += 1
        for number, record in numbered:
            problem = _problem(head, record, targets)
            if problem is None:
                records.append(record)
                where.append(f"{path}: record {number}")
                if report is not None:
                    report.records_read += 1
                    report.records_kept += 1
            elif report is None:
                raise DharmaError(f"{path}: record {number}: {problem}", hint="Fix or remove that record.")
            else:
                report.malformed(str(path), number, problem)
    if not records:
        summary = f" ({report.summary()})" if report is not None else ""
        raise DharmaError(f"no usable records in {', '.join(str(f) for f in files)}{summary}")
    return HeadRecords(records, where)


class _NotJson(str):
    """A JSONL line that did not parse: what was wrong, in place of the record."""


def _problem(head: type[HeadModule], record: Any, targets: bool) -> str | None:
    """Why ``record`` cannot be used by ``head``; None when it can."""
    if isinstance(record, _NotJson):
        return str(record)
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    needed = [*head.inputs, *(head.targets if targets else ())]
    missing = [
        name
        for name in needed
        if all(record.get(k) in (None, "") for k in (name, *head.field_aliases.get(name, ())))
    ]
    if missing:
        wanted = " or ".join(repr(m) for m in missing)
        return f"no {wanted} field ({head.name} records need {', '.join(needed)})"
    return None


def _jsonl(path: Path) -> list[tuple[int, Any]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DharmaError(f"{path}: cannot read ({err})") from None
    out: list[tuple[int, Any]] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append((number, json.loads(line)))
        except json.JSONDecodeError as err:
            out.append((number, _NotJson(f"not JSON ({err.msg})")))
        except RecursionError:
            out.append((number, _NotJson(TOO_DEEP)))
    return out


def fit_head_config(head: type[HeadModule], config: Any, data: HeadRecords) -> Any:
    """``head.fit_config`` on the training records; a RecordError becomes a DharmaError."""
    try:
        return head.fit_config(config, data.records)
    except RecordError as err:
        raise DharmaError(f"{head.name} training data: {err}") from None


def predict_records(head: HeadModule, model: Any, tokenizer: Any, records: list[dict[str, Any]],
                    where: str = "input") -> list[dict[str, Any]]:  # fmt: skip
    """``head.predict`` on records given by the user; a RecordError becomes a DharmaError."""
    try:
        return head.predict(model, tokenizer, records)
    except RecordError as err:
        raise DharmaError(f"{where}: {err}") from None


def encode_records(head: HeadModule, data: HeadRecords, tokenizer: Any, max_length: int) -> HeadData:
    """Every record through ``head.encode``; errors name the file and record."""
    features = []
    for record, location in zip(data.records, data.where, strict=True):
        try:
            encoded = head.encode(record, tokenizer, max_length)
        except RecordError as err:
            raise DharmaError(f"{location}: {err}", hint="Fix or remove that record.") from None
        if not encoded.get("input_ids"):
            raise DharmaError(f"{location}: the record encodes to no tokens")
        if len(encoded["input_ids"]) > max_length:
            raise DharmaError(f"{location}: {head.name} encoded {len(encoded['input_ids'])} tokens, "
                              f"more than max_length {max_length}")  # fmt: skip
        features.append(encoded)
    return HeadData(head.name, features, pad_id(tokenizer), dict(type(head).pad_values), data)


def pad_features(
    features: Sequence[dict[str, Any]], pad: int, pad_values: dict[str, int | float] | None = None
) -> dict[str, torch.Tensor]:
    """Features as tensors: per-token lists right-padded to the longest (``input_ids`` with
    ``pad``, ``labels`` with -100, others with ``pad_values`` or 0), per-record values stacked,
    and ``attention_mask``."""
    pad_values = {"input_ids": pad, "labels": IGNORE, **(pad_values or {})}
    lengths = [len(f["input_ids"]) for f in features]
    width = max(lengths)
    out: dict[str, torch.Tensor] = {}
    for key, first in features[0].items():
        values = [f[key] for f in features]
        if isinstance(first, (list, tuple)):
            fill = pad_values.get(key, 0)
            values = [list(v) + [fill] * (width - len(v)) for v in values]
        out[key] = torch.tensor(values)
    out["attention_mask"] = torch.tensor([[1] * n + [0] * (width - n) for n in lengths])
    return out


def model_batch(head_name: str, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Padded features split into :meth:`DharmaModel.forward` keywords: ``input_ids``,
    ``attention_mask``, ``labels`` for the model, everything else as ``head_labels[head_name]``."""
    batch: dict[str, Any] = {k: v for k, v in tensors.items() if k in MODEL_KEYS}
    batch["head_labels"] = {head_name: {k: v for k, v in tensors.items() if k not in MODEL_KEYS}}
    return batch


@dataclass
class HeadData:
    """Encoded records; ``batch(rows)`` gives model keywords, as ``PackedData.batch`` does."""

    head: str
    features: list[dict[str, Any]]
    pad: int
    pad_values: dict[str, int | float] = field(default_factory=dict)
    source: HeadRecords | None = None

    def __len__(self) -> int:
        return len(self.features)

    @property
    def records(self) -> list[dict[str, Any]]:
        return self.source.records if self.source is not None else []

    def batch(self, indices: Sequence[int] | torch.Tensor) -> dict[str, Any]:
        rows = [int(i) for i in indices]
        return model_batch(
            self.head, pad_features([self.features[i] for i in rows], self.pad, self.pad_values)
        )


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """A batch (tensors, and dicts of them as in ``head_labels``) moved to ``device``."""
    return {
        k: to_device(v, device) if isinstance(v, dict) else v.to(device, non_blocking=True)
        for k, v in batch.items()
    }


def max_length_of(model: Any, default: int = 256) -> int:
    """The ``data.max_length`` the model was trained (or fine-tuned) with."""
    manifest = getattr(model.config, "manifest", None) or {}
    return int(manifest.get("data", {}).get("max_length", default))


def forward_inputs(model: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """``model`` on the padded ``input_ids`` and ``attention_mask`` of ``tensors`` (on its device)."""
    device = next(model.parameters()).device
    return model(
        input_ids=tensors["input_ids"].to(device),
        attention_mask=tensors["attention_mask"].to(device),
        use_cache=False,
    )


def pick_head(model: Any, name: str | None) -> Any:
    """The model's head ``name``, or its only head."""
    heads = list(model.heads)
    if not heads:
        raise DharmaError("this model has no task head", hint="Fine-tune one: dharma finetune --head NAME.")
    if name is None:
        if len(heads) > 1:
            raise DharmaError(f"this model has several heads ({', '.join(heads)}); choose one with --head")
        name = heads[0]
    if name not in heads:
        raise DharmaError(f"this model has no head '{name}'; it has {', '.join(heads)}")
    return model.heads[name]
