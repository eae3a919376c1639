"""Grouped modules' parameters held stacked (dharma_kernel.train.stacked): the same steps as torch's
AdamW on the parameters themselves (members no token chose left as they are), the same saved
optimizer state, and a model that saves like any other."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from safetensors.torch import load_model, save_model
from test_grouped import all_modules, set_grouped
from test_train_flat import BATCH, SETTINGS, assert_same_weights, batches

from dharma_kernel import grouped
from dharma_kernel.attention_pool import attention_blocks
from dharma_kernel.freeze import freeze_groups
from dharma_kernel.grouped import HELD
from dharma_kernel.train import stacked as stacked_module
from dharma_kernel.train.flat import ALIGN_BYTES
from dharma_kernel.train.optim import build_optimizer, separate_gradients
from dharma_kernel.train.stacked import for_eager_training, stack_modules


def grouped_model(composition: str, capacity: float | None = None):
    model = all_modules(composition).train()
    set_grouped(model, True)  # the grouped path, as on a GPU
    for stack in model.stacks.values():
        stack.capacity_factor = capacity
    return model


def assert_near_weights(model, reference):
    """Every element within a tenth of a step (``lr``). Under exact routing the stacked run computes
    its groups with their idle members (on no rows), so its products have other shapes and its
    gradients differ in the last bits; where a gradient is within rounding of zero, AdamW's
    division turns that into a few percent of a step. A member stepped when it should not be,
    or not stepped when it should, moves by most of a step."""
    for (name, p), q in zip(reference.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=0.1 * SETTINGS.learning_rate, msg=name)


def stacked_of(model):
    return for_eager_training(model, SETTINGS, torch.device("cpu"), distributed=False)


def train_steps(model, optimizer, steps, limit=0.05, extra=None):
    """The loop's step (as test_train_flat's), recording which members each step left idle."""
    record, idle = [], []
    for ids, mask in steps:
        torch.manual_seed(0)
        out = model(input_ids=ids, attention_mask=mask, labels=ids)
        loss = out.loss + (extra(model) if extra else 0.0)
        loss.backward()
        separate_gradients(optimizer.trainable)
        norm = torch.nn.utils.clip_grad_norm_(optimizer.trainable, limit)
        idle.append({ref for ref, where in out.module_active.items() if not bool(where.any())})
        optimizer.step()
        optimizer.zero_grad()
        optimizer.schedule_step()
        record.append((float(loss.detach()), float(norm)))
    return record, idle


def pair(model):
    """``model`` with its optimizer on its parameters, and a copy with its own on them held stacked."""
    twin = copy.deepcopy(model)
    reference = build_optimizer(model, SETTINGS, 10, "cpu")
    stacked = stacked_of(twin)
    optimizer = build_optimizer(twin, SETTINGS, 10, "cpu", stacked=stacked)
    return model, reference, twin, optimizer, stacked


def grouped_start():
    model = all_modules("routed", top_k=1).train()
    set_grouped(model, True)
    return model


@pytest.fixture(scope="module")
def trained():
    """Exact routing, top-1 (so members go idle): 3 steps on the parameters, 3 held stacked."""
    model, reference, twin, optimizer, stacked = pair(grouped_start())
    steps = batches(4)
    before, idle = train_steps(model, reference, steps[:3])
    after, _ = train_steps(twin, optimizer, steps[:3])
    return model, reference, twin, optimizer, stacked, before, after, idle, steps


def test_exact_routing_takes_the_same_steps_and_leaves_idle_members_alone(trained):
    model, reference, twin, optimizer, stacked, before, after, idle, _ = trained
    assert len(optimizer.trainable) < len(reference.trainable) / 4
    assert any(idle) and idle[0] != idle[1]  # members went idle, not always the same ones
    for (loss, norm), (stacked_loss, stacked_norm) in zip(before, after, strict=True):
        assert stacked_loss == pytest.approx(loss, rel=1e-5)
        assert stacked_norm == pytest.approx(norm, rel=1e-5)
    assert before[2][0] != before[0][0]
    assert_near_weights(twin, model)
    for p in twin.parameters():  # gradients go to the stacked tensors, never to the members
        assert p.grad is None
    # the same parameters stepped as often; one idle at every step is where it started
    state = reference.state_dict()["state"]
    stacked_state = optimizer.state_dict()["state"]
    assert sorted(stacked_state) == sorted(state)
    for i in state:
        assert float(stacked_state[i]["step"]) == float(state[i]["step"])
    start = dict(grouped_start().named_parameters())
    never = [n for i, (n, _) in enumerate(twin.named_parameters()) if i not in state]
    assert any(stacked.holds(dict(twin.named_parameters())[n]) for n in never)
    for name in never:
        assert torch.equal(dict(twin.named_parameters())[name], start[name]), name


@pytest.mark.parametrize(("composition", "capacity"), [("routed", 1.25), ("parallel", None)])
def test_fixed_capacity_and_parallel_take_the_same_steps(composition, capacity):
    model, reference, twin, optimizer, stacked = pair(grouped_model(composition, capacity))
    steps = batches(2)
    before, _ = train_steps(model, reference, steps)
    after, _ = train_steps(twin, optimizer, steps)
    for (loss, norm), (stacked_loss, stacked_norm) in zip(before, after, strict=True):
        assert stacked_loss == pytest.approx(loss, rel=1e-5)
        assert stacked_norm == pytest.approx(norm, rel=1e-5)
    assert_same_weights(twin, model)


def test_a_member_read_on_its_own_gets_its_gradient(trained):
    """A member parameter used outside its group (here an extra loss term on one detector): its
    gradient joins its row, and the row steps as torch's AdamW steps that parameter."""
    model, reference, twin, optimizer, stacked, _, _, _, steps = trained
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    a_optimizer = build_optimizer(a, SETTINGS, 10, "cpu")
    b_stacked = stacked_of(b)
    b_optimizer = build_optimizer(b, SETTINGS, 10, "cpu", stacked=b_stacked)
    name = next(n for n, _ in a.named_parameters() if n.endswith("detector.proj.weight") and ".members." in n)

    def extra(m):
        return dict(m.named_parameters())[name].square().sum()

    expected, _ = train_steps(a, a_optimizer, steps[:2], extra=extra)
    got, _ = train_steps(b, b_optimizer, steps[:2], extra=extra)
    for (loss, norm), (b_loss, b_norm) in zip(expected, got, strict=True):
        assert b_loss == pytest.approx(loss, rel=1e-5)
        assert b_norm == pytest.approx(norm, rel=1e-5)
    assert_near_weights(b, a)
    assert b_stacked.holds(dict(b.named_parameters())[name])


