"""``dharma prepare`` on a generated corpus: time, MB/s, peak memory; then a prepared rerun's start.

The corpus (``--mb``, or DHARMA_BENCH_PREPARE_MB; default 100) is generated into a
temporary directory: .txt files of 25 MB, paragraphs of about 700 characters of words
drawn from a 20,000-word Zipf vocabulary, each paragraph numbered so none is a
duplicate. The manifest trains a byte-level BPE of 8,000 tokens, max_length 256, no
modules (concept labels would add their own cost). Measured:

1. ``dharma prepare`` in a fresh process: wall time, MB/s of input text, peak RSS of
   the main process and of the largest cleaning process (watched in /proc), and the CPU
   seconds of both (less dependent on the machine's load than wall time);
2. ``dharma train --max-steps 1`` on the same data and cache: the wall time of the whole
   process (start, reuse of the prepared data, step-0 evaluation of at most
   ``eval_tokens``, one step, one save) bounds when the first step starts;
3. reading a batch of 8 rows from the memory map against indexing the same rows of
   the in-memory packed tensors, interleaved, beside the time of one training step of
   a 2-layer model on them.

Targets: peak RSS <= 1.5 GiB, >= 10 MB/s, rerun <= 10 s, batch reading from shards
adds under 5 % to a step. The load average is printed with each figure: on a busy
machine the times are not to be trusted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
GIB = 1 << 30
PEAK_MAX = 1.5 * GIB
MBPS_MIN = 10.0
RERUN_MAX = 10.0
READ_SHARE_MAX = 0.05
EVAL_ROWS = 65_536 // 256  # train.eval_tokens' default over data.max_length: rows each evaluation reads
MANIFEST = """[backbone]
config = { architecture = "gpt2", n_layer = 2, n_embd = 64, n_head = 2, n_positions = 256, vocab_size = 8000 }
tokenizer = { train = true, vocab_size = 8000 }
[modules]
preset = "tiny"
[data]
train = ["corpus"]
max_length = 256
eval_fraction = 0.01
[train]
batch_size = 8
max_steps = 1
output = "run"
"""
# Runs `dharma ARGS` and prints the peak RSS of this process and of its largest descendant (the
# cleaning processes are the forkserver's children, so they are watched in /proc, not waited for).
PEAK = """
import os, resource, sys, threading, time
from dharma_kernel.cli import main
largest = 0
cpu = {}  # each descendant's CPU seconds when last seen
tick = os.sysconf("SC_CLK_TCK")
def descendants(pid):
    try:
        kids = [int(k) for k in open(f"/proc/{pid}/task/{pid}/children").read().split()]
    except OSError:
        return []
    return kids + [d for kid in kids for d in descendants(kid)]
def watch():
    global largest
    while True:
        for pid in descendants(os.getpid()):
            try:
                hwm = [line for line in open(f"/proc/{pid}/status") if line.startswith("VmHWM:")]
                largest = max([largest] + [int(line.split()[1]) * 1024 for line in hwm])
                fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
                cpu[pid] = max(cpu.get(pid, 0.0), (int(fields[11]) + int(fields[12])) / tick)
            except OSError:
                pass
        time.sleep(0.2)
threading.Thread(target=watch, daemon=True).start()
try:
    main(sys.argv[1:])
finally:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(f"PEAK {usage.ru_maxrss * 1024} {largest}", file=sys.stderr)
    print(f"CPU {usage.ru_utime + usage.ru_stime} {sum(cpu.values())}", file=sys.stderr)
