"""Each stage of ``dharma prepare`` alone on a generated corpus: CPU seconds and MB/s of text per stage.

The corpus (``--mb``, or DHARMA_BENCH_STAGES_MB; default 20) is bench_prepare's generated
text. Each stage runs in one process on the previous stage's output held in memory:
read (the .txt reader), clean (``clean_chunk``, one process), filter and split (duplicate
hashes, the held-out draw), tokenizer (training the 8,000-token BPE), tokenize (ids, as
packing asks for them without modules, in prepare's chunks) and pack and write
(``TextStream`` and ``ShardWriter`` on those ids), and apart, tokenize and label (``TextStream``
with five modules' concept labels, as a model with modules needs). CPU seconds count every
thread of the process (the Rust tokenizer's too), so they depend less on the machine's load than wall time;
``2-core bound`` is the MB/s the stages' CPU time would allow if two cores did nothing else.

``--baseline DIR`` (a source tree holding another ``dharma_kernel``, e.g. from
``git archive main dharma_kernel | tar -x -C DIR``) runs the same stages on that code too,
alternating round by round, and prints the ratio per stage.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_prepare import ROOT, generate, load  # noqa: E402

MBPS_MIN = 10.0
STAGES = ("read", "clean", "filter and split", "tokenizer", "tokenize", "pack and write",
          "tokenize and label")  # fmt: skip
# Concept labels for five modules: what packing does instead of "tokenize" and "pack and write" when
# the model has modules (offsets, each lexicon's search, labels); not part of the 2-core bound below.
LABEL_REFS = ("paths.karma", "paths.seva", "paths.bhakti", "paths.jnana", "paths.dharma")
BOUND_STAGES = STAGES[:-1]


def measure(corpus: Path) -> dict[str, tuple[float, float]]:
    """``{stage: (CPU seconds, wall seconds)}`` for the code this process imports."""
    from dharma_kernel.data import packing
    from dharma_kernel.data.clean import RecordFilter, clean_chunk
    from dharma_kernel.data.packing import _tokenize
    from dharma_kernel.data.readers import iter_records
    from dharma_kernel.data.report import DataReport
    from dharma_kernel.data.shards import ShardWriter, id_dtype
    from dharma_kernel.data.split import _draw
    from dharma_kernel.data.tokenizer import train_tokenizer

    times: dict[str, tuple[float, float]] = {}

    def timed(stage, work):
        wall, cpu = time.perf_counter(), time.process_time()
        result = work()
        times[stage] = (time.process_time() - cpu, time.perf_counter() - wall)
        return result

    records = timed("read", lambda: list(iter_records([corpus], False, DataReport())))
    cleaned = timed("clean", lambda: clean_chunk(records))
    keep = RecordFilter(20, DataReport())
    kept = timed("filter and split", lambda: [r for r in cleaned if keep(r) and _draw(r.text, 0) >= 0.01])
    tokenizer = timed("tokenizer", lambda: train_tokenizer((record.text for record in kept), 8000))
    # Tokenized in the chunks prepare gives packing, on a copy (the Rust tokenizer caches words).
    texts = [record.text for record in kept]
    chunks = range(0, len(kept), 4096)
    fresh = copy.deepcopy(tokenizer)
    ids = timed("tokenize", lambda: [_tokenize(fresh, texts[b : b + 4096], False)[0] for b in chunks])
    done = iter(ids)
    tokenize = packing._tokenize
    packing._tokenize = lambda *args, **kwargs: (next(done), [])  # packing alone: the ids made above
    with tempfile.TemporaryDirectory() as scratch:
        writer = ShardWriter(Path(scratch), "train", id_dtype(len(tokenizer)), 256, 0)
        stream = packing.TextStream(tokenizer, 256)

        def pack_and_write():
            for begin in chunks:
                writer.write(stream.encode(kept[begin : begin + 4096]))
            writer.write(stream.padding())
            writer.close()

        timed("pack and write", pack_and_write)
    from dharma_kernel.concepts import lexicons_for

    packing._tokenize = tokenize  # put back: this stage tokenizes (with offsets) itself
    labelled = packing.TextStream(copy.deepcopy(tokenizer), 256, LABEL_REFS, lexicons_for(LABEL_REFS))
    timed("tokenize and label", lambda: [labelled.encode(kept[begin : begin + 4096]) for begin in chunks])
    return times


def run_tree(tree: Path | None, corpus: Path) -> dict[str, tuple[float, float]]:
    """:func:`measure` in a fresh process, on the ``dharma_kernel`` in ``tree`` (None: this checkout)."""
    source = str(tree or ROOT)
    code = (
        f"import json, pathlib, sys; sys.path[:0] = [{source!r}, {str(Path(__file__).parent)!r}]\n"
        f"import dharma_kernel; assert dharma_kernel.__file__.startswith({source!r})\n"
        f"from bench_prepare_stages import measure\n"
        f"print(json.dumps(measure(pathlib.Path({str(corpus)!r}))))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"the stages failed on {source}:\n{result.stderr[-3000:]}")
    return {stage: tuple(value) for stage, value in json.loads(result.stdout.splitlines()[-1]).items()}


def main(argv: list[str] | None = None) -> bool:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=int(os.environ.get("DHARMA_BENCH_STAGES_MB", "20")))
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--baseline", type=Path, help="Another source tree to compare with, round by round.")
    parser.add_argument("--keep", type=Path, help="Generate the corpus here and keep it (reused if present).")
    args = parser.parse_args(argv if argv is not None else [])
    trees = {"this": None, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
    with tempfile.TemporaryDirectory(prefix="dharma-bench-stages-") as scratch:
        corpus = (args.keep or Path(scratch)) / "corpus"
        if not corpus.is_dir():
            generate(corpus, args.mb)
        size = sum(path.stat().st_size for path in corpus.iterdir()) / 1e6
        results: dict[str, list[dict[str, tuple[float, float]]]] = {name: [] for name in trees}
        for round_ in range(args.rounds):
            for name, tree in trees.items() if round_ % 2 == 0 else reversed(trees.items()):
                before = load()
                results[name].append(run_tree(tree, corpus))
                print(f"round {round_ + 1} {name}: done ({before})", flush=True)
    print(f"{size:.1f} MB of generated text; median of {args.rounds} round(s); CPU-s counts every thread")
    columns = " | {:>15s} {:>9s} {:>9s}"
    names = [columns.format(name + " CPU-s", "MB/CPU-s", "wall MB/s") for name in trees]
    header = f"{'stage':18s}" + "".join(names)
    print(header + (" | CPU ratio this/baseline" if args.baseline else ""))
    totals = {name: 0.0 for name in trees}
    tokenizer_cpu = {name: 0.0 for name in trees}
    for stage in STAGES:
        line = f"{stage:18s}"
        cpu = {}
        for name in trees:
            cpu[name] = float(np.median([r[stage][0] for r in results[name]]))
            wall = float(np.median([r[stage][1] for r in results[name]]))
            totals[name] += cpu[name] if stage in BOUND_STAGES else 0.0
            if stage == "tokenizer":
                tokenizer_cpu[name] = cpu[name]
            line += f" | {cpu[name]:15.2f} {size / max(cpu[name], 1e-9):9.1f} {size / max(wall, 1e-9):9.1f}"
        if args.baseline:
            line += f" | {cpu['this'] / max(cpu['baseline'], 1e-9):.2f}"
        print(line)
    bound = {name: 2 * size / total for name, total in totals.items()}
    bounds = ", ".join(f"{name} {value:.1f} MB/s" for name, value in bound.items())
    print(f"2-core bound (all stages' CPU time over two idle cores): {bounds} ({load()})")
    # The tokenizer trains on at most max_training_chars (100 M), so on a large corpus its share fades.
    large = {name: 2 * size / (total - tokenizer_cpu[name]) for name, total in totals.items()}
    print("  without the tokenizer's training (a corpus far beyond 100 MB): "
          + ", ".join(f"{name} {value:.1f} MB/s" for name, value in large.items()))  # fmt: skip
    met = bound["this"] >= MBPS_MIN
    print(f"  2-core bound >= 10 MB/s: {'met' if met else 'MISSED'}")
    return met


if __name__ == "__main__":
    sys.exit(0 if main(sys.argv[1:]) else 1)
