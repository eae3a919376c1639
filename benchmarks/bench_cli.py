"""Start-up time of the CLI: ``dharma --help`` and ``dharma plugins`` should answer within 0.5 s."""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

TARGET_S = 0.5
RUNS = 5
COMMANDS = (["--help"], ["plugins"])


def dharma_script() -> str:
    """The venv's ``dharma`` console script, else the one on PATH."""
    beside = Path(sys.executable).with_name("dharma")
    found = str(beside) if beside.exists() else shutil.which("dharma")
    if found is None:
        raise SystemExit("no `dharma` script: run `make install` first")
    return found


def wall_times(command: list[str], runs: int = RUNS) -> list[float]:
    subprocess.run(command, check=True, capture_output=True)  # warm the file cache; not timed
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return times


def main() -> bool:
    """Print best and median wall time per command; True when every median is within the target."""
    script = dharma_script()
    print(f"{'command':<18} {'best s':>7} {'median s':>9} {'target s':>9}  result   ({RUNS} runs)")
    ok = True
    for args in COMMANDS:
        times = wall_times([script, *args])
        median = statistics.median(times)
        passed = median <= TARGET_S
        ok &= passed
        name, result = "dharma " + " ".join(args), "pass" if passed else "FAIL"
        print(f"{name:<18} {min(times):>7.3f} {median:>9.3f} {TARGET_S:>9.1f}  {result}")
    return ok


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
