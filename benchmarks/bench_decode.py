"""Decoding speed: `dharma generate` eager against `dharma generate --compile`, in tokens/s.

One prompt (32 random ids, batch 1), greedy, KV-cached, on a DistilGPT2-shaped fresh backbone:
bare, then with the 37 `lite` modules routed top-2 at layers [2, 4] three ways: eager with exact
routing (what `dharma generate` runs), eager with a slot for every (module, token) pair (what the
compiled decoder runs, dharma_kernel.decoding), and compiled. The configurations take turns round
by round; each row is the median round. Also says how many of the compiled tokens equal the eager ones.
On a CUDA machine it runs there under bf16 autocast; DHARMA_BENCH_DEVICE=cpu keeps it on the CPU.
Compiling takes minutes on a CPU (the row's warm-up). Shown, not judged: the issue sets no target.
"""

from __future__ import annotations

import contextlib
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_modules import bench_device, installed_standard, manifest_path

from dharma_kernel.assemble import build, plan
from dharma_kernel.backbone import backbone_config, fresh_backbone
from dharma_kernel.decoding import compiled_decoding
from dharma_kernel.manifest import load_manifest

PROMPT, NEW_TOKENS = 32, {"cpu": 48, "cuda": 128}
ROUNDS = 5


def generate(model: torch.nn.Module, ids: torch.Tensor, new: int) -> tuple[torch.Tensor, float]:
    """The generated ids and the seconds they took."""
    cuda = ids.is_cuda
    bf16 = cuda and torch.cuda.is_bf16_supported()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16, enabled=bf16):
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=0,
        )
    if cuda:
        torch.cuda.synchronize()
    return out[0, ids.shape[1] :], time.perf_counter() - start


def main() -> bool:
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    device = bench_device()
    new = NEW_TOKENS[device.type]
    refs = installed_standard()
    if not refs:
        print("no standard module is installed: nothing to measure")
        return True
    ids = torch.randint(0, 50257, (1, PROMPT), generator=torch.Generator().manual_seed(0)).to(device)
    torch.manual_seed(0)
    bare = fresh_backbone(backbone_config(None, {})).to(device).eval()
    with tempfile.TemporaryDirectory() as folder:
        path = manifest_path(Path(folder), refs, "lite", "routed")
        lite = build(plan(load_manifest(path))).to(device).eval()
    slots = copy.deepcopy(lite)
    for stack in slots.stacks.values():
        stack.every_token_slots = True
    held = contextlib.ExitStack()
    compiled = held.enter_context(compiled_decoding(copy.deepcopy(lite)))
    rows = {
        "bare backbone, eager": bare,
        f"lite routed ({len(refs)} modules), eager": lite,
        "lite routed, every-token slots, eager": slots,
        "lite routed, --compile": compiled,
    }
    print(f"greedy decoding on {device.type}: prompt {PROMPT} tokens, {new} new, batch 1; median of {ROUNDS}")
    warm_up = {}
    for name, model in rows.items():
        warm_up[name] = generate(model, ids, new)
    reference = warm_up[f"lite routed ({len(refs)} modules), eager"][0]
    agree = (warm_up["lite routed, --compile"][0] == reference).long().cumprod(0).sum().item()
    seconds: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(ROUNDS):
        for name, model in rows.items():
            seconds[name].append(generate(model, ids, new)[1])
    base = new / statistics.median(seconds["bare backbone, eager"])
    print(f"{'configuration':<40} {'tokens/s':>9} {'ratio':>6}  first call")
    for name in rows:
        speed = new / statistics.median(seconds[name])
        print(f"{name:<40} {speed:>9.1f} {speed / base:>6.2f}  {warm_up[name][1]:.1f} s")
    # under bf16 fused kernels may round differently, and greedy decoding can part from there
    print(f"compiled tokens equal eager's: the first {agree} of {new}")
    held.close()
    return True


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