def test_the_saved_state_resumes_either_way(trained):
    """Per parameter, as torch's AdamW saves it (step counts differ: idle members skipped steps);
    the parameters' state resumes stacked and the stacked state on the parameters."""
    model, reference, twin, optimizer, stacked, _, _, _, steps = trained
    saved, stacked_saved = reference.state_dict(), optimizer.state_dict()
    assert stacked_saved["shapes"] == saved["shapes"]
    assert len({float(v["step"]) for v in saved["state"].values()}) > 1
    for i, values in saved["state"].items():
        for key, value in values.items():
            torch.testing.assert_close(stacked_saved["state"][i][key], value, rtol=1e-5, atol=1e-7)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    a_stacked = stacked_of(a)
    a_optimizer = build_optimizer(a, SETTINGS, 10, "cpu", stacked=a_stacked)
    a_optimizer.load_state_dict(saved)
    with torch.no_grad():  # b: the stacked run's weights, on its own parameters
        for p, q in zip(b.parameters(), twin.parameters(), strict=True):
            p.copy_(q)
    b_optimizer = build_optimizer(b, SETTINGS, 10, "cpu")
    b_optimizer.load_state_dict(stacked_saved)
    fourth = steps[3:]
    expected, _ = train_steps(model, reference, fourth)
    assert train_steps(a, a_optimizer, fourth)[0][0][0] == pytest.approx(expected[0][0])
    assert train_steps(b, b_optimizer, fourth)[0][0][0] == pytest.approx(expected[0][0])
    assert_near_weights(a, model)
    assert_near_weights(b, model)


