"""Fixed-capacity routing (dharma_kernel.capacity): the same model as exact routing restricted to
the kept (module, token) pairs, with fixed shapes and nothing read back to the host."""

from __future__ import annotations

import pytest
import torch
from test_grouped import all_modules, loss_and_grads

from dharma_kernel.capacity import capacity, slots
from dharma_kernel.errors import DharmaError

BATCH = (3, 12)


@pytest.fixture
def batch():
    ids = torch.randint(1, 97, BATCH, generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    mask[2, 9:] = 0  # right padding
    return ids, mask


def set_capacity(model, factor):
    for stack in model.stacks.values():
        stack.capacity_factor = factor


def labelled_step(model, ids, mask, labels):
    """``loss_and_grads`` with concept labels: also the names of the loss components."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # the same dropout both times
    out = model(input_ids=ids, attention_mask=mask, labels=ids, concept_labels=labels)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), out.loss.detach(), grads, set(out.losses)


def test_slots_keep_each_modules_first_tokens_in_order():
    runs = torch.tensor([[1, 0, 1], [1, 1, 0], [0, 1, 0], [1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    table = slots(runs, 2)
    assert table.rows.tolist() == [[0, 1], [1, 2], [0, 4]]  # module 2's empty slot: the last token
    assert table.filled.tolist() == [[True, True], [True, True], [True, False]]
    kept = runs.clone()
    kept[3:, 0] = False  # module 0's third and fourth tokens are past its 2 slots
    kept[3, 1] = False
    assert torch.equal(table.kept, kept)


def test_capacity_counts_slots_per_module():
    assert capacity(tokens=512, modules=37, top_k=2, factor=1.25) == 35  # ceil(1.25 * 2 * 512 / 37)
    assert capacity(tokens=8, modules=2, top_k=2, factor=4.0) == 8  # never more than the tokens
    assert capacity(tokens=1, modules=37, top_k=2, factor=0.1) == 1


@pytest.mark.parametrize("grouped", [True, False])
def test_room_for_every_token_equals_exact_routing(grouped, batch):
    """Capacity = every token: nothing is dropped, so logits, loss and every gradient equal exact
    routing's; modules no token chose now get zero gradients instead of none."""
    model = all_modules("routed").train()
    for stack in model.stacks.values():
        stack.grouped = grouped
    reference = loss_and_grads(model, *batch)
    set_capacity(model, 1e6)
    fixed = loss_and_grads(model, *batch)
    torch.testing.assert_close(fixed[0], reference[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fixed[1], reference[1], rtol=1e-5, atol=1e-6)
    assert reference[2].keys() <= fixed[2].keys()
    for name, grad in fixed[2].items():
        expected = reference[2].get(name, torch.zeros_like(grad))
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6, msg=name)


def test_a_full_module_drops_its_later_tokens(batch, monkeypatch):
    """With few slots the result equals exact routing given only the kept pairs."""
    model = all_modules("routed").train()
    set_capacity(model, 0.3)
    kept = {}
    original = slots

    def keeping(runs, size):
        table = original(runs, size)
        kept[len(kept)] = (runs, table.kept)
        return table

    monkeypatch.setattr("dharma_kernel.capacity.slots", keeping)
    fixed = loss_and_grads(model, *batch)
    dropped = sum(int((runs & ~k).sum()) for runs, k in kept.values())
    assert dropped > 0  # the capacity bit

    # the reference: exact routing, each stack's chosen pairs restricted to the kept ones
    set_capacity(model, None)
    stacks = list(model.stacks.values())
    for index, stack in enumerate(stacks):
        runs, table_kept = kept[index]
        ranked = stack._ranked(True, runs.device)
        allowed = torch.zeros_like(table_kept).index_copy(1, ranked, table_kept)
        original_run = stack._run_modules.__wrapped__.__get__(stack)

        def restricted(members, hidden, runs, active, *rest, allowed=allowed, run=original_run):
            only = runs & allowed.view_as(runs)
            return run(members, hidden, only, active & allowed.view_as(active), *rest)

        monkeypatch.setattr(stack, "_run_modules", restricted)
    reference = loss_and_grads(model, *batch)
    torch.testing.assert_close(fixed[0], reference[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fixed[1], reference[1], rtol=1e-5, atol=1e-6)
    for name, grad in reference[2].items():
        torch.testing.assert_close(fixed[2][name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_evaluation_routes_exactly(batch):
    model = all_modules("routed").eval()
    with torch.no_grad():
        exact = model(input_ids=batch[0], attention_mask=batch[1]).logits
        set_capacity(model, 0.3)
        assert torch.equal(model(input_ids=batch[0], attention_mask=batch[1]).logits, exact)


def test_a_routed_training_step_reads_nothing_back_in_the_stacks(batch, monkeypatch):
    """No nonzero, tolist or item inside a stack with grouped families: on a GPU each would wait
    for the device."""
    import traceback

    model = all_modules("routed").train()
    set_capacity(model, 1.25)
    calls = []

    def counted(name):
        method = getattr(torch.Tensor, name)

        def call(self, *args, **kwargs):
            where = [f for f in traceback.extract_stack() if "dharma_kernel" in f.filename]
            inside = ("stack.py", "grouped.py", "capacity.py", "families.py")
            if any(f.filename.endswith(inside) for f in where):
                calls.append((name, f"{where[-1].filename}:{where[-1].lineno}"))
            return method(self, *args, **kwargs)

        return call

    for name in ("nonzero", "tolist", "item", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, counted(name))
    model(input_ids=batch[0], attention_mask=batch[1], labels=batch[0]).loss.backward()
    assert calls == []


def test_capacity_factor_needs_a_routed_stack(tmp_path):
    from dharma_kernel.assemble import plan
    from dharma_kernel.manifest import load_manifest

    path = tmp_path / "m.toml"
    path.write_text(
        '[model]\nname = "m"\n[backbone]\nconfig = {n_layer = 2, n_embd = 32, n_head = 2, vocab_size = 97}\n'
        '[modules]\ninclude = ["paths.karma"]\nat_layers = [0]\ncomposition = "parallel"\n'
        "capacity_factor = 1.25\n"
    )
    with pytest.raises(DharmaError, match="capacity_factor applies to routed stacks"):
        plan(load_manifest(path))


def test_capacity_factor_reaches_the_stacks_and_the_saved_config(tmp_path):
    from dharma_kernel.assemble import build, plan
    from dharma_kernel.manifest import load_manifest

    path = tmp_path / "m.toml"
    path.write_text(
        '[model]\nname = "m"\n[backbone]\nconfig = {n_layer = 2, n_embd = 32, n_head = 2, vocab_size = 97}\n'
        '[modules]\ninclude = ["paths.karma", "paths.bhakti"]\nat_layers = [0]\ncomposition = "routed"\n'
        "capacity_factor = 1.5\n"
    )
    model = build(plan(load_manifest(path)))
    assert [stack.capacity_factor for stack in model.stacks.values()] == [1.5]
    model.save_pretrained(tmp_path / "saved")
    from dharma_kernel.model import DharmaModel

    assert DharmaModel.from_pretrained(tmp_path / "saved").stacks["0"].capacity_factor == 1.5


def test_a_routed_model_with_capacity_traces_as_one_graph(batch):
    """No graph break anywhere in the forward with concept labels (fullgraph=True raises at the
    first): torch.compile can compile the whole step, and on CUDA capture it as a graph
    (mode="reduce-overhead")."""
    import torch._dynamo

    model = all_modules("routed").train()
    set_capacity(model, 1.25)
    draw = torch.rand(*batch[0].shape, len(model.module_refs), generator=torch.Generator().manual_seed(1))
    labels = (draw < 0.1).to(torch.int8)
    eager = labelled_step(model, *batch, labels)
    assert {"concept", "routing@0"} <= eager[3]  # the label losses are in the traced forward too
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True, dynamic=True)
    traced = labelled_step(compiled, *batch, labels)
    torch.testing.assert_close(traced[1], eager[1], rtol=1e-5, atol=1e-6)
    for name, grad in eager[2].items():
        torch.testing.assert_close(traced[2][f"_orig_mod.{name}"], grad, rtol=1e-5, atol=1e-6)
