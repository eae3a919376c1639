"""Fixed-capacity routing (dharma_kernel.capacity): the same model as exact routing restricted to
the kept (module, token) pairs, with fixed shapes and nothing read back to the host."""

from __future__ import annotations

import pytest
import torch
from test_grouped import all_modules

from dharma_kernel.capacity import capacity, slots
from dharma_kernel.errors import DharmaError

BATCH = (3, 12)


def make_batch(last_token_real: bool):
    ids = torch.randint(1, 97, BATCH, generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    if last_token_real:
        mask[2, :2] = 0
    else:
        mask[2, 9:] = 0  # right padding
    return ids, mask


@pytest.fixture(params=[False, True], ids=["last token padding", "last token real"])
def batch(request):
    """Empty slots point at the last token: once padding, once a real token with its own score."""
    return make_batch(request.param)


@pytest.fixture
def one_batch():
    """For the tracing tests (each about 10 to 25 s): one layout is enough."""
    return make_batch(True)


def concept_labels(model, ids):
    """A fixed draw labelling one (token, module) pair in ten."""
    draw = torch.rand(*ids.shape, len(model.module_refs), generator=torch.Generator().manual_seed(1))
    return (draw < 0.1).to(torch.int8)


def set_capacity(model, factor):
    for stack in model.stacks.values():
        stack.capacity_factor = factor


def labelled_step(model, ids, mask, labels):
    """``loss_and_grads`` with concept labels: also every loss component (the concept loss reads
    each module's scores where it ran) and where each module ran."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # the same dropout both times
    out = model(input_ids=ids, attention_mask=mask, labels=ids, concept_labels=labels)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    losses = {name: value.detach() for name, value in out.losses.items()}
    active = {ref: out.module_active[ref] for ref in model.module_refs}
    return out.logits.detach(), out.loss.detach(), grads, losses, active


def assert_equal_steps(fixed, reference):
    """Logits, loss components, where modules ran and gradients agree (1e-5); a module no token
    chose has a zero gradient under capacity, none under exact routing."""
    torch.testing.assert_close(fixed[0], reference[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fixed[1], reference[1], rtol=1e-5, atol=1e-6)
    assert fixed[3].keys() == reference[3].keys()
    for name, value in reference[3].items():
        torch.testing.assert_close(fixed[3][name], value, rtol=1e-5, atol=1e-6, msg=name)
    for ref, ran in reference[4].items():
        assert torch.equal(fixed[4][ref], ran), ref
    assert reference[2].keys() <= fixed[2].keys()
    for name, grad in fixed[2].items():
        expected = reference[2].get(name, torch.zeros_like(grad))
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6, msg=name)


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
@pytest.mark.parametrize("off", [[], ["paths.seva", "darshanas.vedanta"]])
def test_room_for_every_token_equals_exact_routing(grouped, off, batch):
    """Capacity = every token: nothing is dropped, so everything equals exact routing's, with
    modules switched off too (they keep the router's choice as where they ran)."""
    model = all_modules("routed").train()
    for stack in model.stacks.values():
        stack.grouped = grouped
    labels = concept_labels(model, batch[0])
    with model.switched_off(off):
        reference = labelled_step(model, *batch, labels)
        set_capacity(model, 1e6)
        fixed = labelled_step(model, *batch, labels)
    assert {"concept", "routing@0", "router_balance@1"} <= reference[3].keys()
    assert_equal_steps(fixed, reference)


def restrict_exact_routing(model, kept, monkeypatch):
    """Exact routing from now on, each stack's chosen pairs restricted to ``kept[stack index]``
    (``[N, M]`` in run order, as the slot table has them): the modules run there only, and
    count as having run there only (the concept loss reads their scores there)."""
    from dharma_kernel.columns import Columns

    set_capacity(model, None)
    for index, stack in enumerate(model.stacks.values()):
        ranked = stack._ranked(True, kept[index].device)
        allowed = torch.zeros_like(kept[index]).index_copy(1, ranked, kept[index])
        original_run = stack._run_modules.__wrapped__.__get__(stack)

        def restricted(members, hidden, runs, active, *rest, allowed=allowed, run=original_run):
            return run(members, hidden, runs & allowed.view_as(runs), active & allowed.view_as(active), *rest)

        def forward(*args, allowed=allowed, original=stack.forward, refs=stack.refs):
            result = original(*args)
            ran = result.active.last()
            result.active = Columns(refs, ran & allowed.view_as(ran))
            return result

        monkeypatch.setattr(stack, "_run_modules", restricted)
        monkeypatch.setattr(stack, "forward", forward)


def recording_slots(monkeypatch):
    """Record each forward's slot tables: ``[(runs, kept)]`` in stack order."""
    tables = []
    original = slots

    def keeping(runs, size):
        table = original(runs, size)
        tables.append((runs, table.kept))
        return table

    monkeypatch.setattr("dharma_kernel.capacity.slots", keeping)
    return tables


def test_a_full_module_drops_its_later_tokens(batch, monkeypatch):
    """With few slots the result equals exact routing given only the kept pairs."""
    model = all_modules("routed").train()
    labels = concept_labels(model, batch[0])
    set_capacity(model, 0.3)
    tables = recording_slots(monkeypatch)
    fixed = labelled_step(model, *batch, labels)
    assert sum(int((runs & ~kept).sum()) for runs, kept in tables) > 0  # the capacity bit
    restrict_exact_routing(model, [kept for _, kept in tables], monkeypatch)
    assert_equal_steps(fixed, labelled_step(model, *batch, labels))


def make_ungroupable(model, refs):
    """Give the modules ``refs`` a computation of their own without ``grouped_tokens`` (as a
    third-party plugin may): their own loss, and no group (they run on their own tokens)."""
    from dharma_kernel.grouped import plan_runs
    from dharma_kernel.protocol import TokenOutput

    for stack in model.stacks.values():
        for ref in refs:
            module = stack.members[ref.replace(".", "__")]
            family = type(module)

            def forward_tokens(self, x, hidden, ctx, family=family):
                out = family.forward_tokens(self, x, hidden, ctx)
                return TokenOutput(out.delta, out.score, {"own": (out.delta**2).mean()})

            module.__class__ = type(f"Solo{family.__name__}", (family,), {"forward_tokens": forward_tokens})
        members = list(stack.members.values())
        stack._runs = {grouped: plan_runs(members, grouped) for grouped in (True, False)}
        stack._ranked_on.clear()


@pytest.mark.parametrize("factor", [1e6, 0.3])
def test_a_module_that_does_not_group_runs_on_its_kept_tokens(factor, batch, monkeypatch):
    model = all_modules("routed").train()
    make_ungroupable(model, ["paths.karma", "darshanas.yoga", "crisis.health"])
    labels = concept_labels(model, batch[0])
    set_capacity(model, factor)
    tables = recording_slots(monkeypatch)
    fixed = labelled_step(model, *batch, labels)
    assert any("/own@" in name for name in fixed[3])  # their own losses are kept
    restrict_exact_routing(model, [kept for _, kept in tables], monkeypatch)
    assert_equal_steps(fixed, labelled_step(model, *batch, labels))


def test_modules_no_token_chose_are_idle_for_fsdp(batch):
    """drop_idle_gradients (FSDP) drops the zero gradients of modules no token chose: under
    capacity they compute empty slots, and still count as idle."""
    model = all_modules("routed").train()
    idle = {}
    for factor in (None, 1.25):
        set_capacity(model, factor)
        for stack in model.stacks.values():
            stack.touch_unused, stack.idle = True, [True] * len(stack.refs)
        torch.manual_seed(0)  # the same dropout, so the first stack routes alike
        model(input_ids=batch[0], attention_mask=batch[1], labels=batch[0]).loss.backward()
        idle[factor] = model.stacks["0"].idle
    # a module that any token chose fills its first slot, so the idle modules are the same
    assert idle[1.25] == idle[None] and 0 < sum(idle[None]) < len(idle[None])


def test_evaluation_routes_exactly(one_batch):
    model = all_modules("routed").eval()
    with torch.no_grad():
        exact = model(input_ids=one_batch[0], attention_mask=one_batch[1]).logits
        set_capacity(model, 0.3)
        assert torch.equal(model(input_ids=one_batch[0], attention_mask=one_batch[1]).logits, exact)


def test_a_routed_training_step_reads_nothing_back_in_the_stacks(one_batch, monkeypatch):
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
    model(input_ids=one_batch[0], attention_mask=one_batch[1], labels=one_batch[0]).loss.backward()
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


def test_a_routed_model_with_capacity_traces_as_one_graph(one_batch):
    """No graph break anywhere in the forward with concept labels (fullgraph=True raises at the
    first): torch.compile can compile the whole step, and on CUDA capture it as a graph
    (mode="reduce-overhead")."""
    import torch._dynamo

    model = all_modules("routed").train()
    set_capacity(model, 1.25)
    labels = concept_labels(model, one_batch[0])
    eager = labelled_step(model, *one_batch, labels)
    assert {"concept", "routing@0"} <= eager[3].keys()  # the label losses are in the traced forward too
    torch._dynamo.reset()
    # aot_eager traces the backward too; dynamic=None as compiled() leaves it with capacity
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    traced = labelled_step(compiled, *one_batch, labels)
    torch.testing.assert_close(traced[1], eager[1], rtol=1e-5, atol=1e-6)
    for name, grad in eager[2].items():
        torch.testing.assert_close(traced[2][f"_orig_mod.{name}"], grad, rtol=1e-5, atol=1e-6)


def test_blocks_compiled_alone_still_see_the_forward_state(one_batch):
    """Compiling the slots but not the model (as compiling the backbone's blocks does): the traced
    slots read the eager forward's state, so no loss goes missing."""
    import torch._dynamo

    from dharma_kernel.model import DharmaSlot

    model = all_modules("routed").train()
    labels = concept_labels(model, one_batch[0])
    eager = labelled_step(model, *one_batch, labels)
    torch._dynamo.reset()
    for block in model.modules():
        if isinstance(block, DharmaSlot):
            block.compile(backend="eager")
    traced = labelled_step(model, *one_batch, labels)
    assert traced[3].keys() == eager[3].keys()
    torch.testing.assert_close(traced[1], eager[1], rtol=1e-5, atol=1e-6)


def test_cuda_graphs_without_capacity_are_warned_about():
    """compile_mode = "reduce-overhead" (CUDA graphs) over exact routing covers only the parts
    between the stacks: said, with the setting that makes one graph."""
    import types
    import warnings

    from dharma_kernel.train.compiled import for_training

    model = all_modules("routed")
    cfg = types.SimpleNamespace(compile=True, compile_mode="reduce-overhead")
    with pytest.warns(UserWarning, match="set modules.capacity_factor"):
        for_training(model, cfg)
    set_capacity(model, 1.25)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for_training(model, cfg)  # torch.compile is lazy: nothing compiles until a call


def test_the_model_card_says_the_capacity():
    from dharma_kernel.hub import model_card

    layout = {"at_layers": [0], "composition": "routed", "top_k": 2, "modules": [{"ref": "paths.karma"}]}
    config = {"layout": layout, "text_config": {"model_type": "gpt2"}}
    assert "routed, top_k 2." in model_card(config)
    layout["capacity_factor"] = 1.25
    assert "routed, top_k 2, capacity factor 1.25." in model_card(config)