def test_storage_is_shared_until_released_and_the_model_saves(tmp_path):
    model = grouped_model("routed")
    stacked = stacked_of(model)
    bucket = stacked.buckets[0]
    first = bucket.stacked[0]
    base = bucket.holder.untyped_storage().data_ptr()
    # a stacked tensor is aligned, but one laid out right after another in a span (one tensor
    # viewing both: see test_the_attention_groups_one_call_reads_their_held_tensors_as_one)
    inner = {id(leaf) for leaves, _ in grouped.SPANS.values() for leaf in leaves[1:]}
    assert inner
    for held in bucket.stacked:
        assert held.leaf.untyped_storage().data_ptr() == base
        assert id(held.leaf) in inner or (held.leaf.data_ptr() - base) % ALIGN_BYTES == 0
        for i, p in enumerate(held.params):
            assert p.data_ptr() == held.leaf[i].data_ptr()
    assert HELD[(id(first.owners[0]), first.name)].leaf is first.leaf
    stacked.release()
    assert all(p.untyped_storage().data_ptr() != base for p in first.params)
    assert (id(first.owners[0]), first.name) not in HELD
    assert not any(s.held_runs or s.on_ran for s in model.stacks.values())
    save_model(model.stacks, str(tmp_path / "stacks.safetensors"))
    fresh = grouped_model("routed")
    load_model(fresh.stacks, str(tmp_path / "stacks.safetensors"))
    for p, q in zip(fresh.stacks.parameters(), model.stacks.parameters(), strict=True):
        assert torch.equal(p, q)


def test_a_held_model_saves_with_save_pretrained_and_reads_its_weights_in_every_layout(tmp_path):
    """Held, a linear layer's weight is a transposed view of its row (held ``[M, in, out]``, as the
    product reads it): ``save_pretrained`` writes it row-major, and the grouped reads in the other
    layouts give the members' own weights."""
    from dharma_kernel.model import DharmaModel

    model = grouped_model("routed")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    held = stacked_of(model)
    try:
        weights = [s for b in held.buckets for s in b.stacked if s.transposed]
        assert {type(o).__name__ for s in weights for o in s.owners} == {"Linear"}
        first = weights[0]
        downs = list(first.owners)
        names = {id(p): name for name, p in model.named_parameters()}
        expected = torch.stack([before[names[id(d.weight)]] for d in downs])
        assert not downs[0].weight.is_contiguous()
        read = grouped.transposed(downs, "weight")
        assert read is first.leaf and torch.equal(read, expected.transpose(1, 2))
        assert torch.equal(grouped.stacked(downs, "weight"), expected)
        assert torch.equal(grouped.along_tokens(downs, "weight"), expected.unsqueeze(1))
        model.save_pretrained(tmp_path / "saved")
        loaded = DharmaModel.from_pretrained(tmp_path / "saved")
        for (name, p), q in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
            assert torch.equal(p, q), name
    finally:
        held.release()


def test_the_grouped_forward_stacks_nothing():
    """The point: no per-forward copy of the members' weights (torch.stack) and its split backward."""
    from torch.profiler import ProfilerActivity, profile

    model = grouped_model("routed")
    ids = torch.randint(1, 97, BATCH, generator=torch.Generator().manual_seed(0))

    def stacks_called():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(input_ids=ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)
        return sum(1 for e in prof.events() if e.name == "aten::stack")

    before = stacks_called()
    stacked = stacked_of(model)
    after = stacks_called()
    stacked.release()
    assert before > 20
    assert after < before / 10


