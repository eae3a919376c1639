"""Training tokens/s of ``examples/foundation.toml`` under our trainer against a plain PyTorch loop.

Four steppers in one process, on the same batches (the packed rows of ``examples/data``
that the manifest's training reads at each step):

- plain loop, bare backbone: the bare GPT-2 backbone of the manifest's shape, ``loss =
  backbone(input_ids=x, labels=x, use_cache=False).loss; loss.backward(); AdamW.step();
  zero_grad()`` (fused AdamW where it runs, as the trainer's; no cache, as the trainer asks);
- trainer, no modules: that backbone wrapped as a DharmaModel without modules, driven by
  ``Loop.train_step`` (what ``dharma train`` runs), so the ratio to plain is the trainer's
  own overhead;
- plain loop, foundation: the plain loop on the assembled model (all 37 lite modules routed
  top-2 after blocks 1 and 3), so the ratio to plain is what the modules cost;
- trainer, foundation: the assembled model with its concept labels, driven by the Loop as
  ``dharma train examples/foundation.toml`` drives it.

After warm-up, each round times one step of each, in rotating order, so a busy moment
slows all alike. Even so, other processes on the same cores hurt the assembled model most:
each of its many small ops waits for both threads, so the load average before the run is
printed. ``--quick`` (or DHARMA_BENCH_QUICK=1) times fewer rounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "examples" / "foundation.toml"
WARMUP = 3
OVERHEAD_MIN = 0.95  # trainer on the bare backbone / plain loop, by the median of paired rounds


class Budget(NamedTuple):
    """Timed rounds: at least ``least``, at most ``most``, more only while under ``seconds``."""

    least: int
    most: int
    seconds: float


FULL, QUICK = Budget(least=10, most=40, seconds=60), Budget(least=2, most=4, seconds=5)


class Plain:
    """A model and its AdamW, stepped as a user's own loop would step it."""

    def __init__(self, backbone: torch.nn.Module, lr: float, fused: bool) -> None:
        self.model, self.fused = backbone.train(), fused
        self.optimizer = torch.optim.AdamW(backbone.parameters(), lr=lr, fused=fused)

    def step(self, batch: dict[str, torch.Tensor]) -> None:
        x = batch["input_ids"]
        loss = self.model(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


class Timed(NamedTuple):
    name: str
    model: torch.nn.Module
    step: Callable[[dict[str, torch.Tensor]], object]


def loop_for(model: torch.nn.Module, train_data, manifest, total: int):
    """``dharma train``'s Loop for ``model`` on ``train_data``, built as ``train.session`` builds it."""
    from dharma_kernel.train.distributed import Dist
    from dharma_kernel.train.loop import Loop
    from dharma_kernel.train.optim import build_optimizer
    from dharma_kernel.train.precision import LossScale, resolve_precision
    from dharma_kernel.train.windows import Windows

    cfg, device = manifest.train, torch.device("cpu")
    model.to(device)
    windows = Windows(len(train_data), cfg.batch_size, cfg.grad_accum, 1, 0, cfg.seed)
    precision = resolve_precision(cfg.precision, device)
    return Loop(
        model=model,
        raw=model,
        optimizer=build_optimizer(model, cfg, total, device),
        train_data=train_data,
        eval_data=None,
        windows=windows,
        dist=Dist(),
        device=device,
        precision=precision,
        lm_weight=manifest.loss.lm,
        max_grad_norm=cfg.max_grad_norm,
        scale=LossScale(enabled=precision == "fp16"),
    )


def setup() -> tuple[list[Timed], Callable[[int], dict[str, torch.Tensor]], str]:
    """The four steppers, the batch of step ``s``, and a line describing the run."""
    from dharma_kernel.assemble import build, build_model, plan_manifest
    from dharma_kernel.backbone import fresh_backbone
    from dharma_kernel.data import PackedData, prepare_data, read_data, resolve_tokenizer
    from dharma_kernel.freeze import freeze_groups
    from dharma_kernel.train.optim import fused_adamw_runs
    from dharma_kernel.train.windows import Windows

    manifest, plan = plan_manifest(MANIFEST)
    cfg = manifest.train
    records = read_data(manifest)
    tokenizer = resolve_tokenizer(manifest, records.texts, plan.config.text_config)
    refs = [spec["ref"] for spec in plan.config.layout["modules"]]
    data, _, _ = prepare_data(manifest, tokenizer, refs, records=records)
    bare_data = PackedData(data.input_ids, data.labels, data.attention_mask)  # no modules: no concepts

    foundation = build(plan, seed=cfg.seed)
    freeze_groups(foundation, manifest.freeze.groups)
    bare = build_model(manifest.backbone.config, {}, seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    plain = Plain(
        fresh_backbone(plan.config.text_config), cfg.learning_rate, fused_adamw_runs("cpu", torch.float32)
    )

    # the schedule spans the manifest's whole run, as in session.py
    total = cfg.max_steps or cfg.epochs * Windows(len(data), cfg.batch_size, cfg.grad_accum).steps_per_epoch
    loops = [loop_for(bare, bare_data, manifest, total), loop_for(foundation, data, manifest, total)]
    plain_foundation = Plain(build(plan, seed=cfg.seed), cfg.learning_rate, plain.fused)
    # The Loop reads its own rows: the same as batch(step), from the same Windows.
    steppers = [
        Timed("plain loop, bare backbone", plain.model, plain.step),
        Timed("trainer, no modules", bare, lambda batch: loops[0].train_step()),
        Timed("plain loop, foundation", plain_foundation.model, plain_foundation.step),
        Timed("trainer, foundation", foundation, lambda batch: loops[1].train_step()),
    ]

    def batch(step: int) -> dict[str, torch.Tensor]:
        """The rows every stepper trains on at step ``step`` (the trainers' windows read the same)."""
        (rows,) = loops[0].windows.micro_batches(step)
        return data.batch(rows)

    shape = tuple(data.input_ids[: cfg.batch_size].shape)
    described = (
        f"{MANIFEST.relative_to(ROOT)}: batch {shape[0]} x {shape[1]} tokens, {len(data)} packed rows of "
        f"examples/data, {torch.get_num_threads()} threads, fp32, "
        f"{'fused' if plain.fused else 'foreach'} AdamW"
    )
    return steppers, batch, described


def rounds(steppers: list[Timed], batch: Callable[[int], dict], budget: Budget) -> list[list[float]]:
    """Seconds per step of each stepper, one step each per round, in rotating order."""
    times: list[list[float]] = [[] for _ in steppers]
    step, start = 0, time.perf_counter()
    while step < budget.most and (step < budget.least or time.perf_counter() - start < budget.seconds):
        rows = batch(WARMUP + step)
        for k in range(len(steppers)):
            i = (step + k) % len(steppers)
            began = time.perf_counter()
            steppers[i].step(rows)
            times[i].append(time.perf_counter() - began)
        step += 1
    return times


def main(quick: bool = False) -> bool:
    """Print tokens/s and ratios; False when the trainer's own overhead misses its target."""
    quick = quick or os.environ.get("DHARMA_BENCH_QUICK") == "1"
    load = os.getloadavg()[0]
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    steppers, batch, described = setup()
    budget = QUICK if quick else FULL
    for step in range(WARMUP):
        rows = batch(step)
        for stepper in steppers:
            stepper.step(rows)
    times = rounds(steppers, batch, budget)
    tokens = batch(0)["input_ids"].numel()

    print(f"{described}; load average {load:.1f} before the run")
    print(
        f"{WARMUP} warm-up steps each, then {len(times[0])} rounds of one step each in rotating order "
        f"({budget.least} to {budget.most} rounds, more while under {budget.seconds:.0f} s)"
    )
    print("tokens/s: input tokens / step time (fastest step, and median step);")
    print("ratio: against the plain loop, fastest over fastest, and median of the per-round ratios")
    header = (
        f"{'stepper':<27} {'params':>7} {'tok/s best':>10} {'tok/s med':>10} "
        f"{'ratio best':>10} {'ratio med':>9} {'target':>7}  result"
    )
    print(header)
    plain = times[0]
    ok = True
    paired = {}
    for stepper, seconds in zip(steppers, times, strict=True):
        params = sum(p.numel() for p in stepper.model.parameters())
        best, median = tokens / min(seconds), tokens / statistics.median(seconds)
        ratio_best = min(plain) / min(seconds)
        ratio_median = statistics.median(p / s for p, s in zip(plain, seconds, strict=True))
        paired[stepper.name] = seconds
        target, result = "-", "-"
        if stepper.name == "trainer, no modules":
            target = f">={OVERHEAD_MIN}"
            passed = ratio_median >= OVERHEAD_MIN
            result = "pass" if passed else "FAIL"
            ok &= passed
        elif stepper.name.endswith("foundation"):
            result = "report"
        print(
            f"{stepper.name:<27} {params / 1e6:>6.2f}M {best:>10.0f} {median:>10.0f} "
            f"{ratio_best:>10.2f} {ratio_median:>9.2f} {target:>7}  {result}"
        )
    print("the foundation ratio, split (median of per-round ratios):")
    for what, fast, slow in (
        ("modules: plain loop, foundation / bare backbone", "plain loop, bare backbone",
         "plain loop, foundation"),
        ("trainer on the assembled model (mask, concept labels, clipping)", "plain loop, foundation",
         "trainer, foundation"),
    ):  # fmt: skip
        ratio = statistics.median(f / s for f, s in zip(paired[fast], paired[slow], strict=True))
        print(f"  {what}: {ratio:.2f}")
    return ok


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="time fewer rounds")
    sys.exit(0 if main(parser.parse_args().quick) else 1)
