"""A training run's directory: step checkpoints, the ``latest`` and ``best`` links, metrics.

    runs/<name>/
      checkpoints/step-00000200/   model directory + trainer_state.pt
      latest -> checkpoints/step-00000200
      best   -> checkpoints/step-00000100
      metrics.jsonl

Each checkpoint is written beside its final name and renamed into place, then the
links are swapped by a rename too, so a kill at any moment leaves ``latest`` and
``best`` pointing at complete checkpoints. ``keep_last`` bounds the step
checkpoints kept; the ones ``latest`` and ``best`` name are never removed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from ..errors import DharmaError

STATE_FILE = "trainer_state.pt"
_STEP = re.compile(r"step-(\d+)$")


class RunDir:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.checkpoints = self.root / "checkpoints"
        self.metrics = self.root / "metrics.jsonl"

    def link(self, name: str) -> Path | None:
        """Where ``latest`` or ``best`` points, if it exists and is complete."""
        path = self.root / name
        if path.is_symlink() and (path / "config.json").exists():
            return path.resolve()
        return None

    def step_dir(self, step: int) -> Path:
        return self.checkpoints / f"step-{step:08d}"

    def has_run(self) -> bool:
        return self.link("latest") is not None

    def point(self, name: str, target: Path) -> None:
        """Make ``name`` a link to ``target`` in one rename."""
        temporary = self.root / f".{name}.tmp"
        temporary.unlink(missing_ok=True)
        temporary.symlink_to(os.path.relpath(target, self.root))
        os.replace(temporary, self.root / name)

    def prune(self, keep_last: int) -> None:
        """Remove step checkpoints beyond the newest ``keep_last``, never ones a link names."""
        kept = {p for p in (self.link("latest"), self.link("best")) if p is not None}
        steps = sorted(
            (p for p in self.checkpoints.glob("step-*") if _STEP.search(p.name)),
            key=lambda p: int(_STEP.search(p.name).group(1)),
        )
        for old in steps[:-keep_last]:
            if old.resolve() not in kept:
                shutil.rmtree(old, ignore_errors=True)

    def log(self, record: dict[str, Any]) -> None:
        with self.metrics.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_metrics(self, step: int) -> None:
        """Forget metrics logged after ``step``: a resumed run logs those steps again."""
        if not self.metrics.exists():
            return
        kept = [
            line
            for line in self.metrics.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step
        ]
        self.metrics.write_text("".join(line + "\n" for line in kept))


def model_directory(path: str | Path) -> Path:
    """A model directory, or a run directory's ``best`` (else ``latest``) checkpoint."""
    path = Path(path)
    if (path / "config.json").exists():
        return path
    run = RunDir(path)
    for name in ("best", "latest"):
        found = run.link(name)
        if found is not None:
            return found
    if not path.exists():
        raise DharmaError(f"{path}: no such model or run directory")
    raise DharmaError(
        f"{path}: neither a saved model (no config.json) nor a training run (no best/ or latest/)",
        hint="Give the directory `dharma train` or `dharma assemble` wrote.",
    )
