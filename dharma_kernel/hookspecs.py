"""The hooks a ``dharma.hooks`` plugin may implement; this file is their documentation.

A hook plugin is a module named by an entry point in group ``dharma.hooks``::

    [project.entry-points."dharma.hooks"]
    sutras = "dharma_sutra_reader.hooks"

that implements any of the hooks below, marked with :data:`hookimpl`::

    from dharma_kernel.hookspecs import hookimpl

    @hookimpl
    def dharma_data_readers():
        return [SutraReader()]

An implementation takes only the arguments it uses, so a hook can gain arguments
without breaking existing plugins. A hook module that fails to import, or an
implementation that raises, is reported and skipped; the rest keep working.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import pluggy

if TYPE_CHECKING:
    import typer

hookspec = pluggy.HookspecMarker("dharma")
hookimpl = pluggy.HookimplMarker("dharma")


class DataReader(Protocol):
    """Reads one data format into records.

    suffixes: the file suffixes it may read, e.g. ``(".jsonl",)``.
    sniff(path): whether it reads this file. Called only for files with one of those
        suffixes, so it may look inside (a JSON reader checks the top-level keys).
    read(path): yields one dict per record: ``text`` (str, required) and
        ``tags`` (list of str, optional), the concept tags that feed the modules'
        concept labels.
    """

    suffixes: tuple[str, ...]

    def sniff(self, path: Path) -> bool: ...

    def read(self, path: Path) -> Iterator[dict[str, Any]]: ...


class TrainCallback(Protocol):
    """Observes training. Methods a callback does not define are not called.

    on_step(step, metrics): after each optimizer step, with the logged scalars
        (total and per-component losses, learning rate) as floats.
    on_eval(step, metrics): after each evaluation, with its metrics.
    on_save(path): after a checkpoint directory has been written.
    """

    def on_step(self, step: int, metrics: dict[str, float]) -> None: ...

    def on_eval(self, step: int, metrics: dict[str, float]) -> None: ...

    def on_save(self, path: Path) -> None: ...


@hookspec
def dharma_data_readers() -> list[DataReader]:
    """Readers for data formats the kernel does not read itself.

    Return a list of objects shaped like :class:`DataReader`. They are asked
    before the built-in readers, so a plugin may also take over a suffix the
    kernel already knows.
    """


@hookspec
def dharma_train_callbacks() -> list[TrainCallback]:
    """Callbacks the trainer calls during every run (logging, early stopping, uploads).

    Return a list of objects shaped like :class:`TrainCallback`.
    """


@hookspec
def dharma_cli_commands(app: typer.Typer) -> None:
    """Add commands to the ``dharma`` command line.

    Decorate functions with ``@app.command()``; import heavy modules inside the
    command, not at module level, so that ``dharma --help`` stays fast. Raise
    :class:`dharma_kernel.errors.DharmaError` for mistakes the user can fix: the
    CLI prints its message without a traceback.
    """
