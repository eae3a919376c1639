"""Parameters of the standard modules per preset and family, and training speed over the bare backbone.

Counts come from models built on the meta device; speed from one plain training loop
(forward with labels, backward, fused AdamW step as the trainer takes) run on the bare
backbone and on each assembled model in this one process, same batch, so the ratios
compare like with like.
``--quick`` (or DHARMA_BENCH_QUICK=1) times fewer rounds. On a CUDA machine the speeds are
measured there, under bf16 autocast where the card supports it (what ``precision = "auto"`` picks);
DHARMA_BENCH_DEVICE=cpu measures on the CPU anyway. A later row is seed routed again with
the module linears on sgemm instead of oneDNN (``dharma_kernel.cpu_linear``), shown, not judged;
then seed routed on the other path (grouped on the CPU), also shown; then lite routed with fixed
capacity (``[modules] capacity_factor = 1.25``, dharma_kernel.capacity), shown, in every table.
``DHARMA_BENCH_COMPILE_MODE`` sets the compiled rows' torch.compile mode ("reduce-overhead": CUDA graphs).
``DHARMA_BENCH_STACKED=0`` times the grouped eager rows with their weights stacked in every forward.
Before the speeds: aten ops per training step (torch.profiler's count of every aten op, nested
ones included, on the CPU: the same on any machine) of a small backbone bare and assembled.
Op counts are of the grouped path (what a GPU runs; ``--per-module`` runs every module alone), with
the groups' weights held stacked as ``dharma train`` holds them there (dharma_kernel.train.stacked).
With ``--compile`` also compiled op counts: the bare backbone and ``lite`` with fixed capacity, as
``[train] compile = true`` trains them (modules trained as flat tensors, and once not), counting
aten ops and the kernels inductor generated.
Speeds run what the model runs by default: grouped on a GPU, every module alone on the CPU;
``--per-module`` or ``--grouped`` forces one path, to compare the two.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch

from dharma_kernel import registry
from dharma_kernel.assemble import build, build_on_meta, plan
from dharma_kernel.backbone import backbone_config, fresh_backbone
from dharma_kernel.catalogue import standard_refs
from dharma_kernel.cpu_linear import sgemm_only
from dharma_kernel.freeze import parameter_table
from dharma_kernel.manifest import load_manifest
from dharma_kernel.train.compiled import compiled
from dharma_kernel.train.flat import flatten_modules
from dharma_kernel.train.heap import keep_freed_memory
from dharma_kernel.train.stacked import stack_modules

LAYERS = {"tiny": [2, 4], "lite": [2, 4], "seed": [3]}
LITE_SHARE_MAX = 0.05
SEED_MODULES, SEED_TOTAL, TOLERANCE = 174e6, 262e6, 0.03
# (preset, composition, target on the CPU, target on a GPU, module linears by sgemm, the other path,
# capacity factor): the sgemm row shows what oneDNN gives; the "other path" row runs seed routed on
# the path the device does not choose by default (grouped on the CPU, one by one on a GPU), and the
# last lite with fixed capacity (always grouped), shown, not judged. The GPU targets are issue
# #14's (bf16, batch 8 x 256).
SPEED = (
    ("lite", "routed", 0.9, 0.7, False, False, None),
    ("seed", "routed", 0.8, 0.5, False, False, None),
    ("seed", "sequential", None, None, False, False, None),
    ("seed", "routed", None, None, True, False, None),
    ("seed", "routed", None, None, False, True, None),
    ("lite", "routed", None, None, False, False, 1.25),
)
# --compile: these again through torch.compile as `[train] compile = true` runs them, against the
# bare backbone compiled alike (the same targets), then lite again with fixed capacity (one graph)
COMPILED = (
    ("lite", "routed", 0.9, 0.7, None),
    ("seed", "routed", 0.8, 0.5, None),
    ("lite", "routed", None, None, 1.25),
)
SHAPE = {"cpu": (4, 128), "cuda": (8, 256)}  # batch x tokens per step
# torch.compile's mode for the compiled rows, as `[train] compile_mode` ("reduce-overhead": CUDA graphs)
COMPILE_MODE = os.environ.get("DHARMA_BENCH_COMPILE_MODE", "default")
# DHARMA_BENCH_STACKED=0: the eager rows stack the groups' weights in every forward and step each
# module tensor on its own, as before dharma_kernel.train.stacked (to compare the two)
HOLD_STACKED = os.environ.get("DHARMA_BENCH_STACKED", "1") != "0"
WARMUP, COMPILE_WARMUP = 2, 4  # compiled: the first steps compile (and a routed model recompiles once)
# Op counts: a 6-layer 128-wide GPT-2 at batch 4 x 64 (the shapes of issue #14), lite routed target.
OPS_BACKBONE, OPS_BATCH, OPS_LENGTH, OPS_TARGET = {"n_layer": 6, "n_embd": 128, "n_head": 4}, 4, 64, 2.0
# (preset, composition, with concept labels, capacity factor): labels are what `dharma train` passes
# when modules have lexicons (the concept and routing losses); the target row is without, as issue
# #14 counted; capacity: `[modules] capacity_factor` (dharma_kernel.capacity), shown, not judged.
OPS = (
    ("lite", "routed", False, None),
    ("lite", "routed", True, None),
    ("lite", "routed", False, 1.25),
    ("seed", "routed", False, None),
    ("seed", "sequential", False, None),
)


class Budget(NamedTuple):
    """Timed rounds per config: at least ``least``, at most ``most``, more only while under ``seconds``."""

    least: int
    most: int
    seconds: float


FULL, QUICK = Budget(least=2, most=10, seconds=30), Budget(least=1, most=3, seconds=5)

MANIFEST = """\
[model]
name = "bench-{preset}-{composition}"

