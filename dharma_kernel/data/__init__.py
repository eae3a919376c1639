"""Training data: reading files of many formats into records, and cleaning them.

    report = DataReport()
    records = clean_records(read_records(["data/"], report=report), report=report)
    print(report.summary())

Nothing here imports torch.
"""

from __future__ import annotations

from .clean import clean_records, clean_text
from .paths import expand_paths
from .readers import BUILTIN_READERS, Reader, read_records
from .records import Record, render_messages
from .report import DataReport

__all__ = [
    "BUILTIN_READERS",
    "DataReport",
    "Reader",
    "Record",
    "clean_records",
    "clean_text",
    "expand_paths",
    "read_records",
    "render_messages",
]