def test_the_grouped_path_reads_the_held_tensors_themselves():
    """Vectors are held ``[M, 1, n]``, as the blocks broadcast them along the tokens, and the views of
    multi-view modules as one tensor, view after view, as they attend: read as they are, no
    unsqueeze, no cat. Each member parameter is the start of its row."""
    model = grouped_model("routed")
    stack = next(iter(model.stacks.values()))
    views = [
        m
        for ref, m in zip(stack.refs, stack.members.values(), strict=True)
        if ref in ("paths.jnana", "paths.yoga")
    ]
    every = [m.attention.views[i] for i in range(len(views[0].attention.views)) for m in views]
    held = stacked_of(model)
    try:
        leaves = {id(s.leaf) for b in held.buckets for s in b.stacked}
        query = grouped.transposed([v.query for v in every], "weight")
        scale = grouped.along_tokens([v.norm for v in every], "weight")
        assert id(query) in leaves and id(scale) in leaves
        assert scale.shape == (len(every), 1, every[0].norm.weight.shape[0])
        for i, view in enumerate(every):
            assert view.query.weight.data_ptr() == query[i].data_ptr()
            assert view.norm.weight.data_ptr() == scale[i].data_ptr()
    finally:
        held.release()


def test_the_attention_groups_one_call_reads_their_held_tensors_as_one():
    """Where the darshanas and the multi-view paths attend in one call (attention_pool.attend_together),
    each parameter of their attention blocks is held one group's right after the other's, and one
    tensor views both (grouped.SPANS): the call reads it, no cat forward and no split backward.
    Released, the spans go too."""
    model = grouped_model("routed", capacity=1e6)  # every group computes
    held = stacked_of(model)
    try:
        for stack in model.stacks.values():
            members = list(stack.members.values())
            groups = [[members[i] for i in run] for run in stack._runs[True]]
            requests = [attention_blocks(g) for g in groups]
            views, darshanas = [blocks for blocks, _ in filter(None, requests)]
            every = views + darshanas
            for layers, name in [([b.query for b in every], "weight"), ([b.norm for b in every], "bias")]:
                read = (
                    grouped.transposed(layers, name)
                    if name == "weight"
                    else grouped.along_tokens(layers, name)
                )
                assert any(read is span for _, span in grouped.SPANS.values())
                assert len(read) == len(every)
                for i, layer in enumerate(layers):  # a view of every member's parameter
                    member = getattr(layer, name)
                    assert member.data_ptr() == (read[i].t() if name == "weight" else read[i, 0]).data_ptr()
                assert (
                    read.grad.data_ptr()
                    == held.buckets[0].holder.grad[held_start(held, layers[0], name)].data_ptr()
                )
        spans = [key for key, (leaves, _) in grouped.SPANS.items() if all(map(held_leaf(held), leaves))]
        read = CountingGets(grouped.SPANS)  # the stacks' one call reads a span for each parameter
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(grouped, "SPANS", read)
            model(input_ids=torch.randint(1, 97, BATCH, generator=torch.Generator().manual_seed(0)))
        assert set(read.hits) == set(spans)  # every span read
        assert len(spans) == 8 * len(model.stacks)  # 4 linear or norm layers, weight and bias
    finally:
        held.release()
    assert not set(spans) & set(grouped.SPANS)


class CountingGets(dict):
    """A dict that counts the keys ``get`` finds."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.hits: dict = {}

    def get(self, key, default=None):
        if key in self:
            self.hits[key] = self.hits.get(key, 0) + 1
        return super().get(key, default)


def held_leaf(held):
    """Whether a tensor is one of ``held``'s stacked tensors."""
    leaves = {id(s.leaf) for b in held.buckets for s in b.stacked}
    return lambda leaf: id(leaf) in leaves


def held_start(held, owner, name):
    """The flat index where the stacked tensor of ``owner``'s parameter ``name`` starts."""
    (found,) = [s for b in held.buckets for s in b.stacked if s.owners[0] is owner and s.name == name]
    return found.start


