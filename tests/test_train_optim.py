"""AdamW, schedules and the optimizer memory switches: exact numbers, equal updates, exact resume."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from test_grouped import all_modules, set_grouped
from tiny import tiny_model

from dharma_kernel.errors import DharmaError
from dharma_kernel.freeze import freeze_groups
from dharma_kernel.manifest import TrainSection
from dharma_kernel.train.optim import (
    BF16AdamW,
    build_optimizer,
    decay_split,
    fused_adamw_runs,
    lr_factor,
    separate_gradients,
)

VOCAB = 97  # tiny_backbone_config's
MODES = {
    "adamw": {},
    "bf16 state": {"optimizer_state": "bf16"},
    "in backward": {"optimizer_in_backward": True},
    "in backward, bf16 state": {"optimizer_in_backward": True, "optimizer_state": "bf16"},
}


def train_section(**values) -> TrainSection:
    return TrainSection(**{"learning_rate": 1e-2, "max_grad_norm": 0.0, "warmup_fraction": 0.0, **values})


def batches(count: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (2, 12), generator=generator) for _ in range(count)]


def run(model, optimizer, ids_list, seed: int = 0, clip_each: float | None = None) -> None:
    """Plain steps; the global RNG (dropout) is reseeded so two runs see the same masks."""
    torch.manual_seed(seed)
    for ids in ids_list:
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        if clip_each is not None:  # what in-backward does, by hand
            for p in optimizer.trainable:
                if p.grad is not None:
                    norm = torch.linalg.vector_norm(p.grad, dtype=torch.float32)
                    p.grad.mul_((clip_each / (norm + 1e-6)).clamp(max=1.0))
        optimizer.step()
        optimizer.zero_grad()
        optimizer.schedule_step()


def fresh(**train):
    model = tiny_model().train()
    return model, build_optimizer(model, train_section(**train), total_steps=20, device="cpu")


def same_parameters(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


# -- schedules -------------------------------------------------------------------------------


def test_cosine_schedule_numbers():
    # 100 steps, warmup 10%: 10 linear warm-up steps, then a cosine from 1 to 0 over 90 steps.
    factors = {s: lr_factor("cosine", s, 100, 0.1) for s in (0, 4, 9, 10, 55, 99, 100, 150)}
    assert factors[0] == pytest.approx(0.1)
    assert factors[4] == pytest.approx(0.5)
    assert factors[9] == factors[10] == 1.0
    assert factors[55] == pytest.approx(0.5)
    assert factors[99] == pytest.approx(0.5 * (1 + math.cos(math.pi * 89 / 90)))
    assert factors[100] == factors[150] == 0.0


def test_constant_schedule_numbers():
    assert [lr_factor("constant", s, 100, 0.05) for s in (0, 1, 4, 5, 99)] == [0.2, 0.4, 1.0, 1.0, 1.0]
    assert lr_factor("constant", 0, 100, 0.0) == 1.0


@pytest.mark.parametrize("total, warmup", [(100, 0.3), (37, 0.05), (10, 0.0), (7, 0.5)])
def test_onecycle_is_torchs_onecycle(total, warmup):
    param = torch.nn.Parameter(torch.zeros(1))
    reference = torch.optim.SGD([param], lr=1.0)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        reference, max_lr=2e-3, total_steps=total, pct_start=warmup, cycle_momentum=False
    )
    for step in range(total):
        assert 2e-3 * lr_factor("onecycle", step, total, warmup) == pytest.approx(
            scheduler.get_last_lr()[0], rel=1e-12, abs=1e-18
        )
        reference.step()
        scheduler.step()


def test_onecycle_numbers():
    assert lr_factor("onecycle", 0, 100, 0.3) == pytest.approx(1 / 25)
    assert lr_factor("onecycle", 29, 100, 0.3) == 1.0  # the end of the warm-up
    assert lr_factor("onecycle", 99, 100, 0.3) == pytest.approx(1 / 25 / 1e4)
    assert lr_factor("onecycle", 500, 100, 0.3) == pytest.approx(1 / 25 / 1e4)  # past the end: stays
    # all warm-up (torch's OneCycleLR divides by zero here): rises to the peak at the last step
    assert [lr_factor("onecycle", s, 5, 1.0) for s in (0, 4)] == [pytest.approx(1 / 25), 1.0]


def test_optimizer_lr_follows_the_schedule():
    model = tiny_model().train()
    train = train_section(schedule="cosine", warmup_fraction=0.1, learning_rate=3e-4)
    optimizer = build_optimizer(model, train, total_steps=100, device="cpu")
    seen = []
    for _ in range(12):
        seen.append(optimizer.lr)
        optimizer.schedule_step()
    assert seen[0] == pytest.approx(3e-5) and seen[9] == pytest.approx(3e-4)
    assert seen[11] == pytest.approx(3e-4 * 0.5 * (1 + math.cos(math.pi / 90)))
    ids = batches(1)[0]
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    optimizer.step()
    assert all(group["lr"] == optimizer.lr for group in optimizer._optimizers[0].param_groups)


# -- AdamW itself --------------------------------------------------------------------------------


def test_fused_adamw_runs_on_cpu_and_is_used():
    assert fused_adamw_runs("cpu", torch.float32)  # torch 2.13's CPU build has the fused kernel
    assert not fused_adamw_runs("meta", torch.float32)
    _, optimizer = fresh()
    assert optimizer.fused
    assert all(o.defaults["fused"] for o in optimizer._optimizers)


def test_weight_decay_rule():
    model = tiny_model()
    decay, plain = decay_split(model, list(model.parameters()))
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay}
    assert "backbone.transformer.h.0.block.attn.c_attn.weight" in decayed
    assert any(n.startswith("stacks.") and n.endswith("down.weight") for n in decayed)
    assert all(p.ndim >= 2 for p in decay)
    tables = {"backbone.transformer.wte.weight", "backbone.transformer.wpe.weight"}  # wte is the head too
    assert tables <= {names[id(p)] for p in plain}
    assert all(p.ndim == 1 for p in plain if names[id(p)] not in tables)  # biases, norms, module vectors
    _, optimizer = fresh(weight_decay=0.1)
    groups = optimizer._optimizers[0].param_groups
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert len(groups[0]["params"]) == len(decay)


def test_bf16_state_tracks_fp32_adamw():
    """300 steps of a small regression, BF16AdamW against torch's AdamW from the same start.

    Measured: weights within 0.6% of the distance travelled, final loss within 0.2%; the
    bf16 second moment is within 2.8% on average and unbiased (signed mean 0.4%).
    Tolerances: 1%, 1%, 5% and 1%.
    """
    generator = torch.Generator().manual_seed(0)
    x, w_true = torch.randn(256, 32, generator=generator), torch.randn(32, 8, generator=generator)
    y = x @ w_true + 0.1 * torch.randn(256, 8, generator=generator)
    start = torch.randn(32, 8, generator=generator) * 0.1
    results = {}
    for name in ("fp32", "bf16"):
        w = torch.nn.Parameter(start.clone())
        kwargs = {"lr": 1e-2, "weight_decay": 0.01}
        optimizer = (
            torch.optim.AdamW([w], **kwargs, foreach=False)
            if name == "fp32"
            else BF16AdamW([w], **kwargs, generator=torch.Generator().manual_seed(1))
        )
        for _ in range(300):
            loss = ((x @ w - y) ** 2).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        results[name] = (w.detach().clone(), float(loss.detach()), optimizer.state[w])
    (w32, loss32, state32), (w16, loss16, state16) = results["fp32"], results["bf16"]
    assert state16["exp_avg"].dtype == state16["exp_avg_sq"].dtype == torch.bfloat16
    assert float((w16 - w32).abs().max() / (w32 - start).abs().max()) < 0.01
    assert loss16 == pytest.approx(loss32, rel=0.01)
    # the second moment keeps moving with the fp32 one (round-to-nearest would stall it), unbiased
    v32, v16 = state32["exp_avg_sq"], state16["exp_avg_sq"].float()
    assert float(((v16 - v32).abs() / v32).mean()) < 0.05
    assert abs(float(((v16 - v32) / v32).mean())) < 0.01


def test_bf16_adamw_skips_on_found_inf():
    w = torch.nn.Parameter(torch.ones(3))
    optimizer = BF16AdamW([w], lr=0.1)
    w.grad = torch.ones(3)
    optimizer.step()
    before = {k: v.clone() for k, v in optimizer.state[w].items()}
    weights = w.detach().clone()
    optimizer.found_inf = torch.ones(())
    w.grad = torch.full((3,), float("nan"))
    optimizer.step()
    assert torch.equal(w.detach(), weights)
    assert all(torch.equal(before[k], optimizer.state[w][k]) for k in before)


# -- in backward -------------------------------------------------------------------------------


def test_in_backward_equals_adamw_bitwise():
    """grad_accum 1, no clipping: per-parameter fused AdamW in backward gives the very same weights."""
    ids = batches(5)
    a, optimizer_a = fresh()
    b, optimizer_b = fresh(optimizer_in_backward=True)
    assert optimizer_b.in_backward and not optimizer_a.in_backward
    run(a, optimizer_a, ids)
    run(b, optimizer_b, ids)
    assert same_parameters(a, b)
    assert not same_parameters(a, tiny_model())  # they did train


def test_in_backward_clips_each_parameter_on_its_own():
    ids = batches(3)
    a, optimizer_a = fresh(max_grad_norm=0.0)
    b, optimizer_b = fresh(optimizer_in_backward=True, max_grad_norm=0.05)
    run(a, optimizer_a, ids, clip_each=0.05)
    run(b, optimizer_b, ids)
    assert same_parameters(a, b)


def test_in_backward_frees_gradients_and_reports_the_norm():
    model, optimizer = fresh(optimizer_in_backward=True)
    ids = batches(1)[0]
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    assert all(p.grad is None for p in model.parameters())
    assert optimizer.grad_norm > 0 and not optimizer.skipped_last
    optimizer.step()  # a no-op
    optimizer.zero_grad()
    assert optimizer.grad_norm == 0.0


@pytest.mark.parametrize("state", ["fp32", "bf16"])
def test_in_backward_skips_a_nonfinite_gradient(state):
    model, optimizer = fresh(optimizer_in_backward=True, optimizer_state=state)
    run(model, optimizer, batches(1))
    poisoned = model.backbone.transformer.h[0].block.mlp.c_fc.weight
    saved = optimizer.state_dict()["state"]
    index = next(i for i, p in enumerate(optimizer.trainable) if p is poisoned)
    step_before = saved[index]["step"].clone()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    handle = poisoned.register_hook(lambda g: g * float("nan"))
    ids = batches(1, seed=1)[0]
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    handle.remove()
    assert optimizer.skipped_last
    assert math.isnan(optimizer.grad_norm)
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert "backbone.transformer.h.0.block.mlp.c_fc.weight" not in changed
    assert "backbone.transformer.h.1.block.mlp.c_fc.weight" in changed  # gradients that were finite: stepped
    assert torch.equal(optimizer.state_dict()["state"][index]["step"], step_before)
    optimizer.zero_grad()
    assert not optimizer.skipped_last


def test_in_backward_refuses_grad_accum_and_fp16():
    model = tiny_model().train()
    with pytest.raises(DharmaError, match="grad_accum = 1"):
        build_optimizer(model, train_section(optimizer_in_backward=True, grad_accum=4), 10, "cpu")
    with pytest.raises(DharmaError, match='precision = "bf16" or "fp32"'):
        build_optimizer(model, train_section(optimizer_in_backward=True, precision="fp16"), 10, "cpu")


# -- frozen parameters ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_frozen_parameters_never_change_and_have_no_state(mode):
    model = tiny_model().train()
    freeze_groups(model, ["backbone"])
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = build_optimizer(model, train_section(**MODES[mode]), 10, "cpu")
    run(model, optimizer, batches(3))
    assert all(torch.equal(frozen[n], p) for n, p in model.named_parameters() if n in frozen)
    assert {id(p) for p in optimizer.trainable} == {id(p) for p in model.parameters() if p.requires_grad}
    held = {id(p) for o in optimizer._optimizers for p in o.state}
    assert held and not held & {id(p) for p in model.parameters() if not p.requires_grad}
    assert all(p.grad is None for p in model.parameters())


# -- exact resume -----------------------------------------------------------------------------------


def through_disk(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("mode", MODES)
def test_state_dict_round_trip_gives_identical_updates(mode):
    first, later = batches(3), batches(3, seed=1)
    model, optimizer = fresh(schedule="cosine", warmup_fraction=0.2, **MODES[mode])
    run(model, optimizer, first)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    state = through_disk(optimizer.state_dict())
    run(model, optimizer, later, seed=7)

    resumed = tiny_model().train()
    resumed.load_state_dict(weights)
    restored = build_optimizer(
        resumed, train_section(schedule="cosine", warmup_fraction=0.2, **MODES[mode]), 20, "cpu"
    )
    restored.load_state_dict(state)
    assert restored.lr == pytest.approx(lr_factor("cosine", 3, 20, 0.2) * 1e-2)
    run(resumed, restored, later, seed=7)
    assert same_parameters(model, resumed)
    assert restored.lr == optimizer.lr


def test_state_carries_over_to_other_switches():
    """Saved by plain AdamW, resumed in backward: the same next updates (fp32 moments, both fused)."""
    first, later = batches(2), batches(2, seed=1)
    model, optimizer = fresh()
    run(model, optimizer, first)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    state = through_disk(optimizer.state_dict())
    run(model, optimizer, later, seed=3)
    other = tiny_model().train()
    other.load_state_dict(weights)
    switched = build_optimizer(other, train_section(optimizer_in_backward=True), 20, "cpu")
    switched.load_state_dict(state)
    run(other, switched, later, seed=3)
    assert same_parameters(model, other)


def test_state_of_another_model_is_refused():
    model, optimizer = fresh()
    run(model, optimizer, batches(1))
    state = optimizer.state_dict()
    other = tiny_model().train()
    freeze_groups(other, ["spiritual"])
    with pytest.raises(DharmaError, match="freeze groups or the model changed"):
        build_optimizer(other, train_section(), 20, "cpu").load_state_dict(state)


def test_gradients_that_share_memory_are_clipped_once_each():
    """On the grouped path, when every module of a group has at most one token (here a parallel
    stack and a one-token batch), backward hands a path module's direction and its adapter's
    output bias the very same gradient tensor; the loop separates them, so clipping scales each
    once (not the shared memory twice)."""
    model = all_modules("parallel").train()
    set_grouped(model, True)
    ids = torch.tensor([[5]])
    model(input_ids=ids).logits.square().mean().backward()
    params = [p for p in model.parameters() if p.grad is not None]
    assert len({p.grad.data_ptr() for p in params}) < len(params)  # what backward leaves
    before = [p.grad.clone() for p in params]
    separate_gradients(params)
    assert len({p.grad.data_ptr() for p in params}) == len(params)
    torch.nn.utils.clip_grad_norm_(params, 1e-3)
    factor = 1e-3 / float(torch.linalg.vector_norm(torch.stack([g.norm() for g in before])))
    for p, g in zip(params, before, strict=True):
        torch.testing.assert_close(p.grad, g * factor, rtol=1e-4, atol=1e-12)


def test_the_loop_separates_gradients_before_it_clips(tmp_path, monkeypatch):
    """`dharma train` calls separate_gradients on what it clips, before clipping."""
    from rich.console import Console
    from trainkit import write_manifest

    from dharma_kernel.train import loop
    from dharma_kernel.train.run import TrainOptions, train

    calls = []
    real_clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(loop, "separate_gradients", lambda params: calls.append(("separate", params)))
    monkeypatch.setattr(
        torch.nn.utils,
        "clip_grad_norm_",
        lambda params, limit: calls.append(("clip", params)) or real_clip(params, limit),
    )
    train(
        write_manifest(tmp_path, train={"max_steps": 1, "grad_accum": 1}), TrainOptions(), Console(quiet=True)
    )
    assert [name for name, _ in calls] == ["separate", "clip"]
    assert calls[0][1] is calls[1][1]


def test_optimizer_in_backward_clips_a_shared_gradient_once_for_each_parameter():
    """Stepping in backward, each parameter's hook clips its gradient: out of place, as the same
    tensor may be another parameter's gradient still to come (the one-token group above), whose
    norm the reported global norm then counts unclipped."""
    model = all_modules("parallel").train()
    set_grouped(model, True)
    ids = torch.tensor([[5]])
    reference = copy.deepcopy(model)
    torch.manual_seed(1)  # the same dropout both times
    reference(input_ids=ids).logits.square().mean().backward()
    params = [p for p in reference.parameters() if p.grad is not None]
    separate_gradients(params)
    true = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
    settings = TrainSection(
        learning_rate=1e-2, max_grad_norm=1e-4, warmup_fraction=0.0, optimizer_in_backward=True
    )
    optimizer = build_optimizer(model, settings, 10, "cpu")
    torch.manual_seed(1)
    model(input_ids=ids).logits.square().mean().backward()
    assert optimizer.grad_norm == pytest.approx(true, rel=1e-6)
