"""Preparing a manifest's data once: read, cleaned, tokenized and packed into a directory of shards.

    prepare(manifest, directory, refs=refs, text_config=config)   # writes the directory
    data = open_prepared(directory)                                # tokenizer, train, eval, report

Three passes, each streaming in bounded chunks, so memory does not grow with the corpus:

1. read and clean: records are read file by file, cleaned by a pool of processes (one
   a core) for a large input, filtered (too short, exact duplicates by hash), split into
   train and held-out eval as :func:`~dharma_kernel.data.split.split_records` splits
   them, and spooled to disk; the cleaning processes also hash, draw and pickle their
   records (:mod:`~dharma_kernel.data.sorted_chunk`), so this process only decides duplicates;
2. the tokenizer, when one is trained, learns from the spooled training text, at most
   ``backbone.tokenizer.max_training_chars`` of it;
3. tokenize and write: the spool is tokenized in batches on every core (tiktoken's threads
   for a GPT-2-shaped BPE, :mod:`~dharma_kernel.data.fast_bpe`, else the Rust tokenizer's),
   the next batch on a helper thread while this one is packed as
   :func:`~dharma_kernel.data.packing.pack` packs, straight into
   :class:`~dharma_kernel.data.shards.ShardWriter` files.

The result holds the same rows, in the same order, as :func:`prepare_data` gives in
memory. Conversations are the exception to streaming: they are packed whole-conversation
to a row after the text, so they are held until the end (chat sets are small).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import pickle
import shutil
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

from ..errors import DharmaError
from ..manifest import Manifest
from .clean import RecordFilter, clean_chunk
from .dataset import (
    _hint,
    _merge,
    _names,
    _why_empty,
    check_max_length,
    no_rows,
    training_paths,
    training_text,
)
from .meter import Meter
from .paths import expand_paths
from .readers import iter_records
from .records import Record
from .report import DataReport
from .sorted_chunk import SortedChunk, sort_chunk

__all__ = ["FORMAT", "META", "Prepared", "open_prepared", "prepare"]

log = logging.getLogger(__name__)

FORMAT = 1
META = "prepared.json"
CHUNK_CHARS = 4 << 20  # text handed to a cleaning process, or to the tokenizer, at a time
POOL_BYTES = 8 << 20  # below this much input, cleaning stays in this process


@dataclass
class Prepared:
    """An opened prepared directory: ``train`` and ``eval`` (None when nothing is held out) are
    :class:`~dharma_kernel.data.shards.Shards`; ``meta`` is its ``prepared.json``."""

    directory: Path
    tokenizer: Any
    train: Any
    eval: Any | None
    report: DataReport
    meta: dict[str, Any]
    reused: bool = False  # found ready, not prepared by this call


def prepare(
    manifest: Manifest,
    directory: Path,
    *,
    paths: Sequence[str | Path] | None = None,
    strict: bool | None = None,
    refs: Sequence[str] = (),
    text_config: Any | None = None,
    tokenizer: Any | None = None,
    inputs: dict[str, Any] | None = None,
    console: Any | None = None,
) -> Path:
    """Read, clean, tokenize and pack the manifest's data into ``directory`` (made whole or not at all).

    ``paths``, ``strict``: as :func:`~dharma_kernel.data.dataset.read_data`. ``refs``: the
    model's modules, whose concept labels are stored. ``tokenizer``: the one to use (a
    resumed run's); else :func:`~dharma_kernel.data.tokenizer.resolve_tokenizer` chooses
    or trains one. ``inputs``: the fingerprint's inputs, stored in ``prepared.json``.
    ``console`` gets a line per stage. If another process finished the same directory
    first, its result stands.
    """
    directory = Path(directory)
    staging = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        report = DataReport()
        spool = _read_and_clean(manifest, paths, strict, report, staging, console)
        meta = _tokenize_and_write(manifest, spool, report, staging, refs, text_config, tokenizer, console)
        spool.remove()
        meta["inputs"] = inputs or {}
        meta["report"] = asdict(report)
        (staging / META).write_text(json.dumps(meta, indent=1, ensure_ascii=False), encoding="utf-8")
        try:
            os.replace(staging, directory)
        except OSError:
            if not (directory / META).exists():
                raise
            shutil.rmtree(staging, ignore_errors=True)  # another run prepared the same data first
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def open_prepared(directory: Path, tokenizer: Any | None = None) -> Prepared:
    """The prepared data in ``directory``; ``tokenizer`` (else the one saved there) is returned with it."""
    from ..checkpoint import load_saved_tokenizer
    from .shards import Shards

    directory = Path(directory)
    try:
        meta = json.loads((directory / META).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise DharmaError(
            f"{directory}: not a prepared data directory (no readable {META})",
            hint="Make one with `dharma prepare MANIFEST -o DIR`.",
        ) from None
    if meta.get("format") != FORMAT:
        raise DharmaError(
            f"{directory}: prepared in format {meta.get('format')!r}; this version reads format {FORMAT}",
            hint="Prepare it again with `dharma prepare`.",
        )
    tokenizer = tokenizer if tokenizer is not None else load_saved_tokenizer(directory / "tokenizer")
    splits = {}
    for split in ("train", "eval"):
        info = meta["splits"][split]
        splits[split] = Shards(directory, split, meta["dtype"], meta["max_length"], info["rows"],
                               info["tokens"], meta["refs"])  # fmt: skip
    report = _report(meta["report"])
    held_out = splits["eval"] if len(splits["eval"]) else None
    return Prepared(directory, tokenizer, splits["train"], held_out, report, meta)


def _report(saved: dict[str, Any]) -> DataReport:
    report = DataReport(**{key: value for key, value in saved.items() if key != "problems"})
    report.problems = [tuple(problem) for problem in saved.get("problems", [])]  # type: ignore[misc]
    return report


# -- pass 1: read and clean ----------------------------------------------------------------


class _Spool:
    """Cleaned records of each split, pickled to disk in chunks, in order.

    ``moved``: ``(split, index)`` of the one record :func:`split_records` moves across
    so neither side is empty, or None.
    """

    def __init__(self, directory: Path) -> None:
        self.paths = {split: directory / f"{split}.spool" for split in ("train", "eval")}
        self.files = {split: path.open("wb") for split, path in self.paths.items()}
        self.counts = {"train": 0, "eval": 0}
        self.moved: tuple[str, int] | None = None

    def add(self, split: str, records: list[Record]) -> None:
        if records:
            pickle.dump(records, self.files[split], protocol=pickle.HIGHEST_PROTOCOL)
            self.counts[split] += len(records)

    def add_sorted(self, split: str, chunk: SortedChunk, keep: list[bool]) -> None:
        """The records of ``chunk`` sorted to ``split`` whose flag in ``keep`` is true: the bytes a
        cleaning process pickled, as they are, when all are kept."""
        if split in chunk.pickled and all(keep):
            self.files[split].write(chunk.pickled[split])
            self.counts[split] += len(keep)
        elif any(keep):
            self.add(split, chunk.side(split, keep))

    def close(self) -> None:
        for file in self.files.values():
            file.close()

    def chunks(self, split: str) -> Iterator[list[Record]]:
        """The records of ``split`` in order, in the chunks they were written in, ``moved`` applied."""
        moved = None
        if self.moved is not None:
            other = "eval" if self.moved[0] == "train" else "train"
            if split == other:
                moved = self._record(*self.moved)
        index = 0
        for chunk in self._chunks(split):
            if (
                self.moved is not None
                and self.moved[0] == split
                and index <= self.moved[1] < index + len(chunk)
            ):
                chunk = chunk[: self.moved[1] - index] + chunk[self.moved[1] - index + 1 :]
                index += 1
            index += len(chunk)
            yield chunk
        if moved is not None:
            yield [moved]

    def _chunks(self, split: str) -> Iterator[list[Record]]:
        with self.paths[split].open("rb") as file:
            while True:
                try:
                    yield pickle.load(file)
                except EOFError:
                    return

    def _record(self, split: str, wanted: int) -> Record:
        index = 0
        for chunk in self._chunks(split):
            if wanted < index + len(chunk):
                return chunk[wanted - index]
            index += len(chunk)
        raise IndexError(wanted)

    def texts(self, max_chars: int | None) -> Iterator[str]:
        """Training texts (see :func:`training_text`) until ``max_chars`` characters have been given."""
        given = 0
        for chunk in self.chunks("train"):
            for record in chunk:
                if max_chars is not None and given >= max_chars:
                    return
                text = training_text(record)
                given += len(text)
                yield text

    def remove(self) -> None:
        for path in self.paths.values():
            path.unlink(missing_ok=True)


def _read_and_clean(
    manifest: Manifest,
    paths: Sequence[str | Path] | None,
    strict: bool | None,
    report: DataReport,
    staging: Path,
    console: Any | None,
) -> _Spool:
    """Pass 1, with the same counts, drops, split and errors as :func:`read_data`."""
    strict = manifest.data.strict if strict is None else strict
    min_chars, seed = manifest.data.min_chars, manifest.train.seed
    train_paths = training_paths(manifest, paths)
    eval_paths = [manifest.resolve_path(path) for path in manifest.data.eval]
    fraction = 0.0 if eval_paths else manifest.data.eval_fraction
    spool = _Spool(staging)
    keep = RecordFilter(min_chars, report)
    lowest: tuple[float, int] | None = None  # the training record nearest the threshold
    highest: tuple[float, int] | None = None  # the held-out record nearest it
    sort = partial(sort_chunk, clean_chunk, min_chars=min_chars, seed=seed, fraction=fraction)
    with Meter(console, "read and clean", _size(train_paths + eval_paths)) as meter:
        for chunk in _cleaned(iter_records(train_paths, strict, report), meter, sort):
            kept: dict[str, list[bool]] = {"train": [], "eval": []}  # each sorted record of a side
            added = {"train": 0, "eval": 0}
            for reason, digest, draw, side in chunk.marks:
                if not keep.admit(reason, digest):
                    if reason is None:
                        kept[side].append(False)
                    continue
                index = spool.counts[side] + added[side]
                if side == "train" and (lowest is None or draw < lowest[0]):
                    lowest = (draw, index)
                if side == "eval" and (highest is None or draw > highest[0]):
                    highest = (draw, index)
                kept[side].append(True)
                added[side] += 1
            for side, flags in kept.items():
                spool.add_sorted(side, chunk, flags)
        if not report.records_kept:
            raise DharmaError(
                f"no training text in {_names(train_paths)}: {_why_empty(report)}", hint=_hint(min_chars)
            )
        if fraction > 0 and report.records_kept >= 2:
            if not spool.counts["eval"]:
                spool.moved = ("train", lowest[1])  # type: ignore[index]
            elif not spool.counts["train"]:
                spool.moved = ("eval", highest[1])  # type: ignore[index]
        if eval_paths:
            _read_eval(eval_paths, strict, min_chars, keep.seen, report, spool, meter)
    spool.close()
    return spool


def _read_eval(
    eval_paths: list[Path],
    strict: bool,
    min_chars: int,
    train_seen: set[bytes],
    report: DataReport,
    spool: _Spool,
    meter: Meter,
) -> None:
    eval_report = DataReport()
    keep = RecordFilter(min_chars, eval_report)
    sort = partial(sort_chunk, clean_chunk, min_chars=min_chars, seed=0, fraction=0.0, side="eval")
    for chunk in _cleaned(iter_records(eval_paths, strict, eval_report), meter, sort):
        flags = []
        for reason, digest, _, _ in chunk.marks:
            if not keep.admit(reason, digest):
                if reason is None:
                    flags.append(False)
                continue
            unseen = digest not in train_seen  # evaluating on text trained on would flatter it
            if not unseen:
                eval_report.dropped["duplicate"] += 1
                eval_report.records_kept -= 1
            flags.append(unseen)
        spool.add_sorted("eval", chunk, flags)
    _merge(report, eval_report)
    if not spool.counts["eval"]:
        raise DharmaError(
            f"no evaluation text in {_names(eval_paths)} (data.eval): {_why_empty(eval_report)}",
            hint=_hint(min_chars),
        )


def _cleaned(
    records: Iterable[Record], meter: Meter, sort: Callable[[list[Record]], SortedChunk]
) -> Iterator[SortedChunk]:
    """The records in chunks of about :data:`CHUNK_CHARS`, in order, each cleaned and sorted by
    ``sort`` (:func:`~dharma_kernel.data.sorted_chunk.sort_chunk`); by a pool of processes when
    the input is large, with a bounded number of chunks in flight."""
    chunks = _chunked(records, meter)
    processes = os.cpu_count() or 1
    if processes < 2 or (meter.total or 0) < POOL_BYTES:
        yield from map(sort, chunks)
        return
    yield from _cleaned_by_pool(chunks, processes, sort)


def _cleaned_by_pool(
    chunks: Iterator[list[Record]], processes: int, sort: Callable[[list[Record]], SortedChunk]
) -> Iterator[SortedChunk]:
    # Not fork: this process runs torch's and the tokenizer's threads, and a child forked
    # while one of them holds a lock waits for it forever. forkserver forks each worker
    # from a small server that imports only the cleaning code (the default from Python 3.14).
    # A worker that dies (killed for memory, say) breaks the pool; the chunks still in
    # flight are then cleaned here, so the result is the same, only slower.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([sort_chunk.__module__])
    pending: deque[tuple[list[Record], Future[SortedChunk]]] = deque()
    unsent: list[Record] | None = None
    with ProcessPoolExecutor(processes, mp_context=context) as pool:
        try:
            for unsent in chunks:
                pending.append((unsent, pool.submit(sort, unsent)))
                unsent = None
                if len(pending) >= 2 * processes:
                    yield pending[0][1].result()
                    pending.popleft()
            while pending:
                yield pending[0][1].result()
                pending.popleft()
            return
        except BrokenProcessPool:
            log.warning("a cleaning process died; cleaning the rest of the data in this process")
    for chunk, _ in pending:
        yield sort(chunk)
    if unsent is not None:
        yield sort(unsent)
    yield from map(sort, chunks)


def _chunked(records: Iterable[Record], meter: Meter) -> Iterator[list[Record]]:
    chunk: list[Record] = []
    size = 0
    for record in records:
        chunk.append(record)
        size += len(record.text)
        if size >= CHUNK_CHARS:
            meter.add(size)
            yield chunk
            chunk, size = [], 0
    if chunk:
        meter.add(size)
        yield chunk


def _size(paths: list[Path]) -> int:
    try:
        return sum(path.stat().st_size for path in expand_paths(paths))
    except (OSError, DharmaError):
        return 0


# -- passes 2 and 3: the tokenizer, then tokenize and write ----------------------------------


def _tokenize_and_write(
    manifest: Manifest,
    spool: _Spool,
    report: DataReport,
    staging: Path,
    refs: Sequence[str],
    text_config: Any | None,
    tokenizer: Any | None,
    console: Any | None,
) -> dict[str, Any]:
    from .chat import ensure_chat_template
    from .shards import id_dtype
    from .tokenizer import resolve_tokenizer, training_cap

    if tokenizer is None:
        with Meter(console, "tokenizer") as meter:
            texts = _measured(spool.texts(training_cap(manifest)), meter)
            tokenizer = resolve_tokenizer(manifest, texts, text_config)
            meter.note = f", {len(tokenizer)} tokens"
    tokenizer = ensure_chat_template(tokenizer)
    max_length = manifest.data.max_length
    check_max_length(tokenizer, max_length)
    lexicons = None
    if refs:
        from ..concepts import lexicons_for

        lexicons = lexicons_for(refs)
    dtype = id_dtype(len(tokenizer))
    splits = {}
    with Meter(console, "tokenize and write") as meter:
        for split in ("train", "eval"):
            splits[split] = _write_split(spool.chunks(split), split, tokenizer, max_length, refs, lexicons,
                                         dtype, staging, report, meter)  # fmt: skip
    if splits["train"]["rows"] == 0:
        raise no_rows(report, max_length)
    tokenizer.save_pretrained(staging / "tokenizer")
    return {
        "format": FORMAT,
        "max_length": max_length,
        "refs": list(refs),
        "dtype": dtype.name,
        "vocabulary": len(tokenizer),
        "tokenizer_hash": tokenizer_hash(tokenizer),
        "splits": splits,
    }


def _measured(texts: Iterator[str], meter: Meter) -> Iterator[str]:
    for text in texts:
        meter.add(len(text))
        yield text


def _write_split(
    chunks: Iterator[list[Record]],
    split: str,
    tokenizer: Any,
    max_length: int,
    refs: Sequence[str],
    lexicons: Any,
    dtype: Any,
    staging: Path,
    report: DataReport,
    meter: Meter,
) -> dict[str, Any]:
    from .chat import ChatRows
    from .packing import TextStream
    from .shards import ShardWriter, SpilledPieces, pieces_of

    writer = ShardWriter(staging, split, dtype, max_length, len(refs))
    stream = TextStream(tokenizer, max_length, refs, lexicons)
    # Conversation rows come after the text rows, as in-memory packing puts them; each chunk's
    # completed rows wait on disk, so no split's conversations are held in memory.
    chats = ChatRows(tokenizer, max_length, report, refs, lexicons)
    with SpilledPieces(staging / f"{split}.chats", dtype) as spilled:
        for chunk, texts, tokenized, conversations in _tokenized_ahead(chunks, stream, chats):
            if conversations is not None:
                spilled.add(pieces_of(conversations))
            if texts:
                writer.write(stream.encode(texts, tokenized))
            meter.add(sum(len(record.text) for record in chunk))
        writer.write(stream.padding())
        spilled.add(pieces_of(chats.close()))
        for piece in spilled.pieces():
            writer.write(piece)
    return writer.close()


def _tokenized_ahead(
    chunks: Iterator[list[Record]], stream: Any, chats: Any
) -> Iterator[tuple[list[Record], list[Record], Any, Any]]:
    """Each chunk, its text records, their tokens, and the conversation rows it completes (or None):
    one thread reads the spool a chunk ahead of another that tokenizes, which is a chunk ahead of
    packing and writing (this thread), so the tokenizer's threads never wait for the spool, nor
    the spool for them. At most four chunks are held: one read, one queued, one tokenized, one
    written.

    Everything that calls the tokenizer runs on the tokenizing thread: a Rust tokenizer's
    settings are shared (``encode_special_tokens``, which text-as-text encoding turns on for a
    call), so a conversation encoded on another thread meanwhile could read its role markers
    as text."""

    def tokenized(chunk: list[Record]) -> tuple[list[Record], list[Record], Any, Any]:
        texts = [record for record in chunk if record.messages is None]
        conversations = [record for record in chunk if record.messages is not None]
        return (
            chunk,
            texts,
            stream.tokenize(texts) if texts else None,
            chats.add(conversations) if conversations else None,
        )

    pending: deque[Future[tuple[list[Record], list[Record], Any, Any]]] = deque()
    with (
        ThreadPoolExecutor(1, thread_name_prefix="dharma-spool") as reader,
        ThreadPoolExecutor(1, thread_name_prefix="dharma-tokenize") as tokenizer,
    ):
        read = reader.submit(next, chunks, None)
        while (chunk := read.result()) is not None:
            read = reader.submit(next, chunks, None)
            pending.append(tokenizer.submit(tokenized, chunk))
            if len(pending) > 1:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def tokenizer_hash(tokenizer: Any) -> str:
    """A digest of what the tokenizer does: its vocabulary, merges and special tokens."""
    import hashlib

    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()