def test_a_list_read_one_index_at_a_time_leaves_idle_members_alone():
    """A third-party family whose grouped code reads a module list's blocks one index at a time:
    each index held on its own (only lists a block names in ``read_together`` are held as one),
    so a member no token chose is not stepped, as torch's AdamW would not step it."""
    from torch import nn

    from dharma_kernel.protocol import DharmaModule, TokenOutput
    from dharma_kernel.stack import ModuleStack
    from dharma_kernel.train.stacked import StackedParameters

    class Experts(DharmaModule):
        family, name = "thirdparty", "experts"

        def __init__(self, hidden_size, config=None):
            super().__init__(hidden_size, config)
            self.experts = nn.ModuleList(nn.Linear(hidden_size, hidden_size) for _ in range(2))

        def forward_tokens(self, x, hidden, ctx):
            return TokenOutput(self.experts[0](x) + torch.tanh(self.experts[1](x)), x.new_ones(len(x)))

        @classmethod
        def grouped_tokens(cls, members, x, where):
            first = grouped.linear([m.experts[0] for m in members], x)
            second = grouped.linear([m.experts[1] for m in members], x)
            return TokenOutput(first + torch.tanh(second), x.new_ones(x.shape[:2]))

    torch.manual_seed(0)
    members = [type(f"E{i}", (Experts,), {"name": f"e{i}"})(8) for i in range(3)]
    stack = ModuleStack(members, "routed", top_k=1, hidden_size=8).train()
    stack.grouped = True
    held = StackedParameters([stack], decayed={id(p) for p in stack.parameters()})
    try:
        assert all(len(s.params) == 3 for b in held.buckets for s in b.stacked)  # one index each
        logits = torch.full((1, 6, 3), -5.0)
        logits[0, :3, 0] = 5.0
        logits[0, 3:, 1] = 5.0  # the third member: no token
        stack._routed(torch.randn(1, 6, 8), None, None, logits).hidden.sum().backward()
        idle = [p.detach().clone() for p in members[2].parameters()]
        held.step(lr=1e-2, weight_decay=0.1, betas=(0.9, 0.999), eps=1e-8)
        assert all(torch.equal(p, q) for p, q in zip(members[2].parameters(), idle, strict=True))
        state = held.member_state()
        assert not any(id(p) in state for p in members[2].parameters())
        assert all(id(p) in state for p in members[0].parameters())
    finally:
        held.release()


def test_when_parameters_are_held_stacked():
    model = grouped_model("routed")
    assert stacked_of(model) is not None
    set_grouped(model, False)  # every module alone (the CPU's default): nothing to hold
    assert stacked_of(model) is None
    model = grouped_model("routed")
    for change in ({"compile": True}, {"optimizer_in_backward": True}, {"optimizer_state": "bf16"}):
        assert (
            for_eager_training(model, SETTINGS.model_copy(update=change), torch.device("cpu"), False) is None
        )
    assert for_eager_training(model, SETTINGS, torch.device("cpu"), distributed=True) is None
    assert stack_modules(grouped_model("sequential"), torch.device("cpu"), set()) is None
    frozen = grouped_model("routed")
    for p in frozen.stacks.parameters():
        p.requires_grad_(False)
    assert stacked_of(frozen) is None


