"""torchrun with 2 CPU processes (gloo) trains as 1 process accumulating twice as many micro-batches,
replicated (DDP) or sharded (FSDP2), and resumes the same way."""

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


def activation_tables(folder: Path) -> list[tuple[int, dict]]:
    lines = (folder / "run" / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["activation"]) for r in map(json.loads, lines) if "activation" in r]


def train(manifest: Path, *args: str, processes: int = 1) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NO_COLOR": "1"}
    launcher = [str(TORCHRUN), "--standalone", "--nproc_per_node", str(processes)]
    command = [*(launcher if processes > 1 else [sys.executable]), "-m", "dharma_kernel", "train"]
    done = subprocess.run([*command, str(manifest), *args], capture_output=True, text=True, env=env,
                          timeout=600, cwd=manifest.parent)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def assert_same_run(a: list[tuple[int, float]], b: list[tuple[int, float]]) -> None:
    assert [step for step, _ in a] == [step for step, _ in b]
    for (_, x), (_, y) in zip(a, b, strict=True):
        assert (x is None and y is None) or abs(x - y) <= TOLERANCE * abs(x)


@pytest.mark.skipif(not TORCHRUN.exists(), reason="needs torchrun beside this Python")
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_equal_one_with_doubled_accumulation(tmp_path, strategy):
    settings = {"max_steps": 4, "eval_every": 2, "batch_size": 2}
    one = write_manifest(tmp_path / "one", dropout=0.0, train={**settings, "grad_accum": 2})
    two = write_manifest(
        tmp_path / "two", dropout=0.0, train={**settings, "grad_accum": 1, "distributed": strategy}
    )
    train(one)
    double = train(two, processes=2)
    assert double.stdout.count("trained 4 steps") == 1  # only the main process reports
    assert "find_unused_parameters" not in double.stderr  # torch's false positive for routed stacks

    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert [step for step, _ in a if _ is not None] == [0, 1, 2, 2, 3, 4, 4]
    assert_same_run(a, b)
    wa, wb = weights(tmp_path / "one" / "run" / "latest"), weights(tmp_path / "two" / "run" / "latest")
    assert wa.keys() == wb.keys()  # a sharded run saves whole, ordinary model directories
    for name in wa:
        assert (wa[name] - wb[name]).abs().max() <= 1e-4, name
    # Under DDP each process evaluates half the rows, under FSDP all of them counted once: the
    # module-by-concept tables add up to one process's.
    ta, tb = activation_tables(tmp_path / "one"), activation_tables(tmp_path / "two")
    assert [step for step, _ in ta] == [step for step, _ in tb] == [0, 2, 4]
    for (_, x), (_, y) in zip(ta, tb, strict=True):
        assert x["tokens"] == y["tokens"] and sum(x["tokens"]) > 0
        for u, v in zip(sum(x["mean"], []), sum(y["mean"], []), strict=True):
            assert (u is None and v is None) or abs(u - v) <= 1e-4 * max(abs(u), 1e-3)

    # Resuming restores the (gathered, then re-sharded) optimizer state: both runs go on alike.
    train(one, "--resume", "--max-steps", "6")
    train(two, "--resume", "--max-steps", "6", processes=2)
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert [step for step, _ in a][-4:] == [5, 6, 6, 6]
    assert_same_run(a, b)


def test_ddp_looks_for_unused_parameters_only_where_a_step_can_leave_some():
    from tiny import tiny_model

    from dharma_kernel.application import add_heads
    from dharma_kernel.train.distributed import can_leave_unused

    assert not can_leave_unused(tiny_model("sequential"))
    assert not can_leave_unused(tiny_model("parallel"))
    assert can_leave_unused(tiny_model("routed"))
    with_head = tiny_model("sequential")
    add_heads(with_head, [{"plugin": "classification", "config": {"labels": ["a", "b"]}}])
    assert can_leave_unused(with_head)
