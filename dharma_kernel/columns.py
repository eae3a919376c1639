"""Per-module results kept as one table, read per module as a mapping."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch


class Columns(Mapping[str, torch.Tensor]):
    """``{ref: table.select(dim, i)}`` for the ``i``-th ref, each slice taken when it is read.

    A model computes its per-module scores as one table ``[..., M]`` (one op, where a dict
    of ``M`` slices costs ``M`` ops, and on a GPU as many kernel launches); a caller that
    reads them sees a plain read-only mapping.
    """

    def __init__(
        self,
        refs: Sequence[str] | Mapping[str, torch.Tensor],
        table: torch.Tensor | None = None,
        dim: int = -1,
    ) -> None:
        self._values: dict | None = None
        if table is None:  # rebuilt from a mapping, as libraries copy one: type(columns)({ref: value})
            self._values = dict(refs)
            refs = list(self._values)
        elif table.shape[dim] != len(refs):
            raise ValueError(f"a table of {table.shape[dim]} columns for {len(refs)} refs")
        self.refs = list(refs)
        self.table = table
        self.dim = dim
        self._index = {ref: index for index, ref in enumerate(self.refs)}

    def __getitem__(self, ref: str) -> torch.Tensor:
        if self._values is not None:
            return self._values[ref]
        return self.table.select(self.dim, self._index[ref])

    def __iter__(self) -> Iterator[str]:
        return iter(self.refs)

    def __len__(self) -> int:
        return len(self.refs)

    def __repr__(self) -> str:
        if self.table is None:
            return f"Columns({self._values!r})"
        return f"Columns({self.refs}, table {tuple(self.table.shape)}, dim {self.dim})"

    def last(self) -> torch.Tensor:
        """The table with the refs along its last dimension (a view, when made from one)."""
        if self.table is None:
            return torch.stack([self[ref] for ref in self.refs], dim=-1)
        return self.table if self.dim in (-1, self.table.dim() - 1) else self.table.movedim(self.dim, -1)


def table_of(values: Mapping[str, torch.Tensor], refs: Sequence[str]) -> torch.Tensor:
    """``[..., M]``: ``values[ref]`` for each of ``refs`` along a last dimension; no op when ``values`` is
    already :class:`Columns` over the same refs."""
    if isinstance(values, Columns) and values.refs == list(refs):
        return values.last()
    return torch.stack([values[ref] for ref in refs], dim=-1)
