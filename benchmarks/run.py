"""Run every ``benchmarks/bench_*.py`` (or those named: ``run.py cli``); exit 1 if one missed its target.

Each benchmark module has ``main()``, which prints its numbers and returns False when
a target was missed. Benchmarks are not tests: pytest never collects them.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def main(names: list[str]) -> int:
    paths = sorted(Path(__file__).parent.glob("bench_*.py"))
    known = {path.stem.removeprefix("bench_"): path for path in paths}
    if unknown := sorted(set(names) - set(known)):
        print(f"unknown benchmark: {', '.join(unknown)}; known: {', '.join(known)}")
        return 2
    if names:
        paths = [known[name] for name in names]
    missed = []
    for path in paths:
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        print(f"== {path.stem}")
        if module.main() is False:
            missed.append(path.stem)
        print()
    if missed:
        print(f"missed target: {', '.join(missed)}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