def test_dharma_train_holds_grouped_parameters_stacked_and_resumes_either_way(tmp_path, monkeypatch):
    """`dharma train` where the stacks group (a GPU; here forced): the members' parameters held
    stacked, the losses and checkpoints of a run without, a checkpoint that resumes without, and
    members that own their storage again afterwards."""
    from test_train_compile import QUIET, losses
    from trainkit import weights, write_manifest

    from dharma_kernel.stack import ModuleStack
    from dharma_kernel.train import session
    from dharma_kernel.train.run import TrainOptions, train

    monkeypatch.setattr(ModuleStack, "groups_on", lambda self, device: True)
    real, made = session.for_eager_training, []
    monkeypatch.setattr(session, "for_eager_training", lambda *a: made.append(real(*a)) or made[-1])

    def manifest(folder, **settings):
        path = write_manifest(
            folder,
            dropout=0.0,
            train={
                "max_steps": 4,
                "keep_last": 4,
                "save_every": 1,
                "schedule": "constant",
                "warmup_fraction": 0.0,
                **settings,
            },
        )
        text = path.read_text().replace(
            'include = ["dharma", "vedanta"]', 'include = ["dharma", "ahimsa", "seva", "vedanta", "nyaya"]'
        )
        path.write_text(text)
        return path

    train(manifest(tmp_path / "stacked"), TrainOptions(), QUIET)
    held = made[-1]
    monkeypatch.setattr(session, "for_eager_training", lambda *a: None)
    train(manifest(tmp_path / "plain"), TrainOptions(), QUIET)
    stacked, plain = tmp_path / "stacked" / "run", tmp_path / "plain" / "run"
    assert held is not None and {h.name for b in held.buckets for h in b.stacked} >= {"weight", "bias"}
    first, second = held.buckets[0].stacked[0].params[:2]
    assert first.untyped_storage().data_ptr() != second.untyped_storage().data_ptr()  # released
    for step, loss in losses(plain).items():
        assert losses(stacked)[step] == pytest.approx(loss, rel=1e-4)
    saved = [weights(root / "checkpoints" / "step-00000002") for root in (plain, stacked)]
    assert sorted(saved[1]) == sorted(saved[0])
    for name, value in saved[0].items():
        torch.testing.assert_close(saved[1][name], value, rtol=0, atol=3e-4, msg=name)  # 0.1 of a step
    # each run's step-2 checkpoint resumes the other way, and takes the run's own steps 3 and 4
    for source, stacking in ((stacked, False), (plain, True)):
        copy = shutil.copytree(source.parent, tmp_path / f"resumed-{stacking}", symlinks=True)
        (copy / "run" / "latest").unlink()
        (copy / "run" / "latest").symlink_to("checkpoints/step-00000002")
        monkeypatch.setattr(session, "for_eager_training", real if stacking else lambda *a: None)
        train(copy / "m.toml", TrainOptions(resume=True, max_steps=4), QUIET)
        for step in (3, 4):
            assert losses(copy / "run")[step] == pytest.approx(losses(source)[step], rel=1e-4)


def test_a_group_with_a_frozen_member_is_not_held_and_its_idle_members_stay():
    """Freezing one module (a ref) leaves its group as it was: not held, not run with its idle
    members, so none of them gets a zero gradient and a step that torch's AdamW would not take."""
    model = grouped_start()
    frozen = "paths.dharma"
    freeze_groups(model, [frozen])
    model, reference, twin, optimizer, stacked = pair(model)
    held = [n for n, p in twin.named_parameters() if stacked.holds(p)]
    plain_paths = ("dharma", "moksha", "bhakti", "ahimsa", "seva")  # the frozen module's group
    assert not any(f".paths__{path}." in n for n in held for path in plain_paths)
    assert any(".consciousness__" in n for n in held)  # the other groups are held
    train_steps(model, reference, batches(3))
    train_steps(twin, optimizer, batches(3))
    state, stacked_state = reference.state_dict()["state"], optimizer.state_dict()["state"]
    assert sorted(stacked_state) == sorted(state)
    for i in state:
        assert float(stacked_state[i]["step"]) == float(state[i]["step"])
    assert_near_weights(twin, model)


def test_attention_groups_held_otherwise_attend_apart_and_idle_members_stay(monkeypatch):
    """One multi-view path frozen leaves its group not held while the darshanas are: their attention
    is not computed in one call (which would read every weight stacked afresh and none held, so
    every held row, idle members' too, would take its gradient and step); the steps are torch's."""
    from dharma_kernel.catalogue import standard_refs
    from dharma_kernel.stack import ModuleStack

    refs = standard_refs()
    favoured = [refs.index(r) for r in ("paths.jnana", "paths.yoga", "darshanas.vedanta", "darshanas.yoga")]

    def evidence(self, hits, attention_mask, cache, starts):
        logits = torch.full_like(hits, -10.0)
        logits[..., favoured] = 10.0
        return logits + 0.0 * hits

    monkeypatch.setattr(ModuleStack, "_evidence", evidence)
    calls, computed = [], grouped._attention
    monkeypatch.setattr(grouped, "_attention", lambda b, *a: calls.append(len(b)) or computed(b, *a))
    model = all_modules("routed", top_k=4).train()
    set_grouped(model, True)
    freeze_groups(model, ["paths.jnana"])
    model, reference, twin, optimizer, stacked = pair(model)
    train_steps(model, reference, batches(2))
    calls.clear()
    train_steps(twin, optimizer, batches(2))
    assert 6 in calls and 4 in calls and 10 not in calls  # the two attention groups apart
    state, stacked_state = reference.state_dict()["state"], optimizer.state_dict()["state"]
    assert sorted(stacked_state) == sorted(state)
    for i in state:
        assert float(stacked_state[i]["step"]) == float(state[i]["step"])
    assert_near_weights(twin, model)


