"""torchrun with 2 CPU processes (gloo) trains as 1 process accumulating twice as many micro-batches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from trainkit import weights, write_manifest

TORCHRUN = Path(sys.executable).with_name("torchrun")
# Summation order differs (two partial gradients all-reduced vs one accumulated):
# measured differences were about 1e-7 relative; this bound leaves room for other CPUs.
TOLERANCE = 1e-5


def losses(folder: Path) -> list[tuple[int, float]]:
    lines = (folder / "run" / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r.get("loss", r.get("eval_loss"))) for r in map(json.loads, lines)]


@pytest.mark.skipif(not TORCHRUN.exists(), reason="needs torchrun beside this Python")
def test_two_processes_equal_one_with_doubled_accumulation(tmp_path):
    settings = {"max_steps": 4, "eval_every": 2, "batch_size": 2}
    one = write_manifest(tmp_path / "one", dropout=0.0, train={**settings, "grad_accum": 2})
    two = write_manifest(tmp_path / "two", dropout=0.0, train={**settings, "grad_accum": 1})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NO_COLOR": "1"}
    single = subprocess.run([sys.executable, "-m", "dharma_kernel", "train", str(one)],
                            capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert single.returncode == 0, single.stderr
    command = [
        str(TORCHRUN),
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "dharma_kernel",
        "train",
        str(two),
    ]
    double = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert double.returncode == 0, double.stderr
    assert double.stdout.count("trained 4 steps") == 1  # only the main process reports

    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert [step for step, _ in a] == [step for step, _ in b] == [0, 1, 2, 2, 3, 4, 4]
    for (_, x), (_, y) in zip(a, b, strict=True):
        assert abs(x - y) <= TOLERANCE * abs(x)
    wa, wb = weights(tmp_path / "one" / "run" / "latest"), weights(tmp_path / "two" / "run" / "latest")
    for name in wa:
        assert (wa[name] - wb[name]).abs().max() <= 1e-4, name