[backbone]
config = {backbone}  # DistilGPT2's shape unless given, fresh weights

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


def manifest_path(
    folder: Path, refs: list[str], preset: str, composition: str, backbone: dict | None = None
) -> Path:
    include = ["all"] if len(refs) == len(standard_refs()) else refs
    text = MANIFEST.format(
        backbone="{" + ", ".join(f"{key} = {value}" for key, value in (backbone or {}).items()) + "}",
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


def bench_device() -> torch.device:
    wanted = os.environ.get("DHARMA_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(wanted)


class Trainer:
    """A model with its fused AdamW (the trainer's default), stepping on one fixed batch: forward with
    labels, backward, update."""

    def __init__(
        self,
        model: torch.nn.Module,
        device: torch.device,
        labels: bool = False,
        compile: bool = False,
        flat: bool = True,
        stacked: bool = HOLD_STACKED,
    ) -> None:
        self.model = model.to(device).train()
        self.params = sum(p.numel() for p in model.parameters())
        # compiled, as `[train] compile = true` trains: modules that compute at every step (fixed
        # capacity) trained as flat tensors (dharma_kernel.train.flat); the optimizer steps those
        flat = flatten_modules(self.model, set()) if compile and flat else None  # one decay, as below
        self.forward = compiled(self.model, COMPILE_MODE, flat) if compile else self.model
        # eager, as `dharma train` trains: the groups' parameters held stacked where the stacks run
        # grouped (dharma_kernel.train.stacked), stepped by it with AdamW's default weight decay
        everything = {id(p) for p in model.parameters()}
        self.stacked = stack_modules(self.model, device, everything) if stacked and not compile else None
        self.concept_labels = labels
        self.device = device
        held = [h.holds for h in (flat, self.stacked) if h is not None]
        trainable = [p for p in model.parameters() if p.requires_grad and not any(h(p) for h in held)]
        self.optimizer = torch.optim.AdamW(trainable + (flat.leaves if flat else []), lr=1e-4, fused=True)
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        self.autocast = torch.autocast("cuda", torch.bfloat16, enabled=bf16)

    def labels(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Concept labels ``[B, T, M]`` (a fixed draw, one token in ten labelled 1), if asked for."""
        if not self.concept_labels:
            return {}
        modules = len(self.model.module_refs)
        draw = torch.rand(*ids.shape, modules, generator=torch.Generator().manual_seed(1))
        return {"concept_labels": (draw < 0.1).to(torch.int8).to(ids.device)}

    def step(self, ids: torch.Tensor, phase: Callable[[str], Any] = contextlib.nullcontext) -> float:
        """One step's seconds; ``phase(name)`` is entered around each of forward, backward, optimizer."""
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        with self.autocast, phase("forward"):
            loss = self.forward(input_ids=ids, labels=ids, use_cache=False, **self.labels(ids)).loss
        with phase("backward"):
            loss.backward()  # on the CPU autograd runs on this thread, inside the range
        with phase("optimizer"):
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.stacked is not None:
                group = self.optimizer.param_groups[0]
                self.stacked.step(group["lr"], group["weight_decay"], group["betas"], group["eps"])
                self.stacked.zero_grad()
        if cuda:
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start


def set_grouped(model: torch.nn.Module, grouped: bool | None) -> torch.nn.Module:
    for stack in getattr(model, "stacks", {}).values():
        stack.grouped = grouped
    return model


def set_capacity(model: torch.nn.Module, factor: float | None) -> torch.nn.Module:
    for stack in getattr(model, "stacks", {}).values():
        stack.capacity_factor = factor
    return model


def row_name(preset: str, composition: str, factor: float | None = None) -> str:
    name = f"{preset} {composition}" + (" top_k 2" if composition == "routed" else "")
    return name + (f", capacity {factor}" if factor else "")


PHASES = ("forward", "backward", "optimizer")


def aten_ops(trainer: Trainer, ids: torch.Tensor, warmup: int = 1) -> tuple[int, int, dict[str, int]]:
    """(all, top-level, all per phase) aten ops of one training step, after ``warmup`` steps (the
    first creates the optimizer state; compiled, the first ones compile); the phases are forward
    (with the loss), backward, optimizer step and zero_grad."""
    from torch.profiler import ProfilerActivity, profile, record_function

    for _ in range(warmup):
        trainer.step(ids)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        trainer.step(ids, lambda phase: record_function(f"step/{phase}"))
    events = prof.events()
    # compiled: each kernel inductor generated counts as one op (named only with kernel profiling on)
    ops = [event for event in events if event.name.startswith("aten::") or "cpp_fused" in event.name]
    top = [e for e in ops if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    ranges = {e.name.removeprefix("step/"): e.time_range for e in events if e.name.startswith("step/")}
    phases = {
        phase: sum(1 for e in ops if ranges[phase].start <= e.time_range.start <= ranges[phase].end)
        for phase in PHASES
    }
    return len(ops), len(top), phases


def op_counts(folder: Path, refs: list[str], complete: bool, grouped: bool) -> bool:
    shape = ", ".join(f"{key} {value}" for key, value in OPS_BACKBONE.items())
    print(f"aten ops per training step, CPU: GPT-2 {shape}, batch {OPS_BATCH} x {OPS_LENGTH}, fused AdamW")
    print(
        f"{'config':<36} {'ops':>8} {'ratio':>6} {'top-level':>10} "
        + "".join(f"{phase:>10}" for phase in PHASES)
        + f" {'target':>7}  result"
    )
    ids = torch.randint(0, 50257, (OPS_BATCH, OPS_LENGTH), generator=torch.Generator().manual_seed(0))
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    bare, bare_top, phases = aten_ops(Trainer(fresh_backbone(backbone_config(None, OPS_BACKBONE)), cpu), ids)
    split = "".join(f"{phases[phase]:>10}" for phase in PHASES)
    print(f"{'bare backbone':<36} {bare:>8} {1:>6.2f} {bare_top:>10}{split} {'-':>7}  -")
    ok = True
    for preset, composition, labelled, factor in OPS:
        path = manifest_path(folder, refs, preset, composition, OPS_BACKBONE)
        model = set_capacity(set_grouped(build(plan(load_manifest(path))), grouped), factor)
        ops, top, phases = aten_ops(Trainer(model, cpu, labelled), ids)
        split = "".join(f"{phases[phase]:>10}" for phase in PHASES)
        judged = (preset, composition, labelled, factor) == ("lite", "routed", False, None)
        target = OPS_TARGET if judged else None
        passed = target is None or ops / bare <= target
        ok &= passed
        shown, result = ("-", "report") if target is None else (f"<={target}", judge(passed, complete))
        name = row_name(preset, composition, factor) + (", labels" if labelled else "")
        print(f"{name:<36} {ops:>8} {ops / bare:>6.2f} {top:>10}{split} {shown:>7}  {result}", flush=True)
        del model
        gc.collect()
    return ok


# --compile: op counts compiled as `[train] compile = true` trains, with fixed capacity (one graph):
# (name, capacity factor, modules trained flat); the bare backbone compiled alike is the reference.
COMPILED_OPS = (("lite routed top_k 2, capacity 1.25", 1.25, True), ("  the same, not flat", 1.25, False))


def compiled_op_counts(folder: Path, refs: list[str]) -> None:
    """Ops per training step compiled: aten ops plus inductor's generated kernels, one each."""
    import torch._inductor.config as inductor

    print(
        f"\ncompiled (torch.compile as `[train] compile = true`, mode default; aten ops and inductor's "
        f"kernels per step, after {COMPILE_WARMUP} warm-up steps), CPU, same shapes"
    )
    print(f"{'config':<36} {'ops':>8} {'ratio':>6} {'top-level':>10} " + "".join(f"{p:>10}" for p in PHASES))
    ids = torch.randint(0, 50257, (OPS_BATCH, OPS_LENGTH), generator=torch.Generator().manual_seed(0))
    cpu = torch.device("cpu")

    def row(name: str, trainer: Trainer, bare: int | None) -> int:
        start = time.perf_counter()
        ops, top, phases = aten_ops(trainer, ids, COMPILE_WARMUP)
        split = "".join(f"{phases[phase]:>10}" for phase in PHASES)
        ratio = ops / bare if bare else 1.0
        took = time.perf_counter() - start
        print(f"{name:<36} {ops:>8} {ratio:>6.2f} {top:>10}{split}  ({took:.0f} s)", flush=True)
        return ops

    with inductor.patch({"cpp.enable_kernel_profile": True}):  # names each kernel in the profile
        torch.manual_seed(0)
        backbone = fresh_backbone(backbone_config(None, OPS_BACKBONE))
        bare = row("bare backbone, compiled", Trainer(backbone, cpu, compile=True), None)
        for name, factor, flat in COMPILED_OPS:
            path = manifest_path(folder, refs, "lite", "routed", OPS_BACKBONE)
            model = set_capacity(set_grouped(build(plan(load_manifest(path))), True), factor)
            row(name, Trainer(model, cpu, compile=True, flat=flat), bare)
            del model
            gc.collect()


def paired_rounds(
    bare: Trainer, trainer: Trainer, ids: torch.Tensor, budget: Budget
) -> list[tuple[float, float]]:
    """(bare, assembled) step times: at least ``budget.least`` rounds, more while time is left."""
    pairs: list[tuple[float, float]] = []
    start = time.perf_counter()
    while len(pairs) < budget.most and (
        len(pairs) < budget.least or time.perf_counter() - start < budget.seconds
    ):
        pairs.append((bare.step(ids), trainer.step(ids)))
    return pairs


def training_speed(
    folder: Path,
    refs: list[str],
    complete: bool,
    budget: Budget,
    grouped: bool | None,
    compile: bool,
    eager: bool = True,
) -> bool:
    """Each round times one bare step then one assembled step, so a busy moment slows both alike."""
    text = backbone_config(None, {})
    device = bench_device()
    batch, length = SHAPE["cuda" if device.type == "cuda" else "cpu"]
    ids = torch.randint(0, text.vocab_size, (batch, length), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    where = (
        f"{torch.cuda.get_device_name(device)}, bf16 autocast, torch {torch.__version__}"
        if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    )  # fmt: skip
    together = device.type == "cuda" if grouped is None else grouped
    print(
        f"training speed: batch {batch} x {length} tokens, {where}, modules "
        f"{'grouped' if together else 'one by one'}, fused AdamW, "
        f"{WARMUP} warm-up steps per model; then rounds of one bare and one assembled step "
        f"({budget.least} to {budget.most} rounds, more while under {budget.seconds:.0f} s per config)."
    )
    # Other processes may share the CPU: the fastest step is the one least disturbed (as timeit does).
    print("tokens/s: from the fastest step; ratio: fastest bare step / fastest assembled step, same rounds")
    print(f"{'config':<36} {'params':>9} {'tokens/s':>9} {'ratio':>6} {'target':>7} {'rounds':>6}  result")
    if device.type == "cpu":
        keep_freed_memory()  # as dharma train does on the CPU, for both sides
    ok = True
    if eager:
        ok &= eager_rows(folder, refs, complete, budget, grouped, device, ids, together)
    if compile:
        ok &= compiled_rows(folder, refs, complete, budget, grouped, device, ids)
    return ok


def eager_rows(
    folder: Path,
    refs: list[str],
    complete: bool,
    budget: Budget,
    grouped: bool | None,
    device: torch.device,
    ids: torch.Tensor,
    together: bool,
) -> bool:
    bare = bare_row(device, ids, compile=False)
    cuda = device.type == "cuda"
    ok = True
    for preset, composition, cpu_target, gpu_target, sgemm, other, factor in SPEED:
        if other and grouped is not None:
            continue  # a path was forced: there is no other one to show
        if sgemm and cuda:
            continue  # sgemm or oneDNN: a CPU matter
        path = manifest_path(folder, refs, preset, composition)
        model = set_grouped(build(plan(load_manifest(path))), (not together) if other else grouped)
        set_capacity(model, factor)
        name = row_name(preset, composition, factor)
        name += ", sgemm" if sgemm else ""
        name += (", one by one" if together else ", grouped") if other else ""
        with sgemm_only() if sgemm else contextlib.nullcontext():
            target = gpu_target if cuda else cpu_target
            ok &= speed_row(name, bare, Trainer(model, device), ids, budget, WARMUP, target, complete)
        del model
        gc.collect()
    return ok


def compiled_rows(
    folder: Path,
    refs: list[str],
    complete: bool,
    budget: Budget,
    grouped: bool | None,
    device: torch.device,
    ids: torch.Tensor,
) -> bool:
    """lite and seed routed through torch.compile, against the bare backbone compiled alike."""
    print(
        f"\ncompiled (torch.compile as `[train] compile = true`, mode {COMPILE_MODE}; "
        f"{COMPILE_WARMUP} warm-up steps)"
    )
    bare = bare_row(device, ids, compile=True)
    ok = True
    for preset, composition, cpu_target, gpu_target, factor in COMPILED:
        path = manifest_path(folder, refs, preset, composition)
        model = set_capacity(set_grouped(build(plan(load_manifest(path))), grouped), factor)
        trainer = Trainer(model, device, compile=True)
        target = gpu_target if device.type == "cuda" else cpu_target
        name = f"{row_name(preset, composition, factor)}, compiled"
        ok &= speed_row(name, bare, trainer, ids, budget, COMPILE_WARMUP, target, complete)
        del model, trainer
        gc.collect()
    return ok


def bare_row(device: torch.device, ids: torch.Tensor, compile: bool) -> Trainer:
    """The bare backbone (compiled as training would, if ``compile``): warmed up, its row printed."""
    torch.manual_seed(0)
    bare = Trainer(fresh_backbone(backbone_config(None, {})), device, compile=compile)
    warmup = COMPILE_WARMUP if compile else WARMUP
    start = time.perf_counter()
    steps = [bare.step(ids) for _ in range(warmup + 3)]
    speed = ids.numel() / min(steps[warmup:])
    took = f" (first steps {time.perf_counter() - start:.0f} s)" if compile else ""
    name = "bare backbone, compiled" if compile else "bare backbone"
    print(
        f"{name:<36} {bare.params / 1e6:>8.1f}M {speed:>9.1f} {1:>6.2f} {'-':>7} {'-':>6}  -{took}",
        flush=True,
    )
    return bare


def speed_row(
    name: str,
    bare: Trainer,
    trainer: Trainer,
    ids: torch.Tensor,
    budget: Budget,
    warmup: int,
    target: float | None,
    complete: bool,
) -> bool:
    """Warm ``trainer`` up, time it against ``bare`` round by round, print its row; False: target missed."""
    start = time.perf_counter()
    for _ in range(warmup):
        trainer.step(ids)
    took = time.perf_counter() - start
    pairs = paired_rounds(bare, trainer, ids, budget)
    ratio = min(b for b, _ in pairs) / min(m for _, m in pairs)
    speed = ids.numel() / min(m for _, m in pairs)
    passed = target is None or ratio >= target
    shown, result = ("-", "report") if target is None else (f">={target}", judge(passed, complete))
    warmed = f" (warm-up {took:.0f} s)" if trainer.forward is not trainer.model else ""
    print(
        f"{name:<36} {trainer.params / 1e6:>8.1f}M {speed:>9.1f} {ratio:>6.2f} {shown:>7} "
        f"{len(pairs):>6}  {result}{warmed}",
        flush=True,
    )
    return passed


def main(
    quick: bool = False,
    grouped: bool | None = None,
    compile: bool = False,
    counts: bool = True,
    eager: bool = True,
) -> bool:
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
        counts_ok = ops_ok = True
        if counts:
            counts_ok = parameter_counts(Path(folder), refs, complete)
            counted = grouped is not False
            print(f"\nmodules run {'grouped by family' if counted else 'one by one (--per-module)'}")
            ops_ok = op_counts(Path(folder), refs, complete, counted)
            if compile:
                compiled_op_counts(Path(folder), refs)
            print()
        budget = QUICK if quick else FULL
        speed_ok = training_speed(Path(folder), refs, complete, budget, grouped, compile, eager)
    return (counts_ok and ops_ok and speed_ok) or not complete


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="time fewer rounds")
    paths = parser.add_mutually_exclusive_group()
    paths.add_argument("--per-module", action="store_true", help="run every module alone, not grouped")
    paths.add_argument("--grouped", action="store_true", help="time the grouped path on the CPU too")
    parser.add_argument(
        "--speed-only", action="store_true", help="skip the parameter and op counts (the same on any machine)"
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        default=os.environ.get("DHARMA_BENCH_COMPILE") == "1",
        help="also time lite and seed routed through torch.compile (minutes of compiling on a CPU)",
    )
    parser.add_argument("--compiled-only", action="store_true", help="time only the compiled rows")
    args = parser.parse_args()
    grouped = False if args.per_module else True if args.grouped else None  # None: as the model runs
    compile = args.compile or args.compiled_only
    sys.exit(0 if main(args.quick, grouped, compile, not args.speed_only, not args.compiled_only) else 1)
