"""Packed rows on disk: written a piece at a time, read back through memory maps.

One split (``train`` or ``eval``) is four flat files over the token stream, rows of
``max_length`` back to back:

- ``<split>.ids``: the tokens, in the smallest unsigned type that holds the vocabulary;
- ``<split>.trained``: one bit a token, set where the label is the token (else -100);
- ``<split>.real``: one bit a token, set on real tokens (the attention mask);
- ``<split>.concepts`` (with modules): a byte string a token, the bits of
  ``[label is not -100, module 1 is 1, module 2 is 1, ...]``.

Reading a batch touches only its rows, so a corpus far larger than memory trains at
no memory cost, and each process of a distributed run reads only the rows it uses.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from ..concepts import IGNORE
from .packing import PackedData, Piece

__all__ = ["ShardWriter", "Shards", "SpilledPieces", "id_dtype", "pieces_of"]


def id_dtype(vocabulary: int) -> np.dtype:
    """The smallest unsigned integer type that holds every id below ``vocabulary``."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocabulary - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.uint64)


def _concept_bytes(modules: int) -> int:
    return (modules + 1 + 7) // 8


class ShardWriter:
    """Appends pieces of the stream of one split to its files; :meth:`close` says what was written."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, max_length: int, modules: int) -> None:
        self.dtype, self.max_length, self.modules = dtype, max_length, modules
        self.files: dict[str, BinaryIO] = {
            name: (directory / f"{split}.{name}").open("wb")
            for name in ("ids", "trained", "real", *(["concepts"] if modules else []))
        }
        self.position = 0
        self.tokens = 0  # labels the LM loss trains on (a row's first column never is)
        self._bits: dict[str, list[np.ndarray]] = {"trained": [], "real": []}
        self._pending = 0

    def write(self, piece: Piece) -> None:
        size = len(piece.ids)
        if size == 0:
            return
        self.files["ids"].write(_as_ids(piece.ids, self.dtype).tobytes())
        columns = (np.arange(self.position, self.position + size) % self.max_length) != 0
        self.tokens += int((piece.trained & columns).sum())
        if self.modules:
            concepts = piece.concepts
            valid = concepts[:, 0] != IGNORE  # type: ignore[index]
            if not np.all((concepts != IGNORE) == valid[:, None]):  # type: ignore[operator]
                raise ValueError("concept labels must be -100 in every column or none")
            bits = np.concatenate([valid[:, None], concepts == 1], axis=1)  # type: ignore[operator]
            self.files["concepts"].write(np.packbits(bits, axis=1).tobytes())
        self._bits["trained"].append(piece.trained)
        self._bits["real"].append(piece.real)
        self._pending += size
        self.position += size
        if self._pending >= 1 << 16:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        """Bits packed 8 tokens to a byte: all but the last ``pending % 8`` unless ``final``."""
        keep = 0 if final else self._pending % 8
        for name, parts in self._bits.items():
            bits = np.concatenate(parts) if parts else np.zeros(0, dtype=bool)
            cut = len(bits) - keep
            self.files[name].write(np.packbits(bits[:cut]).tobytes())
            self._bits[name] = [bits[cut:]]
        self._pending = keep

    def close(self) -> dict[str, Any]:
        """Flush, close, and return ``{"rows", "tokens"}``."""
        if self.position % self.max_length:
            raise ValueError("the stream must end at a row boundary")
        self._flush(final=True)
        for file in self.files.values():
            file.close()
        return {"rows": self.position // self.max_length, "tokens": self.tokens}


class SpilledPieces:
    """Pieces of the stream kept in a file until they are written in their place, then removed
    (with the block): memory holds one piece at a time. Ids are kept in ``dtype`` (the shards'),
    the flags as bits."""

    def __init__(self, path: Path, dtype: np.dtype) -> None:
        self.path, self.dtype = path, dtype
        self.count = 0
        self._file: BinaryIO | None = None

    def __enter__(self) -> SpilledPieces:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self._file.close()
        self.path.unlink(missing_ok=True)

    def add(self, piece: Piece) -> None:
        if len(piece.ids):
            if self._file is None:
                self._file = self.path.open("wb")
            kept = (len(piece.ids), _as_ids(piece.ids, self.dtype), np.packbits(piece.trained),
                    np.packbits(piece.real), piece.concepts)  # fmt: skip
            pickle.dump(kept, self._file, protocol=pickle.HIGHEST_PROTOCOL)
            self.count += 1

    def pieces(self) -> Iterator[Piece]:
        """The pieces added, in order."""
        if self._file is None:
            return
        self._file.close()
        self._file = None
        with self.path.open("rb") as file:
            for _ in range(self.count):
                size, ids, trained, real, concepts = pickle.load(file)
                flags = [np.unpackbits(bits, count=size).astype(bool) for bits in (trained, real)]
                yield Piece(ids.astype(np.int64), *flags, concepts)


def _as_ids(ids: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if int(ids.max()) > np.iinfo(dtype).max or int(ids.min()) < 0:
        raise ValueError(f"token ids outside {dtype}")
    return ids.astype(dtype)


def pieces_of(packed: PackedData) -> Piece:
    """Rows packed in memory (e.g. conversations) as one piece of the stream."""
    ids = packed.input_ids.reshape(-1).numpy()
    labels = packed.labels.reshape(-1).numpy()
    trained = labels != IGNORE
    if not np.array_equal(labels[trained], ids[trained]):
        raise ValueError("a trained label differs from its token")
    concepts = None
    if packed.concept_labels is not None:
        concepts = packed.concept_labels.reshape(len(ids), len(packed.refs)).numpy()
    return Piece(ids.astype(np.int64), trained, packed.attention_mask.reshape(-1).numpy() != 0, concepts)


class Shards:
    """One split of a prepared directory, read through memory maps; used as :class:`PackedData` is."""

    def __init__(
        self,
        directory: Path,
        split: str,
        dtype: str,
        max_length: int,
        rows: int,
        tokens: int,
        refs: Sequence[str],
    ) -> None:
        self.max_length, self.rows, self._tokens, self.refs = max_length, rows, tokens, tuple(refs)
        size = rows * max_length
        self.ids = _map(directory / f"{split}.ids", np.dtype(dtype), (size,))
        self.trained = _map(directory / f"{split}.trained", np.dtype(np.uint8), ((size + 7) // 8,))
        self.real = _map(directory / f"{split}.real", np.dtype(np.uint8), ((size + 7) // 8,))
        self.concepts = None
        if self.refs:
            shape = (size, _concept_bytes(len(self.refs)))
            self.concepts = _map(directory / f"{split}.concepts", np.dtype(np.uint8), shape)

    def __len__(self) -> int:
        return self.rows

    def __repr__(self) -> str:
        return f"Shards({self.rows} rows of {self.max_length}, {self.tokens} tokens trained)"

    @property
    def tokens(self) -> int:
        return self._tokens

    def batch(self, indices: Sequence[int] | Any) -> dict[str, Any]:
        """The rows at ``indices`` as :meth:`PackedData.batch` gives them."""
        import torch

        if isinstance(indices, slice):
            indices = range(*indices.indices(self.rows))
        rows = [int(i) for i in (indices.tolist() if hasattr(indices, "tolist") else indices)]
        length = self.max_length
        ids = np.stack([self.ids[r * length : (r + 1) * length] for r in rows]).astype(np.int64)
        trained = np.stack([_bits(self.trained, r * length, length) for r in rows])
        real = np.stack([_bits(self.real, r * length, length) for r in rows])
        input_ids = torch.from_numpy(ids.reshape(len(rows), length))
        batch = {
            "input_ids": input_ids,
            "attention_mask": torch.from_numpy(real.astype(np.int64)),
            "labels": torch.where(torch.from_numpy(trained), input_ids, IGNORE),
        }
        if self.concepts is not None:
            packed = np.stack([self.concepts[r * length : (r + 1) * length] for r in rows])
            bits = np.unpackbits(packed, axis=2, count=len(self.refs) + 1).astype(bool)
            labels = np.where(bits[..., :1], bits[..., 1:].astype(np.float32), float(IGNORE))
            batch["concept_labels"] = torch.from_numpy(labels.astype(np.float32))
        return batch


def _bits(packed: np.ndarray, start: int, count: int) -> np.ndarray:
    first, skip = divmod(start, 8)
    chunk = np.asarray(packed[first : (start + count + 7) // 8])
    return np.unpackbits(chunk)[skip : skip + count].astype(bool)


def _map(path: Path, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    if shape[0] == 0:
        return np.zeros(shape, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=shape)
