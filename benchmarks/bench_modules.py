"""Parameters of the standard modules per preset and family, and training speed over the bare backbone.

Counts come from models built on the meta device; speed from one plain training loop
(forward with labels, backward, AdamW step) run on the bare backbone and on each
assembled model in this one process, same batch, so the ratios compare like with like.
``--quick`` (or DHARMA_BENCH_QUICK=1) times fewer steps.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from dharma_kernel import registry
from dharma_kernel.assemble import build, build_on_meta, plan
from dharma_kernel.backbone import backbone_config, fresh_backbone
from dharma_kernel.catalogue import standard_refs
from dharma_kernel.freeze import parameter_table
from dharma_kernel.manifest import load_manifest

LAYERS = {"tiny": [2, 4], "lite": [2, 4], "seed": [3]}
LITE_SHARE_MAX = 0.05
SEED_MODULES, SEED_TOTAL, TOLERANCE = 174e6, 262e6, 0.03
SPEED = (("lite", "routed", 0.9), ("seed", "routed", 0.8), ("seed", "sequential", None))
BATCH, LENGTH, WARMUP = 4, 128, 2
STEPS, QUICK_STEPS = 3, 1

MANIFEST = """\
[model]
name = "bench-{preset}-{composition}"

[backbone]
config = {{}}  # DistilGPT2's shape, fresh weights

[modules]
preset = "{preset}"
include = {include}
at_layers = {layers}
composition = "{composition}"
top_k = {top_k}
"""


def installed_standard() -> list[str]:
    installed = {info.ref for info in registry.discover("module") if info.problem is None}
    return [ref for ref in standard_refs() if ref in installed]


def manifest_path(folder: Path, refs: list[str], preset: str, composition: str) -> Path:
    include = ["all"] if len(refs) == len(standard_refs()) else refs
    text = MANIFEST.format(
        preset=preset,
        composition=composition,
        include=json.dumps(include),
        layers=LAYERS[preset],
        top_k=min(2, len(refs)),
    )
    path = folder / f"{preset}-{composition}.toml"
    path.write_text(text)
    return path


def judge(passed: bool, complete: bool) -> str:
    return ("pass" if passed else "FAIL") if complete else ("pass*" if passed else "fail*")


def parameter_counts(folder: Path, refs: list[str], complete: bool) -> bool:
    tables = {}
    for preset in LAYERS:
        model = build_on_meta(plan(load_manifest(manifest_path(folder, refs, preset, "routed"))))
        tables[preset] = {row.group: row.parameters for row in parameter_table(model)}
    groups = list(dict.fromkeys(group for table in tables.values() for group in table))
    layers = ", ".join(f"{preset} at layers {layers}" for preset, layers in LAYERS.items())
    print(f"parameters, DistilGPT2-shaped fresh backbone, routed top_k 2; {layers}")
    print(f"{'group':<14}" + "".join(f"{preset:>14}" for preset in tables))
    for group in groups:
        print(f"{group:<14}" + "".join(f"{table.get(group, 0):>14,}" for table in tables.values()))

    def modules(table: dict[str, int]) -> int:
        return sum(n for group, n in table.items() if group not in ("backbone", "routers", "total"))

    lite, seed = tables["lite"], tables["seed"]
    share = modules(lite) / lite["backbone"]
    checks = [
        ("lite modules / backbone", f"{100 * share:.2f}%", f"<= {100 * LITE_SHARE_MAX:.0f}%",
         share <= LITE_SHARE_MAX),
        ("seed modules", f"{modules(seed) / 1e6:.1f}M", f"{SEED_MODULES / 1e6:.0f}M +-3%",
         abs(modules(seed) / SEED_MODULES - 1) <= TOLERANCE),
        ("seed total", f"{seed['total'] / 1e6:.1f}M", f"{SEED_TOTAL / 1e6:.0f}M +-3%",
         abs(seed["total"] / SEED_TOTAL - 1) <= TOLERANCE),
    ]  # fmt: skip
    print(f"\n{'check':<24} {'measured':>10} {'target':>12}  result")
    for name, measured, target, passed in checks:
        print(f"{name:<24} {measured:>10} {target:>12}  {judge(passed, complete)}")
    return all(passed for *_, passed in checks)


def tokens_per_second(model: torch.nn.Module, ids: torch.Tensor, steps: int) -> float:
    """Plain training steps on one fixed batch; the first WARMUP steps are not timed."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    for step in range(WARMUP + steps):
        if step == WARMUP:
            start = time.perf_counter()
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return ids.numel() * steps / (time.perf_counter() - start)


def training_speed(folder: Path, refs: list[str], complete: bool, steps: int) -> bool:
    text = backbone_config(None, {})
    ids = torch.randint(0, text.vocab_size, (BATCH, LENGTH), generator=torch.Generator().manual_seed(0))
    print(
        f"training speed: batch {BATCH} x {LENGTH} tokens, {torch.get_num_threads()} threads, "
        f"{WARMUP} warm-up + {steps} timed steps, AdamW"
    )
    torch.manual_seed(0)
    bare = fresh_backbone(text)
    rows = [("bare backbone", sum(p.numel() for p in bare.parameters()), tokens_per_second(bare, ids, steps))]
    del bare
    ok = True
    print(f"{'config':<28} {'params':>9} {'tokens/s':>9} {'ratio':>7} {'target':>7}  result")
    print(f"{rows[0][0]:<28} {rows[0][1] / 1e6:>8.1f}M {rows[0][2]:>9.1f} {1:>7.2f} {'-':>7}  -")
    for preset, composition, target in SPEED:
        model = build(plan(load_manifest(manifest_path(folder, refs, preset, composition))))
        params = sum(p.numel() for p in model.parameters())
        speed = tokens_per_second(model, ids, steps)
        del model
        gc.collect()
        ratio = speed / rows[0][2]
        name = f"{preset} {composition}" + (" top_k 2" if composition == "routed" else "")
        passed = target is None or ratio >= target
        ok &= passed
        result = "report" if target is None else judge(passed, complete)
        shown = "-" if target is None else f">={target}"
        print(f"{name:<28} {params / 1e6:>8.1f}M {speed:>9.1f} {ratio:>7.2f} {shown:>7}  {result}")
    return ok


def main(quick: bool = False) -> bool:
    """Print the counts and speeds; False when a target is missed with all standard modules installed."""
    quick = quick or os.environ.get("DHARMA_BENCH_QUICK") == "1"
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    refs = installed_standard()
    total = len(standard_refs())
    if not refs:
        print("no standard module is installed: nothing to measure")
        return True
    complete = len(refs) == total
    if not complete:
        print(f"{len(refs)} of {total} standard modules installed ({', '.join(refs)}):")
        print(f"* targets are for all {total}; results marked * are shown, not judged\n")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as folder:
        counts_ok = parameter_counts(Path(folder), refs, complete)
        print()
        speed_ok = training_speed(Path(folder), refs, complete, QUICK_STEPS if quick else STEPS)
    return (counts_ok and speed_ok) or not complete


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"time {QUICK_STEPS} step(s), not {STEPS}")
    sys.exit(0 if main(parser.parse_args().quick) else 1)
