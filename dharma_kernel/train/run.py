"""``dharma train`` and ``dharma finetune`` as a function: a manifest turned into a finished run.

    summary = train("manifest.toml", TrainOptions(max_steps=100))

The manifest picks the session: :class:`~.session._Session` trains the model it describes;
with a ``[finetune]`` section, :class:`~.finetune.FinetuneSession` fine-tunes its foundation.
Each process under torchrun calls this; the run directory's lock keeps a second run out.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from ..manifest import Manifest, load_manifest
from .distributed import setup, teardown
from .finetune import FinetuneSession
from .runlock import run_lock
from .session import Summary, TrainOptions, _Session

__all__ = ["Summary", "TrainOptions", "train"]


def train(manifest: str | Path | Manifest, options: TrainOptions, console: Console | None = None) -> Summary:
    """Train what the manifest describes; with a ``[finetune]`` section, fine-tune its foundation."""
    if not isinstance(manifest, Manifest):
        manifest = load_manifest(manifest)
    session = FinetuneSession if manifest.finetune is not None else _Session
    dist, device = setup(options.device)
    try:
        runner = session(manifest, options, dist, device, console or Console())
        with run_lock(runner.run_dir.root, enabled=dist.main):
            runner.open_run_dir()
            return runner.run()
    finally:
        teardown(dist)
