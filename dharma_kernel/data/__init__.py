"""Training data: reading files of many formats into records, cleaning, splitting, tokenizing, packing.

    report = DataReport()
    records = clean_records(read_records(["data/"], report=report), report=report)
    print(report.summary())

    data = read_data(manifest)                             # read, clean, hold out eval
    tokenizer = resolve_tokenizer(manifest, data.texts)    # the backbone's, or a BPE trained here
    train, evaluation, report = prepare_data(manifest, tokenizer, refs, records=data)

Importing this package does not import torch, tokenizers or transformers: the names
that need them (the last four groups below) load their module on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .clean import clean_records, clean_text
from .paths import expand_paths
from .readers import BUILTIN_READERS, Reader, read_records
from .records import Record, render_messages
from .report import DataReport
from .split import split_records

if TYPE_CHECKING:
    from .dataset import DataRecords, prepare_data, read_data
    from .packed import PackedData
    from .packing import pack
    from .tokenizer import resolve_tokenizer, train_tokenizer

_LAZY = {
    "DataRecords": "dataset",
    "prepare_data": "dataset",
    "read_data": "dataset",
    "PackedData": "packed",
    "pack": "packing",
    "resolve_tokenizer": "tokenizer",
    "train_tokenizer": "tokenizer",
}

__all__ = [
    "BUILTIN_READERS",
    "DataRecords",
    "DataReport",
    "PackedData",
    "Reader",
    "Record",
    "clean_records",
    "clean_text",
    "expand_paths",
    "pack",
    "prepare_data",
    "read_data",
    "read_records",
    "render_messages",
    "resolve_tokenizer",
    "split_records",
    "train_tokenizer",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
