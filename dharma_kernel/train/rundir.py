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
import warnings
from pathlib import Path
from typing import Any

from ..errors import DharmaError, first_line

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

    def holds(self) -> str | None:
        """What makes this directory a run, if anything does: a ``latest`` link (even a dangling
        one), step checkpoints or metrics. A new run must not start over any of them."""
        latest = self.root / "latest"
        steps = [p for p in self.checkpoints.glob("step-*") if _STEP.search(p.name)]
        if latest.is_symlink():
            return f"latest: {os.readlink(latest)}"
        if steps:
            return f"{len(steps)} checkpoint(s) in {self.checkpoints.name}/"
        if self.metrics.exists():
            return self.metrics.name
        return None

    def clean_staging(self) -> None:
        """Remove what a kill while saving leaves: half-written checkpoints (``checkpoints/.step-*``,
        see checkpoint.write_directory) and half-made links (``.latest.tmp``, ``.best.tmp``).
        Only call it holding the run's lock: a live run's staging looks the same."""
        for staging in self.checkpoints.glob(".step-*"):
            shutil.rmtree(staging, ignore_errors=True)
        for name in ("latest", "best"):
            (self.root / f".{name}.tmp").unlink(missing_ok=True)

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
        try:
            with self.metrics.open("a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as err:  # a full disk, most likely
            raise DharmaError(
                f"cannot write {self.metrics}: {first_line(err)}",
                hint="The checkpoints saved so far are untouched: free some space, then resume.",
            ) from None

    def truncate_metrics(self, step: int) -> None:
        """Forget metrics logged after ``step``: a resumed run logs those steps again.
        A torn last line (the run was killed while writing it) is dropped with a warning."""
        if not self.metrics.exists():
            return
        records, torn = read_metric_lines(self.metrics)
        if torn is not None:
            warnings.warn(
                f"{self.metrics}, line {torn}: dropped a torn last record "
                "(the run was killed while writing it)",
                stacklevel=2,
            )
        kept = [line for _, line, record in records if record["step"] <= step]
        self.metrics.write_text("".join(line + "\n" for line in kept))


def read_metric_lines(path: Path) -> tuple[list[tuple[int, str, dict[str, Any]]], int | None]:
    """The records of a ``metrics.jsonl`` as (line number, line, record), and the number of a
    torn last line (a run killed mid-write leaves half a line), if there is one.

    Any other line that is not a JSON object with an integer ``step`` is a DharmaError naming it.
    """
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    records, torn = [], None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as err:
            if number == len(lines):
                torn = number
                continue
            reason = err.msg if isinstance(err, json.JSONDecodeError) else "nested too deeply"
            raise DharmaError(
                f"{path}, line {number}: not JSON ({reason})",
                hint="The trainer writes one JSON object per line; remove or repair that line.",
            ) from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise DharmaError(
                f"{path}, line {number}: a record needs an integer 'step'",
                hint="Was this file written by `dharma train`?",
            )
        records.append((number, line, record))
    return records, torn


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
