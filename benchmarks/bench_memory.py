"""Peak memory of training ``examples/seed-262m.toml`` with the memory switches off and on.

Each configuration runs in its own process: build the model (fresh weights), then a few
training steps on one fixed random batch (forward with labels, backward, AdamW step from
``dharma_kernel.train.optim``). The peak is the child's maximum resident set size as the
kernel reports it (``os.wait4``), raw: it includes Python, torch and the plugins
(``imports only`` shows that part). With CUDA the model trains there and
``torch.cuda.max_memory_allocated`` is reported too. Beside each measurement: the
estimate of ``dharma_kernel.train.memory``.

``--calibrate`` prints instead the measurement the activation constants of
``dharma_kernel.train.memory`` come from: bytes autograd saves in one forward of small
models, against the estimate.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "examples" / "seed-262m.toml"
BATCH, LENGTH, STEPS = 1, 96, 3
TARGET_GIB = 4.0
CONFIGS = {
    "imports only": None,
    "off: AdamW fp32": {},
    "on: in-backward, bf16 state, checkpointing": {
        "optimizer_in_backward": True,
        "optimizer_state": "bf16",
        "gradient_checkpointing": True,
        "grad_accum": 1,
    },
}


def child(config: str) -> None:
    """Run one configuration in this process and print its numbers as JSON on the last line."""
    import torch

    from dharma_kernel.assemble import build, build_on_meta, plan_manifest
    from dharma_kernel.freeze import freeze_groups
    from dharma_kernel.train.heap import keep_freed_memory
    from dharma_kernel.train.memory import estimate
    from dharma_kernel.train.optim import build_optimizer

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    manifest, plan = plan_manifest(MANIFEST)
    switches = CONFIGS[config]
    if switches is None:
        print(json.dumps({}))
        return
    train = manifest.train.model_copy(update={"optimizer_in_backward": False, "optimizer_state": "fp32",
                                              "gradient_checkpointing": False, "precision": "fp32",
                                              **switches})  # fmt: skip
    meta = build_on_meta(plan)
    freeze_groups(meta, manifest.freeze.groups)
    estimated = estimate(meta, BATCH, LENGTH, train)
    del meta
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        keep_freed_memory()  # as dharma train does on the CPU: the peak counts memory kept for reuse
    model = build(plan, seed=0)
    freeze_groups(model, manifest.freeze.groups)
    model.to(device).train()
    if train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.set_module_checkpointing(True)
    optimizer = build_optimizer(model, train, STEPS, device)
    vocab = model.config.text_config.vocab_size
    ids = torch.randint(0, vocab, (BATCH, LENGTH), generator=torch.Generator().manual_seed(0)).to(device)
    losses, times = [], []
    for _ in range(STEPS):
        start = time.perf_counter()
        out = model(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        optimizer.schedule_step()
        losses.append(float(out.loss.detach()))
        del out
        times.append(time.perf_counter() - start)
    stepped = optimizer.state_dict()["state"]
    held = sum(optimizer.params[i].numel() for i in stepped)  # the state is by the model's parameters
    result = {
        "held": held / sum(p.numel() for p in optimizer.params),
        "estimate": estimated.total,
        "parts": dict(estimated.parts()),
        "losses": losses,
        "step_s": min(times),
        "fused": optimizer.fused,
    }
    if device.type == "cuda":
        result["cuda_max_allocated"] = torch.cuda.max_memory_allocated()
    print(json.dumps(result))


def run_child(config: str) -> tuple[dict, int]:
    """(the child's JSON, its peak resident set in bytes)."""
    command = [sys.executable, __file__, "--child", config]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{config}: child failed with exit code {proc.returncode}")
    return json.loads(output.strip().splitlines()[-1]), usage.ru_maxrss * 1024  # Linux reports KiB


def main() -> bool:
    """Peak RSS (and CUDA peak) off vs on; False when the on configuration misses the target."""
    gib = 2**30
    print(
        f"{MANIFEST.relative_to(ROOT)}: batch {BATCH} x {LENGTH} tokens, {STEPS} steps, fixed random batch; "
        "peak RSS of each configuration's own process (raw, nothing subtracted)"
    )
    header = f"{'configuration':<44} {'peak RSS':>9} {'estimate':>9} {'CUDA peak':>9} {'step s':>7}  result"
    print(header)
    ok = True
    for config in CONFIGS:
        result, rss = run_child(config)
        if not result:
            print(f"{config:<44} {rss / gib:>8.2f}G {'-':>9} {'-':>9} {'-':>7}  -")
            continue
        cuda = result.get("cuda_max_allocated")
        shown = f"{cuda / gib:>8.2f}G" if cuda is not None else f"{'-':>9}"
        verdict = "-"
        if config.startswith("on"):
            peak = cuda if cuda is not None else rss
            verdict = f"{'pass' if peak <= TARGET_GIB * gib else 'FAIL'} (<= {TARGET_GIB:.0f} GiB)"
            ok &= peak <= TARGET_GIB * gib
        print(
            f"{config:<44} {rss / gib:>8.2f}G {result['estimate'] / gib:>8.2f}G {shown} "
            f"{result['step_s']:>7.2f}  {verdict}"
        )
        parts = ", ".join(f"{name} {value / gib:.2f}" for name, value in result["parts"].items())
        print(f"{'':<4}estimate GiB: {parts}")
        print(
            f"{'':<4}losses {', '.join(f'{x:.3f}' for x in result['losses'])}; optimizer state for "
            f"{100 * result['held']:.1f}% of the trainable parameters (modules no token chose have none)"
        )
    return ok


# -- calibration of the activation constants ---------------------------------------------------


def saved_bytes(model, ids, half: bool = False) -> int:
    """Bytes of the tensors autograd saves in one forward (each storage once, parameters excluded)."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if half else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        out = model(input_ids=ids, labels=ids, use_cache=False)
    # the logits the output holds, and their gradient at the start of the backward
    return sum(seen.values()) + 2 * out.logits.numel() * 4


def calibrate() -> None:
    import torch

    from dharma_kernel import registry
    from dharma_kernel.assemble import build_model
    from dharma_kernel.catalogue import standard_refs
    from dharma_kernel.testing import tiny_backbone_config
    from dharma_kernel.train.memory import MemorySettings, activation_bytes

    def layout(refs: list[str], preset: str, composition: str) -> dict:
        modules = []
        for ref in refs:
            cls = registry.load(registry.resolve(ref, "module"))
            modules.append({"ref": ref, "config": cls.make_config(preset).model_dump()})
        return {"at_layers": [1], "composition": composition, "top_k": 2, "modules": modules}

    installed = {info.ref for info in registry.discover("module") if info.problem is None}
    refs = [ref for ref in standard_refs() if ref in installed]
    families = list({ref.split(".")[0]: ref for ref in refs}.values())
    cases = [("backbone only", [], "tiny", "sequential")]
    cases += [
        (f"{ref} {preset}", [ref], preset, "sequential") for ref in families for preset in ("tiny", "seed")
    ]
    cases += [(f"all {len(refs)} {preset} {c}", refs, preset, c) for preset in ("tiny", "lite") for c in
              ("sequential", "routed")]  # fmt: skip
    print("activation bytes per token: saved by autograd in one forward (+ logits and their gradient)")
    print("vs the estimate; GPT-2 backbone, 2 layers, vocab 1000, batch 2; modules after block 1")
    columns = ("width", 5), ("length", 6), ("precision", 9), ("measured", 10), ("estimate", 10), ("ratio", 6)
    print(f"{'model':<34} " + " ".join(f"{name:>{size}}" for name, size in columns))
    for width in (128, 256):
        backbone = tiny_backbone_config(n_layer=2, n_embd=width, n_head=4, vocab_size=1000, n_positions=512)
        for name, chosen, preset, composition in cases:
            model = build_model(backbone, layout(chosen, preset, composition) if chosen else {}).train()
            for length in (32, 128):
                for half in (False, True) if not chosen else (False,):
                    ids = torch.randint(0, 1000, (2, length), generator=torch.Generator().manual_seed(0))
                    measured = saved_bytes(model, ids, half) / ids.numel()
                    settings = MemorySettings(precision="bf16" if half else "fp32")
                    estimated = activation_bytes(model, 2, length, settings) / ids.numel()
                    print(
                        f"{name:<34} {width:>5} {length:>6} {'bf16' if half else 'fp32':>9} "
                        f"{measured:>10.0f} {estimated:>10.0f} {estimated / measured:>6.2f}"
                    )


def peak_child(checkpointing: bool) -> None:
    """One forward and backward of a model with every module lite, routed, gradients already allocated:
    print the peak resident set above where it started, and the activation estimate (bytes)."""
    import re

    import torch

    from dharma_kernel import registry
    from dharma_kernel.assemble import build_model
    from dharma_kernel.catalogue import standard_refs
    from dharma_kernel.testing import tiny_backbone_config
    from dharma_kernel.train.memory import MemorySettings, activation_bytes

    def status(key: str) -> int:
        return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text())[1]) * 1024

    installed = {info.ref for info in registry.discover("module") if info.problem is None}
    modules = [
        {
            "ref": ref,
            "config": registry.load(registry.resolve(ref, "module")).make_config("lite").model_dump(),
        }
        for ref in standard_refs()
        if ref in installed
    ]
    backbone = tiny_backbone_config(n_layer=4, n_embd=256, n_head=4, vocab_size=1000, n_positions=512)
    layout = {"at_layers": [2], "composition": "routed", "top_k": 2, "modules": modules}
    model = build_model(backbone, layout).train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.set_module_checkpointing(True)
    ids = torch.randint(0, 1000, (4, 256), generator=torch.Generator().manual_seed(0))
    for _ in range(3):  # the last of three: allocator and gradients settled
        model.zero_grad(set_to_none=False)
        start = status("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # restart the peak (VmHWM) from here
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        peak = status("VmHWM") - start
    estimated = activation_bytes(model, 4, 256, MemorySettings(gradient_checkpointing=checkpointing))
    print(json.dumps({"peak": peak, "estimate": estimated}))


def calibrate_peaks() -> None:
    """The estimate against a real peak, with and without gradient checkpointing (Linux only)."""
    print(
        "\nactivations of one forward and backward: peak RSS above parameters and gradients vs the estimate;"
    )
    print("GPT-2 4 layers x 256, vocab 1000, every module lite after block 2, routed top_k 2, batch 4 x 256;")
    print("glibc gives blocks over 64 KiB back to the system when freed (MALLOC_MMAP_THRESHOLD_)")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    for checkpointing in (False, True):
        command = [sys.executable, __file__, "--peak-child", str(int(checkpointing))]
        output = subprocess.run(command, capture_output=True, text=True, env=env, check=True, cwd=ROOT).stdout
        result = json.loads(output.strip().splitlines()[-1])
        name = "gradient checkpointing" if checkpointing else "no checkpointing"
        peak, estimated = result["peak"] / 2**20, result["estimate"] / 2**20
        ratio = estimated / peak
        print(f"{name:<23} measured {peak:7.1f} MiB, estimate {estimated:7.1f} MiB, ratio {ratio:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--peak-child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--calibrate", action="store_true", help="print the activation calibration")
    args = parser.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if args.child:
        child(args.child)
    elif args.peak_child is not None:
        peak_child(bool(args.peak_child))
    elif args.calibrate:
        calibrate()
        calibrate_peaks()
    else:
        sys.exit(0 if main() else 1)
