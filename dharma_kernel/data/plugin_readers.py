"""Readers that ``dharma.hooks`` plugins add through the ``dharma_data_readers`` hook."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import error_line
from ..plugins import call_hook
from .fields import BadFile, build_each, object_record
from .records import Record
from .report import DataReport

__all__ = ["PluginReader", "plugin_readers"]


class PluginReader:
    """A :class:`dharma_kernel.hookspecs.DataReader` seen through the built-in readers' interface.

    Its ``read(path)`` yields dicts shaped as ``.jsonl`` records (or :class:`Record`\\ s);
    each is checked like one. A reader that raises fails the whole file, never the run.
    """

    def __init__(self, reader: Any) -> None:
        self.reader = reader
        self.name: str = getattr(reader, "name", type(reader).__name__)
        self.suffixes: tuple[str, ...] = tuple(reader.suffixes)

    def sniff(self, path: Path, head: str) -> bool:
        try:
            return bool(self.reader.sniff(path))
        except Exception as err:
            raise BadFile(f"reader {self.name} failed on it: {error_line(err)}") from None

    def read(self, path: Path, report: DataReport) -> Iterator[Record]:
        try:
            # Read it all before reporting anything, so a reader that fails half-way skips the file whole.
            items = list(self.reader.read(path))
        except Exception as err:
            raise BadFile(f"reader {self.name} failed on it: {error_line(err)}") from None
        yield from build_each(path, enumerate(items, 1), _record, report)


def _record(item: Any) -> Record:
    return item if isinstance(item, Record) else object_record(item)


def plugin_readers() -> list[PluginReader]:
    """The readers every installed hook plugin offers, in plugin order."""
    readers = []
    for offered in call_hook("dharma_data_readers"):
        for reader in offered or []:
            missing = [attr for attr in ("suffixes", "sniff", "read") if not hasattr(reader, attr)]
            if missing:
                warnings.warn(f"data reader {reader!r} lacks {', '.join(missing)}; ignored", stacklevel=2)
                continue
            readers.append(PluginReader(reader))
    return readers
