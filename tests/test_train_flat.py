"""Module parameters trained as flat tensors (dharma_kernel.train.flat): the same steps as
torch's AdamW on the parameters themselves, the same saved optimizer state, and a model that
saves like any other. Eager here (the flat forward is what train.compile compiles); the
compiled run is in test_train_compile.py."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_model, save_model
from test_capacity import make_ungroupable
from test_grouped import all_modules

from dharma_kernel.errors import DharmaError
from dharma_kernel.manifest import TrainSection
from dharma_kernel.train.flat import ALIGN_BYTES, FlatForward, always_computing, for_compiled_training
from dharma_kernel.train.optim import build_optimizer

BATCH = (3, 12)
SETTINGS = TrainSection(learning_rate=1e-3, weight_decay=0.1, schedule="constant", warmup_fraction=0.0)


def routed_with_capacity():
    model = all_modules("routed").train()
    for stack in model.stacks.values():
        stack.capacity_factor = 1.25
    return model


def batches(steps: int):
    generator = torch.Generator().manual_seed(3)
    out = []
    for _ in range(steps):
        ids = torch.randint(1, 97, BATCH, generator=generator)
        mask = torch.ones_like(ids)
        mask[1, :4] = 0  # left padding
        out.append((ids, mask))
    return out


def assert_same_weights(model, reference):
    """Equal weights to float rounding: each tensor within 1e-5 of its norm. AdamW divides by the
    root of the second moment, so where a gradient is near zero (attention's key bias) the last
    bits of rounding move single elements by ~1e-5 of the learning rate; element-wise comparison
    would test the rounding."""
    for (name, p), q in zip(reference.named_parameters(), model.parameters(), strict=True):
        assert float((q - p).detach().norm()) <= 1e-5 * max(float(p.detach().norm()), 1.0), name


def flat_of(model, saved=None):
    """What a compiled run of ``SETTINGS`` (weight decay 0.1) trains flat."""
    return for_compiled_training(model, SETTINGS.model_copy(update={"compile": True}), saved)


def train_steps(model, optimizer, forward, steps, limit=0.05):
    """The loop's step: forward, backward, clip the optimizer's tensors (a small limit: it clips),
    step, zero. Returns each step's loss and gradient norm."""
    record = []
    for ids, mask in steps:
        torch.manual_seed(0)
        loss = forward(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(optimizer.trainable, limit)
        optimizer.step()
        optimizer.zero_grad()
        optimizer.schedule_step()
        record.append((float(loss.detach()), float(norm)))
    return record


@pytest.fixture(scope="module")
def trained():
    """The same model trained 2 steps on its parameters and 2 steps flat."""
    model = routed_with_capacity()
    twin = copy.deepcopy(model)
    reference = build_optimizer(model, SETTINGS, 10, "cpu")
    flat = flat_of(twin)
    optimizer = build_optimizer(twin, SETTINGS, 10, "cpu", flat)
    steps = batches(3)
    before = train_steps(model, reference, model, steps[:2])
    after = train_steps(twin, optimizer, FlatForward(twin, flat), steps[:2])
    return model, reference, twin, optimizer, flat, before, after, steps


def test_flat_training_takes_the_same_steps(trained):
    model, reference, twin, optimizer, flat, before, after, _ = trained
    assert len(optimizer.trainable) < len(reference.trainable) / 10  # over a thousand tensors became a few
    for (loss, norm), (flat_loss, flat_norm) in zip(before, after, strict=True):
        assert flat_loss == pytest.approx(loss, rel=1e-5)
        assert flat_norm == pytest.approx(norm, rel=1e-5)  # clipping sees the same gradients
    assert before[1][0] != before[0][0]  # the model moved
    assert_same_weights(twin, model)
    for p in twin.parameters():  # gradients go to the flat tensors, never to the parameters
        assert p.grad is None


def test_the_saved_state_has_the_parameters_layout_and_resumes_either_way(trained):
    model, reference, twin, optimizer, flat, _, _, steps = trained
    saved, flat_saved = reference.state_dict(), optimizer.state_dict()
    assert flat_saved["shapes"] == saved["shapes"]
    assert sorted(flat_saved["state"]) == sorted(saved["state"]) == list(range(len(reference.params)))
    for i, values in saved["state"].items():
        for key, value in values.items():
            torch.testing.assert_close(flat_saved["state"][i][key], value, rtol=1e-5, atol=1e-7)
    # the parameters' state resumes flat, and the flat state resumes on the parameters
    a, b = copy.deepcopy(model), copy.deepcopy(twin)
    a_flat = flat_of(a)
    a_optimizer = build_optimizer(a, SETTINGS, 10, "cpu", a_flat)
    a_optimizer.load_state_dict(saved)
    b_optimizer = build_optimizer(b, SETTINGS, 10, "cpu")
    b_optimizer.load_state_dict(flat_saved)
    third = steps[2:]
    expected = train_steps(model, reference, model, third)
    assert train_steps(a, a_optimizer, FlatForward(a, a_flat), third)[0][0] == pytest.approx(expected[0][0])
    assert train_steps(b, b_optimizer, b, third)[0][0] == pytest.approx(expected[0][0])
    assert_same_weights(a, model)
    assert_same_weights(b, model)


def test_state_with_unequal_step_counts_is_resumed_per_tensor(trained):
    """One step count per flat tensor: a state in which some of those parameters were skipped (under
    FSDP, or optimizer_in_backward after a non-finite gradient) resumes with every parameter on its
    own, and says so; an optimizer already flat refuses it, saying what to do."""
    _, reference, twin, _, _, _, _, _ = trained
    saved = reference.state_dict()
    first = next(i for i, p in enumerate(reference.params) if ".members." in _name(twin, i))
    assert flat_of(copy.deepcopy(twin), saved) is not None  # equal counts: flat
    saved["state"][first] = {**saved["state"][first], "step": saved["state"][first]["step"] - 1}
    b = copy.deepcopy(twin)
    with pytest.warns(UserWarning, match="different step counts.*--reset-optimizer"):
        assert flat_of(b, saved) is None
    with pytest.raises(DharmaError, match="different step counts") as caught:
        build_optimizer(b, SETTINGS, 10, "cpu", flat_of(b)).load_state_dict(saved)
    assert "--reset-optimizer" in caught.value.hint


def _name(model, index):
    return [n for n, p in model.named_parameters() if p.requires_grad][index]


def test_parameters_share_the_flat_storage_until_released(trained, tmp_path):
    _, _, twin, _, flat, _, _, _ = trained
    model = copy.deepcopy(twin)  # a deep copy owns its storage: flattened afresh below
    model_flat = flat_of(model)
    first, second = model_flat.flats[0].params[:2]
    assert first.untyped_storage().data_ptr() == second.untyped_storage().data_ptr()
    for f in model_flat.flats:  # each starts where a tensor of its own would: 64-byte aligned
        assert all(p.data_ptr() % ALIGN_BYTES == 0 for p in f.params)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    model_flat.release()
    assert first.untyped_storage().data_ptr() != second.untyped_storage().data_ptr()
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
    module = model.stacks["0"].members["darshanas__vedanta"]
    save_model(module, str(tmp_path / "vedanta.safetensors"))  # refuses tensors that share memory
    fresh = copy.deepcopy(module)
    for p in fresh.parameters():
        p.data.zero_()
    load_model(fresh, str(tmp_path / "vedanta.safetensors"))
    for p, q in zip(module.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p, q)


def test_only_modules_that_compute_at_every_step_are_flattened():
    exact = all_modules("routed")
    assert always_computing(exact) == []  # exact routing skips modules; every token is routed
    routers = {id(p) for s in exact.stacks.values() for p in s.router_parameters()}
    assert len(routers) == 6 and {id(p) for f in flat_of(exact).flats for p in f.params} == routers
    parallel = all_modules("parallel")
    assert len(always_computing(parallel)) == 2 * len(parallel.module_refs)
    model = routed_with_capacity()
    # a module that does not group runs on its kept tokens under capacity, and can be idle
    make_ungroupable(model, ["darshanas.vedanta"])
    chosen = always_computing(model)
    assert len(chosen) == 2 * (len(model.module_refs) - 1)
    assert not any(m.ref() == "darshanas.vedanta" for m in chosen)
    # frozen parameters stay out; so does everything without train.compile or stepped in backward
    for p in model.stacks["1"].parameters():
        p.requires_grad_(False)
    held = {id(p) for f in flat_of(model).flats for p in f.params}
    assert not any(id(p) in held for p in model.stacks["1"].parameters())
    assert not any(
        id(p) in held for m in model.stacks["0"].members.values() if m not in chosen for p in m.parameters()
    )
    assert for_compiled_training(routed_with_capacity(), SETTINGS) is None
    in_backward = SETTINGS.model_copy(update={"compile": True, "optimizer_in_backward": True})
    assert for_compiled_training(routed_with_capacity(), in_backward) is None
    assert for_compiled_training(routed_with_capacity(), SETTINGS.model_copy(update={"compile": True}))


def test_parallel_stacks_train_flat_too():
    """Every module of a parallel stack computes at every token: all flat, the same steps."""
    model = all_modules("parallel").train()
    twin = copy.deepcopy(model)
    reference = build_optimizer(model, SETTINGS, 10, "cpu")
    flat = flat_of(twin)
    assert sum(len(f.params) for f in flat.flats) == sum(
        1 for m in always_computing(twin) for p in m.parameters()
    )
    steps = batches(2)
    before = train_steps(model, reference, model, steps)
    after = train_steps(
        twin, build_optimizer(twin, SETTINGS, 10, "cpu", flat), FlatForward(twin, flat), steps
    )
    for (loss, norm), (flat_loss, flat_norm) in zip(before, after, strict=True):
        assert flat_loss == pytest.approx(loss, rel=1e-5)
        assert flat_norm == pytest.approx(norm, rel=1e-5)
    assert_same_weights(twin, model)


def test_backward_joins_the_gradients_in_one_op_per_flat_tensor():
    """The views come from one split, so backward concatenates their gradients once. (Sliced one
    by one, each view's gradient would be a zero tensor the size of the whole flat tensor, summed:
    a compiled lite step ran at 0.46 of the bare backbone that way, 0.94 split.)"""
    from torch.profiler import ProfilerActivity, profile

    model = routed_with_capacity()
    flat = flat_of(model)
    views = flat.views()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        sum(view.sum() for view in views.values()).backward()
    names = [event.name for event in prof.events()]
    assert names.count("aten::slice_backward") == 0
    assert names.count("aten::cat") == len(flat.flats)
    for f in flat.flats:  # ones at the parameters, zeros in the gaps
        expected = torch.zeros_like(f.leaf)
        for _, at in f.slices():
            expected[at] = 1.0
        assert torch.equal(f.leaf.grad, expected)
