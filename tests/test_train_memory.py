"""The memory estimate: exact bytes for parameters, gradients and optimizer; calibrated activations."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny import tiny_layout

from dharma_kernel.assemble import build_model, build_on_meta, plan_manifest
from dharma_kernel.errors import DharmaError
from dharma_kernel.freeze import freeze_groups
from dharma_kernel.testing import tiny_backbone_config
from dharma_kernel.train import memory
from dharma_kernel.train.memory import MemorySettings, changes, estimate, fitting_settings, parse_size

ROOT = Path(__file__).resolve().parents[1]
SEED_PARAMETERS = 258_200_290  # README, `dharma validate examples/seed-262m.toml`
WTE = 50257 * 768  # the token embedding table, tied to the output head


@pytest.fixture(scope="module")
def seed_model():
    _, plan = plan_manifest(ROOT / "examples" / "seed-262m.toml")
    return build_on_meta(plan)


def test_seed_parameter_gradient_and_optimizer_bytes(seed_model):
    off = estimate(seed_model, 1, 96, MemorySettings())
    assert off.parameters == SEED_PARAMETERS * 4
    # every gradient, plus the embedding lookup's dense gradient before it joins the tied head's
    assert off.gradients == SEED_PARAMETERS * 4 + WTE * 4
    assert off.optimizer == SEED_PARAMETERS * 8
    on = estimate(seed_model, 1, 96, MemorySettings(True, True, "bf16"))
    assert on.parameters == SEED_PARAMETERS * 4
    assert on.gradients == 2 * WTE * 4  # the largest gradient (the tied table's) and the lookup's
    assert on.optimizer == SEED_PARAMETERS * 4
    assert on.activations < off.activations
    assert on.total == sum(v for name, v in on.parts() if name != "total")


def test_frozen_parameters_need_no_gradient_or_state(seed_model):
    _, plan = plan_manifest(ROOT / "examples" / "seed-262m.toml")
    model = build_on_meta(plan)
    freeze_groups(model, ["backbone"])
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == SEED_PARAMETERS - 81_912_576
    result = estimate(model, 1, 96, MemorySettings())
    assert result.parameters == SEED_PARAMETERS * 4
    assert result.gradients == trainable * 4
    assert result.optimizer == trainable * 8


def test_activation_formula_for_a_bare_backbone():
    """GPT-2 blocks: io = 16 * hidden (c_attn 4H, attn c_proj 2H, c_fc 5H, mlp c_proj 5H)."""
    hidden, layers, heads, vocab = 32, 2, 2, 97
    model = build_model(tiny_backbone_config(), {})
    batch, length = 3, 10
    block = memory.BLOCK * 16 * hidden + memory.BLOCK_ATTENTION * heads * length
    per_token = (layers * block + memory.EMBEDDING * hidden) * 4 + memory.LOGITS * vocab * 4
    assert memory.activation_bytes(model, batch, length, MemorySettings()) == int(batch * length * per_token)
    checkpointed = (layers * hidden + block + memory.EMBEDDING * hidden) * 4 + memory.LOGITS * vocab * 4
    settings = MemorySettings(gradient_checkpointing=True)
    assert memory.activation_bytes(model, batch, length, settings) == int(batch * length * checkpointed)


def saved_bytes(model, ids) -> int:
    """Bytes autograd keeps in one forward (each storage once, no parameters), plus logits and their grad."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(input_ids=ids, labels=ids, use_cache=False)
    return sum(seen.values()) + 2 * out.logits.numel() * 4


@pytest.mark.parametrize("composition", ["sequential", "routed"])
def test_activation_estimate_matches_a_measurement(composition):
    """Within 10% of the bytes autograd really saves, on a small model with both bundled modules."""
    backbone = tiny_backbone_config(n_embd=64, n_head=4, vocab_size=500, n_positions=128)
    model = build_model(backbone, tiny_layout(composition, top_k=1)).train()
    ids = torch.randint(0, 500, (2, 48), generator=torch.Generator().manual_seed(0))
    measured = saved_bytes(model, ids)
    estimated = memory.activation_bytes(model, 2, 48, MemorySettings())
    assert 0.9 <= estimated / measured <= 1.1, (estimated, measured)


def test_half_precision_counts_smaller_activations_and_weight_copies():
    model = build_model(tiny_backbone_config(), tiny_layout())
    fp32 = memory.activation_bytes(model, 4, 32, MemorySettings())
    bf16 = memory.activation_bytes(model, 4, 32, MemorySettings(precision="bf16"))
    copies = 2 * sum(p.numel() for p in memory._weight_matrices(model))
    assert bf16 - copies < fp32
    assert copies == 2 * sum(
        p.numel() for n, p in model.named_parameters() if p.ndim >= 2 and "wpe" not in n
    )  # every matrix, the token table included as the tied output head; not the position table


def test_fitting_settings_fewest_changes_first(seed_model):
    budget = int(3.7 * 2**30)
    current = MemorySettings(gradient_checkpointing=True, precision="auto")
    fits = fitting_settings(seed_model, budget, 1, 96, current)
    assert fits and all(f.total <= budget for f in fits)
    counts = [len(changes(f.settings, current)) for f in fits]
    assert counts == sorted(counts)
    assert changes(fits[0].settings, current) == ['optimizer_state = "bf16"']
    assert estimate(seed_model, 1, 96, current).total > budget  # the manifest's own settings do not fit
    everything = fitting_settings(seed_model, 2**62, 1, 96, current)
    assert len(everything) == 16 and changes(everything[0].settings, current) == []
    assert fitting_settings(seed_model, 2**30, 1, 96, current) == []


def test_changes_reads_like_the_manifest():
    current = MemorySettings(precision="auto")
    wanted = MemorySettings(gradient_checkpointing=True, optimizer_state="bf16", precision="fp32")
    assert changes(wanted, current) == ["gradient_checkpointing = true", 'optimizer_state = "bf16"']


@pytest.mark.parametrize(
    "text, size",
    [("4GiB", 4 * 2**30), ("512MiB", 512 * 2**20), ("4GB", 4 * 10**9), ("123", 123), ("1.5gib", 3 * 2**29),
     (" 2 TiB ", 2 * 2**40), ("64KB", 64_000)],
)  # fmt: skip
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["4 gigs", "", "GiB", "-1GiB", "0", "4G", "1e9"])
def test_parse_size_refuses(text):
    with pytest.raises(DharmaError, match="is not a memory size"):
        parse_size(text, "--memory")


def test_optimizer_in_backward_brings_the_grad_accum_it_needs():
    from dharma_kernel.train.memory import MemorySettings

    on, off = MemorySettings(optimizer_in_backward=True), MemorySettings()
    assert changes(on, off, grad_accum=4) == ["optimizer_in_backward = true", "grad_accum = 1"]
    assert changes(on, off, grad_accum=1) == ["optimizer_in_backward = true"]
    assert changes(off, off, grad_accum=4) == []