"""


def load() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def generate(directory: Path, megabytes: int, seed: int = 0) -> int:
    """Write ``megabytes`` MB of paragraphs into ``directory``; return the bytes written."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = ["".join(rng.choice(letters, size=rng.integers(2, 10))) for _ in range(20_000)]
    weights = 1.0 / np.arange(1, len(words) + 1)
    weights /= weights.sum()
    directory.mkdir(parents=True, exist_ok=True)
    written, number, file_size = 0, 0, 25_000_000
    target = megabytes * 1_000_000
    while written < target:
        path = directory / f"part-{written // file_size:04d}.txt"
        with path.open("w", encoding="utf-8") as file:
            size = 0
            while size < file_size and written + size < target:
                picks = rng.choice(len(words), size=(200, 110), p=weights)
                block = []
                for row in picks:
                    number += 1
                    block.append(f"Paragraph {number}. " + " ".join(words[i] for i in row) + ".")
                text = "\n\n".join(block) + "\n\n"
                file.write(text)
                size += len(text)
        written += size
    return written


def run_peak(args: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, int, int, str, str]:
    started = time.perf_counter()
    command = [sys.executable, "-c", PEAK, *args]
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"dharma {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    peak = next(line for line in result.stderr.splitlines() if line.startswith("PEAK "))
    own, children = (int(value) for value in peak.split()[1:])
    return seconds, own, children, result.stdout, result.stderr


def cpu_seconds(stderr: str) -> tuple[float, float]:
    """CPU seconds of the ``dharma`` process (every thread) and of its descendants (sampled every
    0.2 s in /proc, so a little of each descendant's last moments is missed)."""
    line = next(line for line in stderr.splitlines() if line.startswith("CPU "))
    own, children = (float(value) for value in line.split()[1:])
    return own, children