def test_a_copy_of_a_held_model_computes_with_its_own_parameters():
    """copy.deepcopy while held (an EMA, a snapshot): the copy finds nothing held and stacks its own
    parameters, so loading other weights into it changes what it computes."""
    model = grouped_model("routed")
    stacked = stacked_of(model)
    copied = copy.deepcopy(model)
    fresh = grouped_model("routed")
    with torch.no_grad():
        for p in fresh.stacks.parameters():
            p.mul_(0.5)
    copied.load_state_dict(fresh.state_dict())
    ids = torch.randint(1, 97, BATCH, generator=torch.Generator().manual_seed(0))
    copied.eval(), fresh.eval()  # no dropout
    torch.testing.assert_close(copied(input_ids=ids).logits, fresh(input_ids=ids).logits)
    stacked.release()


@pytest.mark.parametrize(
    ("chunk", "dtype"),
    [(stacked_module.CHUNK, torch.float32), (7, torch.float32), (stacked_module.CHUNK, torch.bfloat16)],
)
def test_the_masked_step_is_torchs_adamw_on_each_parameter(chunk, dtype, monkeypatch):
    """The step alone, fed the same random gradients as torch's AdamW on the parameters (some modules
    idle at each step): the same weights and step counts, in one chunk or in chunks of 7 elements
    (rows larger than a chunk), in float32 and bfloat16."""
    monkeypatch.setattr(stacked_module, "CHUNK", chunk)
    model = grouped_start().to(dtype)
    twin = copy.deepcopy(model)
    held = stack_modules(twin, torch.device("cpu"), {id(p) for p in twin.parameters() if p.ndim >= 2})
    names = {id(p): n for n, p in twin.named_parameters()}
    reference = dict(model.named_parameters())
    rows = [(s, i) for b in held.buckets for s in b.stacked for i in range(len(s.params))]
    bucket_of = {id(s): b for b in held.buckets for s in b.stacked}
    torch_params = [reference[names[id(s.params[i])]] for s, i in rows]
    decayed = [p for p in torch_params if p.ndim >= 2]
    plain = [p for p in torch_params if p.ndim < 2]
    torch_adamw = torch.optim.AdamW(
        [{"params": decayed, "weight_decay": 0.1}, {"params": plain, "weight_decay": 0.0}],
        lr=1e-3,
        foreach=False,
    )
    generator = torch.Generator().manual_seed(0)
    modules = list({id(m): m for s, _ in rows for m in s.modules}.values())
    for _ in range(4):
        ran = {
            id(m)
            for m, keep in zip(modules, torch.rand(len(modules), generator=generator) < 0.6, strict=True)
            if keep
        }
        held.zero_grad()
        for p in torch_params:
            p.grad = None
        for s, i in rows:
            if id(s.modules[i]) in ran:
                grad = torch.randn(s.params[i].shape, generator=generator).to(dtype)
                s.member(bucket_of[id(s)].holder.grad, i).copy_(grad)  # its row, as held
                reference[names[id(s.params[i])]].grad = grad.clone()
        held._modules_ran([m for m in modules if id(m) in ran])
        held._read.update(id(s.leaf) for s, _ in rows)
        torch_adamw.step()
        held.step(1e-3, 0.1, (0.9, 0.999), 1e-8)
    # float32: to rounding (the bias corrections are computed in float32, torch's in float64);
    # bfloat16: to a few units in the last place (moments in bfloat16 too), 5% of a step near 0; a row
    # stepped when it should not be, or not stepped, also shows in its step count
    rtol, atol = (0.0, 1e-7) if dtype == torch.float32 else (2**-5, 5e-5)
    for s, i in rows:
        p = reference[names[id(s.params[i])]]
        torch.testing.assert_close(s.params[i].float(), p.float(), rtol=rtol, atol=atol)
        steps = float(torch_adamw.state[p]["step"]) if p in torch_adamw.state else 0.0
        assert float(bucket_of[id(s)].steps[s.rows[i]]) == steps
    held.release()


