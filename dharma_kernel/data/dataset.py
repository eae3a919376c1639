"""A manifest's training and evaluation data: read, cleaned, split and packed.

    data = read_data(manifest, paths, strict, report)          # records, read once
    tokenizer = resolve_tokenizer(manifest, data.texts)         # may train on the texts
    train, evaluation, report = prepare_data(manifest, tokenizer, refs, records=data)

``prepare_data(manifest, tokenizer, refs, paths, strict, report)`` alone reads the
files itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DharmaError
from ..manifest import Manifest
from .clean import clean_records
from .packing import PackedData, pack
from .readers import read_records
from .records import Record
from .report import DROP_REASONS, DataReport
from .split import split_records

__all__ = ["DataRecords", "prepare_data", "read_data"]


@dataclass
class DataRecords:
    """Cleaned records, split: ``train``, ``eval`` (empty when nothing is held out), and the
    report of reading and cleaning them."""

    train: list[Record]
    eval: list[Record]
    report: DataReport

    @property
    def texts(self) -> list[str]:
        """The training texts, what a tokenizer is trained on (never the held-out ones); a
        conversation's are its messages' contents, which is what the chat template shows."""
        return [training_text(record) for record in self.train]


def training_text(record: Record) -> str:
    """What a tokenizer is trained on from ``record``: its text, or its messages' contents."""
    return "\n".join(turn["content"] for turn in record.messages) if record.messages else record.text


def read_data(
    manifest: Manifest,
    paths: Sequence[str | Path] | None = None,
    strict: bool | None = None,
    report: DataReport | None = None,
) -> DataRecords:
    """The manifest's data, read and cleaned, train and eval apart.

    Training files: ``paths`` (as the CLI's ``--data`` gives them, relative to the current
    directory) or else ``data.train`` (relative to the manifest). Cleaning drops records
    shorter than ``data.min_chars``. ``strict`` (default ``data.strict``) makes a malformed
    file or record an error. Evaluation records: ``data.eval`` when it names files (less
    any text also in train), else ``data.eval_fraction`` of the training records, drawn by
    :func:`split_records` with ``train.seed``. Every count lands in ``report``.
    """
    report = DataReport() if report is None else report
    strict = manifest.data.strict if strict is None else strict
    min_chars = manifest.data.min_chars
    train_paths = training_paths(manifest, paths)
    train = clean_records(read_records(train_paths, strict, report), min_chars, report)
    if not train:
        why = _why_empty(report)
        raise DharmaError(f"no training text in {_names(train_paths)}: {why}", hint=_hint(min_chars))
    if not manifest.data.eval:
        train, held_out = split_records(train, manifest.data.eval_fraction, manifest.train.seed)
        return DataRecords(train, held_out, report)
    eval_paths = [manifest.resolve_path(path) for path in manifest.data.eval]
    eval_report = DataReport()
    held_out = clean_records(read_records(eval_paths, strict, eval_report), min_chars, eval_report)
    # Evaluating on text the model trained on would flatter it.
    seen = {record.text for record in train}
    kept = [record for record in held_out if record.text not in seen]
    eval_report.dropped["duplicate"] += len(held_out) - len(kept)
    eval_report.records_kept -= len(held_out) - len(kept)
    _merge(report, eval_report)
    if not kept:
        why = _why_empty(eval_report)
        raise DharmaError(
            f"no evaluation text in {_names(eval_paths)} (data.eval): {why}", hint=_hint(min_chars)
        )
    return DataRecords(train, kept, report)


def training_paths(manifest: Manifest, paths: Sequence[str | Path] | None = None) -> list[Path]:
    """``paths`` (the CLI's ``--data``, relative to the current directory), else ``data.train``
    (relative to the manifest); an error when there are none."""
    if paths:
        return [Path(path) for path in paths]
    found = [manifest.resolve_path(path) for path in manifest.data.train]
    if not found:
        raise DharmaError(
            "no training data: data.train is empty",
            hint="List files or directories in the manifest's [data] train = [...], or pass --data PATH.",
        )
    return found


def check_max_length(tokenizer: Any, max_length: int) -> None:
    """``data.max_length`` must fit the tokenizer's ``model_max_length``."""
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < max_length:
        raise DharmaError(
            f"data.max_length: {max_length} is longer than the tokenizer's model_max_length of {limit}",
            hint=f"Set data.max_length to at most {limit}.",
        )


def prepare_data(
    manifest: Manifest,
    tokenizer: Any,
    refs: Sequence[str] = (),
    paths: Sequence[str | Path] | None = None,
    strict: bool | None = None,
    report: DataReport | None = None,
    *,
    records: DataRecords | None = None,
) -> tuple[PackedData, PackedData | None, DataReport]:
    """``(train, eval, report)``: the data of :func:`read_data` packed into rows of
    ``data.max_length`` tokens, with concept labels for the modules ``refs`` (the
    model's ``module_refs``). eval is None when nothing is held out. Pass ``records``
    from :func:`read_data` to skip reading the files again (then ``paths``, ``strict``
    and ``report`` are not used).
    """
    data = records if records is not None else read_data(manifest, paths, strict, report)
    max_length = manifest.data.max_length
    check_max_length(tokenizer, max_length)
    lexicons = None
    if refs:
        from ..concepts import lexicons_for

        lexicons = lexicons_for(refs)
    train = pack(data.train, tokenizer, max_length, refs, lexicons, data.report)
    held_out = pack(data.eval, tokenizer, max_length, refs, lexicons, data.report) if data.eval else None
    if len(train) == 0:
        raise no_rows(data.report, max_length)
    if held_out is not None and len(held_out) == 0:
        held_out = None
    return train, held_out, data.report


def no_rows(report: DataReport, max_length: int) -> DharmaError:
    return DharmaError(
        f"no training rows: every conversation was dropped ({report.summary().splitlines()[-1]})",
        hint=f"Raise data.max_length (now {max_length}) or shorten the conversations.",
    )


def _hint(min_chars: int) -> str:
    return (
        "Point data.train (or --data) at .txt, .jsonl or .json files that hold text, "
        f"or lower data.min_chars (now {min_chars}) to keep shorter records."
    )


def _names(paths: list[Path]) -> str:
    return ", ".join(str(path) for path in paths)


def _why_empty(report: DataReport) -> str:
    """What became of the files and records, in one line."""
    parts = [f"{report.files_read} file(s) read, {report.files_skipped} skipped"]
    if report.records_read:
        dropped = ", ".join(f"{report.dropped[r]} {r}" for r in DROP_REASONS if report.dropped[r])
        parts.append(f"{report.records_read} record(s) read, all dropped ({dropped})")
    else:
        parts.append("no records")
    problems = report.first_problems(3)
    return "; ".join(parts) + (f"; problems: {'; '.join(problems)}" if problems else "")


def _merge(report: DataReport, other: DataReport) -> None:
    report.files_read += other.files_read
    report.files_skipped += other.files_skipped
    report.records_read += other.records_read
    report.records_kept += other.records_kept
    for reason, count in other.dropped.items():
        report.dropped[reason] += count
    report.problems += other.problems