def first_step(work: Path, env: dict[str, str]) -> tuple[float, float, float]:
    """Seconds from launching ``dharma train --max-steps 1`` until its data report is printed (the
    prepared data is open), until its step-0 evaluation is printed (the first step starts then),
    and until the process ends."""
    command = [sys.executable, "-m", "dharma_kernel", "train", "m.toml", "--max-steps", "1", "-o", "rerun"]
    started = time.perf_counter()
    shutil.rmtree(work / "rerun", ignore_errors=True)
    process = subprocess.Popen(command, cwd=work, env={**env, "PYTHONUNBUFFERED": "1"},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    ready, first, lines = None, None, []
    for line in process.stdout:  # type: ignore[union-attr]
        lines.append(line)
        if ready is None and line.startswith("dropped: "):  # the data report: the data is open
            ready = time.perf_counter() - started
        if first is None and (line.startswith("eval at step 0") or line.startswith("step 1/")):
            first = time.perf_counter() - started
    if process.wait() != 0 or first is None:
        raise SystemExit("dharma train on the prepared data failed:\n" + "".join(lines[-30:]))
    return ready or first, first, time.perf_counter() - started


def import_floor(env: dict[str, str]) -> float:
    """Seconds a fresh process takes to import what training needs (torch, transformers, the model)."""
    code = "import dharma_kernel.model, dharma_kernel.train.session"
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    return time.perf_counter() - started


def batch_reading(directory: Path, cache: Path, rounds: int = 30) -> tuple[float, float, float]:
    """Median seconds: 8 rows from the shards, the same rows from in-memory tensors, one training step."""
    import torch

    from dharma_kernel.data.prepare import open_prepared
    from dharma_kernel.train.windows import Windows

    data = open_prepared(directory).train
    rows = min(len(data), 4096)  # an in-memory copy of the first rows, as pack() would hold them
    memory = data.batch(list(range(rows)))
    windows = Windows(rows, 8, 1, seed=0)
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(
        GPT2Config(
            n_layer=2, n_embd=64, n_head=2, n_positions=256, vocab_size=8000, bos_token_id=0, eos_token_id=0
        )
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    shard_times, memory_times, step_times = [], [], []
    for step in range(rounds):
        indices = windows.micro_batches(step)[0]
        started = time.perf_counter()
        batch = data.batch(indices)
        shard_times.append(time.perf_counter() - started)
        started = time.perf_counter()
        index = torch.as_tensor(indices)
        same = {key: value[index] for key, value in memory.items()}
        memory_times.append(time.perf_counter() - started)
        assert all(torch.equal(batch[key], same[key]) for key in batch)
        started = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        step_times.append(time.perf_counter() - started)
    median = lambda values: float(np.median(values))  # noqa: E731
    return median(shard_times), median(memory_times), median(step_times)


def main(argv: list[str] | None = None) -> bool:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=int(os.environ.get("DHARMA_BENCH_PREPARE_MB", "100")))
    parser.add_argument("--keep", type=Path, help="Generate the corpus here and keep it (reused if present).")
    args = parser.parse_args(argv if argv is not None else [])
    with tempfile.TemporaryDirectory(prefix="dharma-bench-prepare-") as scratch:
        work = args.keep or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        corpus = work / "corpus"
        if not corpus.is_dir():
            print(f"generating {args.mb} MB ... ({load()})", flush=True)
            generate(corpus, args.mb)
        size = sum(path.stat().st_size for path in corpus.iterdir())
        (work / "m.toml").write_text(MANIFEST, encoding="utf-8")
        cache = Path(scratch) / "cache"
        env = {**os.environ, "DHARMA_CACHE": str(cache), "NO_COLOR": "1"}
        before = load()
        seconds, own, children, stdout, stderr = run_peak(["prepare", "m.toml", "--json"], work, env)
        prepared = json.loads(stdout)
        for line in stderr.splitlines():
            if " MB/s)" in line:
                print(f"  {line}")
        rate = size / 1e6 / seconds
        print(f"prepare {size / 1e6:.0f} MB: {seconds:.1f} s, {rate:.1f} MB/s, peak RSS {own / GIB:.2f} GiB "
              f"(largest cleaning process {children / GIB:.2f} GiB); {prepared['train']['rows']:,} rows, "
              f"{prepared['train']['tokens']:,} tokens, {prepared['dtype']} ids ({before})")  # fmt: skip
        main_cpu, other_cpu = cpu_seconds(stderr)
        total = main_cpu + other_cpu
        print(f"  CPU: {main_cpu:.1f} s in the dharma process, {other_cpu:.1f} s in its cleaning processes; "
              f"{size / 1e6 / total:.1f} MB per CPU-s; two cores doing nothing else would allow at most "
              f"{2 * size / 1e6 / total:.1f} MB/s")  # fmt: skip
        before = load()
        ready, rerun, whole = first_step(work, env)
        floor = import_floor(env)
        eval_rows = min(prepared["eval"]["rows"], EVAL_ROWS)
        print(f"dharma train on the prepared data: data open {ready:.1f} s after launch, first step "
              f"starts at {rerun:.1f} s (after the step-0 evaluation of {eval_rows} rows), "
              f"whole --max-steps 1 run {whole:.1f} s; importing torch, transformers and the model "
              f"alone {floor:.1f} s ({before})")  # fmt: skip
        before = load()
        shard, memory, step = batch_reading(Path(prepared["directory"]), cache)
        share = (shard - memory) / step
        print(f"8 rows: {shard * 1e3:.2f} ms from shards, {memory * 1e3:.2f} ms in memory; one step of a "
              f"2-layer model {step * 1e3:.1f} ms: shards add {share:.1%} ({before})")  # fmt: skip
    met = own <= PEAK_MAX and rate >= MBPS_MIN and rerun <= RERUN_MAX and share <= READ_SHARE_MAX
    checks = {
        "peak RSS <= 1.5 GiB": own <= PEAK_MAX,
        ">= 10 MB/s": rate >= MBPS_MIN,
        "rerun <= 10 s": rerun <= RERUN_MAX,
        "shards add <= 5 %": share <= READ_SHARE_MAX,
    }
    for name, ok in checks.items():
        print(f"  {name}: {'met' if ok else 'MISSED'}")
    return met


if __name__ == "__main__":
    sys.exit(0 if main(sys.argv[1:]) else 1)