def test_a_module_alone_in_its_run_keeps_its_losses_and_metrics():
    """Held, a module alone in its run computes as a group of one: the losses and metrics its
    grouped computation reports are kept, as they are when it runs alone."""
    from dharma_kernel.families import ConsciousnessModule
    from dharma_kernel.grouped import plan_runs
    from dharma_kernel.protocol import TokenOutput

    class Aux(ConsciousnessModule):
        def forward_tokens(self, x, hidden, ctx):
            out = super().forward_tokens(x, hidden, ctx)
            return TokenOutput(
                out.delta, out.score, {"aux": out.score.mean()}, {"rate": out.score.mean().detach()}
            )

        @classmethod
        def grouped_tokens(cls, members, x, where):
            out = ConsciousnessModule.grouped_tokens.__func__(cls, members, x, where)
            return TokenOutput(
                out.delta, out.score, {"aux": out.score.mean()}, {"rate": out.score.mean().detach()}
            )

    ids = torch.randint(1, 97, BATCH, generator=torch.Generator().manual_seed(3))
    for composition in ("routed", "parallel"):
        model = grouped_model(composition)
        for stack in model.stacks.values():
            name = next(n for n in stack.members if "consciousness" in n)
            alone = Aux(stack.members[name].hidden_size, stack.members[name].config)
            alone.load_state_dict(stack.members[name].state_dict())
            stack.members[name] = alone  # another class: a run of its own
            stack._runs = {g: plan_runs(list(stack.members.values()), g) for g in (True, False)}
            stack._ranked_on.clear()

        def losses(model=model):
            torch.manual_seed(0)
            out = model(input_ids=ids, labels=ids)
            return {k: float(v.detach()) for k, v in out.losses.items() if "aux" in k}, float(
                out.loss.detach()
            )

        (aux, loss) = losses()
        held = stacked_of(model)
        held_aux, held_loss = losses()
        assert aux and sorted(held_aux) == sorted(aux)
        assert held_aux == pytest.approx(aux) and held_loss == pytest.approx(loss)
        held.release()


def test_a_held_model_on_the_per_module_path_computes_as_before():
    """Held, then switched to running every module alone (``grouped = False``): the reference path,
    the same logits as a model not held, to float rounding (held, a linear layer's weight is a
    transposed view, which the product reads in another order); after release, exactly."""
    ids = torch.randint(1, 97, BATCH, generator=torch.Generator().manual_seed(0))
    model = grouped_model("routed").eval()
    set_grouped(model, False)
    expected = model(input_ids=ids).logits
    set_grouped(model, True)
    held = stacked_of(model)
    set_grouped(model, False)
    torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-6)
    held.release()
    assert all(p.is_contiguous() for p in model.parameters())
    torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=0, atol=0)


def test_holding_twice_is_refused():
    model = grouped_model("routed")
    held = stacked_of(model)
    with pytest.raises(ValueError, match="release"):
        stacked_of(model)
    held.release()
    stacked_of(model).release()  # released, it can be held again


def test_stepping_in_chunks_takes_the_same_steps(monkeypatch):
    """AdamW steps a flat tensor a few rows at a time (bounded temporaries): the same result."""
    steps = batches(2)
    whole = grouped_model("routed", 1.25)
    model, reference, twin, optimizer, _ = pair(whole)
    train_steps(twin, optimizer, steps)
    monkeypatch.setattr(stacked_module, "CHUNK", 100)
    chunked = grouped_model("routed", 1.25)
    small = stacked_of(chunked)
    assert max(len(b.chunks) for b in small.buckets) > 10
    train_steps(chunked, build_optimizer(chunked, SETTINGS, 10, "cpu", stacked=small), steps)
    for (name, p), q in zip(twin.named_parameters(), chunked.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-7, msg=name)
