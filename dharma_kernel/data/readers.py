"""Choosing a reader for each file, by suffix and then by content, and reading them all."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from .fields import BadFile
from .generic_formats import JsonlReader, JsonRecordsReader, TextReader
from .paths import expand_paths
from .plugin_readers import plugin_readers
from .records import Record
from .report import DataReport
from .seed_formats import (
    DarshanasReader,
    EmotionalWisdomReader,
    SanskritCorpusReader,
    TrainingDataReader,
    VedicCorpusReader,
    VerseDatabaseReader,
)

__all__ = ["BUILTIN_READERS", "Reader", "choose_reader", "iter_records", "read_records"]

HEAD_BYTES = 65536  # enough of a file to see which keys its records have
WHOLE_FILE = 64 << 20  # files up to this size are read whole before their records are used


class Reader(Protocol):
    """A data format. ``sniff`` is asked only for files with one of ``suffixes``; the first
    reader that says yes reads the file. ``read`` reports malformed records to ``report``
    and yields the rest; it raises :class:`~dharma_kernel.data.fields.BadFile` for a file
    it cannot read at all."""

    name: str
    suffixes: tuple[str, ...]

    def sniff(self, path: Path, head: str) -> bool: ...

    def read(self, path: Path, report: DataReport) -> Iterator[Record]: ...


# Most specific first: the general JSON layouts would also match the seed ones.
BUILTIN_READERS: tuple[Reader, ...] = (
    TextReader(),
    JsonlReader(),
    SanskritCorpusReader(),
    VerseDatabaseReader(),
    TrainingDataReader(),
    EmotionalWisdomReader(),
    DarshanasReader(),
    VedicCorpusReader(),
    JsonRecordsReader(),
)


def read_records(
    paths: list[str | Path], strict: bool = False, report: DataReport | None = None
) -> list[Record]:
    """The records in every file the paths name (see :func:`expand_paths`), uncleaned.

    Plugin readers are tried before the built-in ones. A file no reader knows is
    skipped and reported. A malformed file or record is reported and skipped, or with
    ``strict`` raises :class:`~dharma_kernel.errors.DharmaError` naming file and record.
    """
    return list(iter_records(paths, strict, report))


def iter_records(
    paths: list[str | Path], strict: bool = False, report: DataReport | None = None, whole: int = WHOLE_FILE
) -> Iterator[Record]:
    """:func:`read_records` as a stream. A file of at most ``whole`` bytes is read whole first,
    so one that turns out unreadable halfway gives no records; a larger one streams, and the
    records before the damage are kept (the file is still reported)."""
    report = DataReport() if report is None else report
    report.strict = strict
    readers: list[Reader] = [*plugin_readers(), *BUILTIN_READERS]
    for path in expand_paths(paths):
        try:
            reader, why_not = choose_reader(path, readers)
            if reader is None:
                report.unknown_file(str(path), why_not)
                continue
            if path.stat().st_size <= whole:
                found = list(reader.read(path, report))
                report.records_read += len(found)
                yield from found
            else:
                for record in reader.read(path, report):
                    report.records_read += 1
                    yield record
        except BadFile as err:
            report.bad_file(str(path), str(err))
            continue
        except OSError as err:
            report.bad_file(str(path), f"cannot be read: {err.strerror}")
            continue
        report.files_read += 1


def choose_reader(path: Path, readers: list[Reader]) -> tuple[Reader | None, str]:
    """The first reader for ``path`` whose suffix fits and whose sniff says yes; else why none."""
    name = path.name.lower()
    fitting = [reader for reader in readers if name.endswith(tuple(s.lower() for s in reader.suffixes))]
    if not fitting:
        known = sorted({suffix for reader in readers for suffix in reader.suffixes})
        return None, f"unknown file type {path.suffix or path.name!r}; readers exist for {', '.join(known)}"
    head = _head(path)
    for reader in fitting:
        if reader.sniff(path, head):
            return reader, ""
    tried = ", ".join(reader.name for reader in fitting)
    return None, f"no reader recognises the content of this {path.suffix} file (tried {tried})"


def _head(path: Path) -> str:
    try:
        with path.open("rb") as file:
            return file.read(HEAD_BYTES).decode("utf-8", errors="replace").lstrip("\ufeff")
    except OSError as err:
        raise BadFile(f"cannot be read: {err.strerror}") from None
