"""Start-up time of the CLI: ``dharma --help`` and ``dharma plugins`` should answer within 0.5 s."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_S = 0.5
RUNS = 5
COMMANDS = (["--help"], ["plugins"])
EXTRA = 40  # fake plugin distributions added for the crowded run


def dharma_script() -> str:
    """The venv's ``dharma`` console script, else the one on PATH."""
    beside = Path(sys.executable).with_name("dharma")
    found = str(beside) if beside.exists() else shutil.which("dharma")
    if found is None:
        raise SystemExit("no `dharma` script: run `make install` first")
    return found


def wall_times(command: list[str], env: dict[str, str], runs: int = RUNS) -> list[float]:
    subprocess.run(command, check=True, capture_output=True, env=env)  # warm the file cache; not timed
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True, env=env)
        times.append(time.perf_counter() - start)
    return times


def extra_plugins(site: Path, count: int) -> None:
    """``count`` more installed module distributions (metadata only), as if all 37 and more were there."""
    for i in range(count):
        info = site / f"dharma_bench_{i}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: dharma-bench-{i}\nVersion: 0.1\n")
        ref = f"crisis.bench{i}"
        (info / "entry_points.txt").write_text(
            f"[dharma.modules]\n{ref} = dharma_bench_{i}:Module\n\n[dharma.api]\n{ref} = 1.0\n"
        )


def main() -> bool:
    """Print best and median wall time per command; True when every median is within the target."""
    script = dharma_script()
    print(
        f"{'command':<18} {'plugins':>8} {'best s':>7} {'median s':>9} {'target s':>9}  result  ({RUNS} runs)"
    )
    ok = True
    with tempfile.TemporaryDirectory() as site:
        extra_plugins(Path(site), EXTRA)
        installed = {**os.environ}
        crowded = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [site, os.environ.get("PYTHONPATH")])),
        }
        for args in COMMANDS:
            for env in (installed, crowded):
                times = wall_times([script, *args], env)
                count = len(
                    json.loads(
                        subprocess.run(
                            [script, "plugins", "--json"], capture_output=True, env=env, check=True
                        ).stdout
                    )
                )
                median = statistics.median(times)
                passed = median <= TARGET_S
                ok &= passed
                name, result = "dharma " + " ".join(args), "pass" if passed else "FAIL"
                print(f"{name:<18} {count:>8} {min(times):>7.3f} {median:>9.3f} {TARGET_S:>9.1f}  {result}")
    return ok


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
