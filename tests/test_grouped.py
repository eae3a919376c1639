"""Grouped execution (dharma_kernel.grouped) equals running every module alone, the reference."""

from __future__ import annotations

import pytest
import torch

from dharma_kernel import attention_pool, group_runs, grouped, registry
from dharma_kernel import stack as stack_module
from dharma_kernel.assemble import build_model
from dharma_kernel.catalogue import standard_refs
from dharma_kernel.export import dense_routing
from dharma_kernel.group_runs import run_groups
from dharma_kernel.grouped import group_key, layout, sharing_normalization
from dharma_kernel.protocol import ModuleContext
from dharma_kernel.stack import COMPOSITIONS
from dharma_kernel.testing import perturb, tiny_backbone_config

DARSHANAS = [r for r in standard_refs() if r.startswith("darshanas.")][:4]


def module_class(ref: str) -> type:
    return registry.load(registry.resolve(ref, "module"))


def all_modules(composition: str, top_k: int = 2):
    """A 2-layer tiny GPT-2 with every standard module (tiny preset) at both layers, weights random."""
    modules = [
        {"ref": ref, "config": module_class(ref).make_config("tiny").model_dump()} for ref in standard_refs()
    ]
    layout = {"at_layers": [0, 1], "composition": composition, "top_k": top_k, "modules": modules}
    model = build_model(tiny_backbone_config(), layout, seed=0)
    perturb(model.stacks, seed=1, std=0.1)
    return model


def set_grouped(model, on: bool) -> None:
    for stack in model.stacks.values():
        stack.grouped = on


def loss_and_grads(model, ids, mask):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # the same dropout both times
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), out.loss.detach(), grads


@pytest.fixture
def batch():
    ids = torch.randint(1, 97, (3, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    mask[2, 9:] = 0  # right padding
    return ids, mask


@pytest.mark.parametrize("composition", COMPOSITIONS)
def test_grouped_logits_losses_and_gradients_equal_per_module(composition, batch):
    model = all_modules(composition).train()
    ids, mask = batch
    set_grouped(model, False)
    reference = loss_and_grads(model, ids, mask)
    set_grouped(model, True)
    grouped = loss_and_grads(model, ids, mask)
    torch.testing.assert_close(grouped[0], reference[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grouped[1], reference[1], rtol=1e-5, atol=1e-6)
    # the same parameters got a gradient (routed: modules no token chose get none either way)
    assert grouped[2].keys() == reference[2].keys()
    for name, grad in reference[2].items():
        torch.testing.assert_close(grouped[2][name], grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("off", [[], ["paths.seva", "darshanas.vedanta", "paths.yoga"]])
def test_routed_grouped_equals_dense_routing_with_every_module(off, batch):
    """The routed stack's one gather and one scatter, which both paths share, against dense routing
    (every module at every token, weighted; the exporter's form, separate code), modules of a group
    switched off too."""
    model = all_modules("routed").eval()
    ids, mask = batch
    with torch.no_grad(), model.switched_off(off):
        routed = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        with dense_routing(model):
            dense = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(routed, dense, rtol=1e-5, atol=1e-5)
    if off:  # the switched-off modules did run before: switching them off changes the output
        with torch.no_grad():
            full = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        assert not torch.allclose(routed, full, atol=1e-4)


def test_groups_form_for_every_standard_family():
    keys = {
        ref: group_key(module_class(ref)(32, module_class(ref).make_config("tiny")))
        for ref in standard_refs()
    }
    assert all(key is not None for key in keys.values())
    # all consciousness modules share one group; paths without memory one, karma (memory) another,
    # the multi-view paths a third; the darshanas (attention) one
    assert len({keys[r] for r in standard_refs() if r.startswith("consciousness.")}) == 1
    assert len({keys[r] for r in standard_refs() if r.startswith("darshanas.")}) == 1
    assert keys["paths.ahimsa"] == keys["paths.seva"] != keys["paths.karma"]
    assert keys["paths.jnana"] == keys["paths.yoga"] not in (keys["paths.ahimsa"], keys["paths.karma"])


def test_a_plugin_that_overrides_its_computation_runs_alone():
    base = module_class("paths.ahimsa")

    class Custom(base):
        def delta(self, x, hidden, ctx):
            return 2 * super().delta(x, hidden, ctx)

    assert group_key(Custom(32, base.make_config("tiny"))) is None
    assert group_key(base(32, base.make_config("tiny"))) is not None


@pytest.mark.parametrize("family", ["paths", "consciousness", "life", "energy", "crisis"])
def test_each_family_grouped_equals_forward_tokens_with_uneven_and_empty_shares(family):
    """Three modules of one family (memory paths too: karma's class with other weights)."""
    refs = (
        ["paths.karma"] * 3 if family == "paths" else [r for r in standard_refs() if r.startswith(family)][:3]
    )
    members = [
        perturb(module_class(r)(32, module_class(r).make_config("tiny")), seed=i, std=0.3)
        for i, r in enumerate(refs)
    ]
    hidden = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0))
    rows = [torch.arange(7), torch.arange(2, 3), torch.arange(0)]
    together = run_groups(members, hidden, ModuleContext(), rows)
    assert sorted(together) == [0, 1]  # a module without tokens is not run
    for index in (0, 1):
        x = hidden.flatten(0, 1)[rows[index]]
        expected = members[index].forward_tokens(x, hidden, ModuleContext(rows=rows[index]))
        torch.testing.assert_close(together[index].delta, expected.delta, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(together[index].score, expected.score, rtol=1e-5, atol=1e-6)


def attending(refs):
    """Modules of ``refs`` (tiny, weights perturbed), hidden states ``[3, 5, 32]``, a cached past of 4
    positions, and a mask with left padding into the current positions and a hole in the past."""
    members = [
        perturb(module_class(r)(32, module_class(r).make_config("tiny")), seed=i, std=0.3)
        for i, r in enumerate(refs)
    ]
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 5, 32, generator=generator)
    past = torch.randn(3, 4, 32, generator=generator)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, :6] = 0  # left padding, into the current positions
    mask[2, 2:4] = 0  # a hole in the cached past
    return members, hidden, past, mask


@pytest.mark.parametrize("every_key", [True, False])
@pytest.mark.parametrize("refs", [["paths.jnana", "paths.yoga", "paths.jnana"], DARSHANAS])
def test_attention_groups_equal_forward_tokens_with_padding_and_a_cached_past(refs, every_key, monkeypatch):
    """Attention families: per (module, sequence) uneven queries, padding keys, and cached positions;
    queries over every sequence's keys, and (past grouped.EVERY_KEY_LIMIT) regrouped by sequence."""
    monkeypatch.setattr(grouped, "EVERY_KEY_LIMIT", grouped.EVERY_KEY_LIMIT if every_key else 0)
    members, hidden, past, mask = attending(refs)
    rows = [
        torch.tensor([0, 3, 4, 7, 12, 14]),
        torch.tensor([9]),
        torch.tensor([5, 6, 8, 10]),
        torch.arange(0),
    ]
    rows = rows[: len(members)]
    together = run_groups(members, hidden, ModuleContext(mask, past), rows)
    assert sorted(together) == [i for i, r in enumerate(rows) if len(r)]
    for index in together:
        x = hidden.flatten(0, 1)[rows[index]]
        expected = members[index].forward_tokens(x, hidden, ModuleContext(mask, past, rows=rows[index]))
        torch.testing.assert_close(together[index].delta, expected.delta, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(together[index].score, expected.score, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("composition", COMPOSITIONS)
def test_cached_generation_and_beam_search_equal_per_module(composition, batch):
    model = all_modules(composition).eval()
    ids, mask = batch[0][:2, :8], batch[1][:2, :8]
    outputs = {}
    for on in (False, True):
        set_grouped(model, on)
        with torch.no_grad():
            greedy = model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=5,
                do_sample=False,
                pad_token_id=0,
                output_logits=True,
                return_dict_in_generate=True,
                use_cache=True,
            )
            beams = model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=4,
                num_beams=3,
                do_sample=False,
                pad_token_id=0,
                use_cache=True,
            )
        outputs[on] = greedy.sequences, torch.stack(greedy.logits), beams
    assert torch.equal(outputs[True][0], outputs[False][0])
    torch.testing.assert_close(outputs[True][1], outputs[False][1], rtol=1e-5, atol=1e-5)
    assert torch.equal(outputs[True][2], outputs[False][2])


def test_layout_pads_each_group_to_its_largest_share():
    """A routed stack's slots: a group's members padded to its largest share, a lone module's tokens
    as they are, a held run (``whole``) with all its members, those without tokens on empty slots."""
    runs = [[0, 1, 2], [3], [4, 5], [6, 7]]
    counts = [2, 0, 3, 1, 0, 0, 0, 2]
    position = torch.repeat_interleave(torch.arange(8), torch.tensor(counts))  # each pair's place
    placed = layout(runs, counts, position, whole={6})
    assert placed.slot.tolist() == [0, 1, 3, 4, 5, 6, 9, 10]
    segments = [(s.members, s.slots, s.pairs, s.most) for s in placed.segments]
    assert segments == [
        ([0, 2], slice(0, 6), slice(0, 5), 3),
        ([3], slice(6, 7), slice(5, 6), 0),
        ([6, 7], slice(7, 11), slice(6, 8), 2),
    ]
    assert placed.size == 11


def test_a_group_normalizes_each_input_once(monkeypatch):
    """Blocks of one group that normalize the same tokens share the normalization (their own scale
    and shift each); a tensor changed in place is normalized again."""
    calls = []
    layer_norm = torch.nn.functional.layer_norm
    monkeypatch.setattr(grouped.F, "layer_norm", lambda *a, **k: calls.append(1) or layer_norm(*a, **k))
    first, second = (
        perturb(torch.nn.ModuleList(torch.nn.LayerNorm(8) for _ in range(2)), seed=s) for s in (1, 2)
    )
    x = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(0))
    alone = [grouped.layer_norm(list(norms), x) for norms in (first, second)]
    calls.clear()
    with sharing_normalization():
        shared = [grouped.layer_norm(list(norms), x) for norms in (first, second)]
        assert len(calls) == 1
        x.add_(1.0)
        changed = grouped.layer_norm(list(first), x)
    assert len(calls) == 2
    for a, b in zip(alone, shared, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(changed, grouped.layer_norm(list(first), x), rtol=0, atol=0)


@pytest.mark.parametrize("composition", ["routed", "parallel"])
def test_grouped_forward_under_inference_mode_equals_per_module(composition):
    """What `dharma serve` runs (torch.inference_mode: tensors without a version counter)."""
    model = all_modules(composition).eval()
    ids = torch.randint(1, 97, (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        set_grouped(model, False)
        expected = model(input_ids=ids).logits
        set_grouped(model, True)
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_an_empty_slot_adds_nothing_even_where_its_module_is_not_finite():
    """A group's empty slots (past a member's tokens) compute on zeros; a module that is not finite
    there (x / |x|) must not reach the hidden states or the input's gradient."""
    from torch import nn

    from dharma_kernel.protocol import DharmaModule, TokenOutput
    from dharma_kernel.stack import ModuleStack

    class Direction(DharmaModule):
        family, name = "thirdparty", "direction"

        def __init__(self, hidden_size, config=None):
            super().__init__(hidden_size, config)
            self.proj = nn.Linear(hidden_size, hidden_size)

        def forward_tokens(self, x, hidden, ctx):
            return TokenOutput(self.proj(x / x.norm(dim=-1, keepdim=True)), x.new_ones(len(x)))

        @classmethod
        def grouped_tokens(cls, members, x, where):
            unit = x / x.norm(dim=-1, keepdim=True)
            return TokenOutput(grouped.linear([m.proj for m in members], unit), x.new_ones(x.shape[:2]))

    torch.manual_seed(0)
    members = [type(f"D{i}", (Direction,), {"name": f"d{i}"})(8) for i in range(2)]
    stack = ModuleStack(members, "routed", top_k=1, hidden_size=8).train()
    stack.grouped = True
    hidden = torch.randn(1, 6, 8, requires_grad=True)
    logits = torch.full((1, 6, 2), -5.0)
    logits[0, :4, 0] = 5.0  # 4 tokens to the first, 2 to the second: 2 empty slots
    logits[0, 4:, 1] = 5.0
    out = stack._routed(hidden, None, None, logits)
    out.hidden.sum().backward()
    assert torch.isfinite(out.hidden).all() and torch.isfinite(hidden.grad).all()


@pytest.mark.parametrize("every_key", [True, False])
def test_routed_attention_groups_equal_per_module_through_the_stack(every_key, monkeypatch):
    """Routed at a batch where the attention families form groups, each run computing with all its
    members (as when held stacked: the idle ones on empty slots), in both attention forms: the
    same logits, loss and gradients as module by module, and none where no token ran."""
    monkeypatch.setattr(grouped, "EVERY_KEY_LIMIT", grouped.EVERY_KEY_LIMIT if every_key else 0)
    calls, attention = [], grouped.attention
    monkeypatch.setattr(grouped, "attention", lambda *a: calls.append(len(a[0])) or attention(*a))
    ids = torch.randint(1, 97, (4, 24), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # left padding
    mask[3, 20:] = 0  # right padding
    model = all_modules("routed").train()
    set_grouped(model, False)
    logits, loss, grads = loss_and_grads(model, ids, mask)
    set_grouped(model, True)
    for stack in model.stacks.values():
        stack.held_runs = frozenset(run[0] for run in stack._runs[True])
    got_logits, got_loss, got_grads = loss_and_grads(model, ids, mask)
    assert calls and max(calls) > 2  # attention ran as groups (multi-view: every view of every member)
    torch.testing.assert_close(got_logits, logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_loss, loss, rtol=1e-5, atol=1e-6)
    for name, grad in got_grads.items():
        expected = grads.get(name, torch.zeros_like(grad))
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("factor", [None, 1e6])
def test_a_stacks_attention_groups_read_one_table_of_the_keys_each_token_sees(factor, batch, monkeypatch):
    """Up to EVERY_KEY_LIMIT keys, the attention groups of a routed stack (darshanas, multi-view
    paths) read their masks as rows of one table of every token's, built once per stack forward;
    past it, fixed capacity builds the rows of their one call (exact routing regroups by sequence):
    the same logits, loss and gradients either way."""
    calls, keys_seen = [], grouped.keys_seen
    monkeypatch.setattr(grouped, "keys_seen", lambda rows, *a: calls.append(len(rows)) or keys_seen(rows, *a))
    attending, attention = [], grouped.attention
    monkeypatch.setattr(grouped, "attention", lambda *a: attending.append(len(a[0])) or attention(*a))
    model = every_module_everywhere(factor)
    ids, mask = batch
    logits, loss, grads = loss_and_grads(model, ids, mask)
    assert len(attending) == 2 * len(model.stacks)  # both attention families at every stack
    assert calls == [ids.numel()] * len(model.stacks)  # one table per stack, a row per token
    calls.clear()
    monkeypatch.setattr(grouped, "EVERY_KEY_LIMIT", 0)
    got_logits, got_loss, got_grads = loss_and_grads(model, ids, mask)
    assert len(calls) == (len(model.stacks) if factor else 0)  # the attention groups' one call its own
    torch.testing.assert_close(got_logits, logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_loss, loss, rtol=1e-5, atol=1e-6)
    assert got_grads.keys() == grads.keys()
    for name, grad in got_grads.items():
        torch.testing.assert_close(grad, grads[name], rtol=1e-5, atol=1e-6, msg=name)


def every_module_everywhere(factor=None):
    """``all_modules`` routed, every module chosen at every token (so every group computes), with
    fixed capacity ``factor`` if given; grouped."""
    model = all_modules("routed", top_k=len(standard_refs())).train()
    set_grouped(model, True)
    for stack in model.stacks.values():
        stack.capacity_factor = factor
    return model


@pytest.mark.parametrize("factor", [None, 1e6])
def test_a_stacks_attention_groups_normalize_the_sequence_once(factor, batch, monkeypatch):
    """The darshanas and the multi-view paths of a routed stack both normalize the whole sequence
    for their keys: once per stack forward, each group applying its own scale and shift."""
    shapes, layer_norm = [], torch.nn.functional.layer_norm
    record = lambda x, *a, **k: shapes.append(x.shape) or layer_norm(x, *a, **k)  # noqa: E731
    monkeypatch.setattr(grouped.F, "layer_norm", record)
    model = every_module_everywhere(factor)
    ids, mask = batch
    model(input_ids=ids, attention_mask=mask, labels=ids)
    width = tiny_backbone_config()["n_embd"]
    assert shapes.count(torch.Size([ids.numel(), width])) == len(model.stacks)


@pytest.mark.parametrize("every_key", [True, False])
@pytest.mark.parametrize("factor", [None, 1e6])
def test_a_stacks_attention_groups_attend_in_one_call(factor, every_key, batch, monkeypatch):
    """The darshanas and the multi-view paths (every view) of a routed stack attend in one call,
    their slots padded to the most either has: the same logits, loss and gradients as each group
    attending on its own, in both attention forms, exact routing and fixed capacity."""
    monkeypatch.setattr(grouped, "EVERY_KEY_LIMIT", grouped.EVERY_KEY_LIMIT if every_key else 0)
    calls, computed = [], grouped._attention
    monkeypatch.setattr(grouped, "_attention", lambda b, *a: calls.append(len(b)) or computed(b, *a))
    model = every_module_everywhere(factor)
    ids, mask = batch
    together = loss_and_grads(model, ids, mask)
    views = len(model.stacks["0"].members["paths__jnana"].attention.views)
    darshanas = sum(ref.startswith("darshanas.") for ref in standard_refs())
    assert calls == [darshanas + 2 * views] * len(model.stacks)  # one call: 6 darshanas, 2 x 2 views
    calls.clear()
    monkeypatch.setattr(stack_module, "attend_together", lambda *a: None)
    apart = loss_and_grads(model, ids, mask)
    assert sorted(calls) == sorted([darshanas, 2 * views] * len(model.stacks))
    torch.testing.assert_close(together[0], apart[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(together[1], apart[1], rtol=1e-5, atol=1e-6)
    assert together[2].keys() == apart[2].keys()
    for name, grad in together[2].items():
        torch.testing.assert_close(grad, apart[2][name], rtol=1e-5, atol=1e-6, msg=name)


def test_attention_groups_of_other_shapes_attend_apart(batch, monkeypatch):
    """Multi-view paths whose attention is another shape than the darshanas' each attend on their own."""
    calls, computed = [], grouped._attention
    monkeypatch.setattr(grouped, "_attention", lambda b, *a: calls.append(len(b)) or computed(b, *a))
    modules = []
    for ref in standard_refs():
        config = module_class(ref).make_config("tiny").model_dump()
        if ref in ("paths.jnana", "paths.yoga"):
            config["head_dim"] = 8
        modules.append({"ref": ref, "config": config})
    layout = {"at_layers": [0], "composition": "routed", "top_k": len(modules), "modules": modules}
    model = build_model(tiny_backbone_config(), layout, seed=0).train()
    set_grouped(model, True)
    ids, mask = batch
    model(input_ids=ids, attention_mask=mask, labels=ids)
    assert sorted(calls) == [4, 6]


def test_a_parallel_stacks_attention_groups_attend_in_one_call(batch, monkeypatch):
    """Parallel (every module at every token, so every group as many slots): one call per stack, the
    same logits, loss and gradients as each attention group attending on its own."""
    calls, computed = [], grouped._attention
    monkeypatch.setattr(grouped, "_attention", lambda b, *a: calls.append(len(b)) or computed(b, *a))
    model = all_modules("parallel").train()
    set_grouped(model, True)
    ids, mask = batch
    together = loss_and_grads(model, ids, mask)
    assert calls == [10] * len(model.stacks)  # 6 darshanas, 2 multi-view paths x 2 views
    calls.clear()
    monkeypatch.setattr(group_runs, "attend_together", lambda *a: None)
    apart = loss_and_grads(model, ids, mask)
    assert sorted(calls) == sorted([4, 6] * len(model.stacks))
    torch.testing.assert_close(together[0], apart[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(together[1], apart[1], rtol=1e-5, atol=1e-6)
    assert together[2].keys() == apart[2].keys()
    for name, grad in together[2].items():
        torch.testing.assert_close(grad, apart[2][name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    "shares",
    [
        [[0, 3, 4, 12], [9], [1, 5, 6, 14], [2, 8]],  # empty slots in both groups
        [[0, 3, 4, 12], [2, 9, 10, 13], [1, 5, 6, 14], [2, 8]],  # in the darshanas' only
        [[0, 3, 4, 12], [9], [1, 5, 6, 14], [2, 8, 10, 11], [0, 4, 7, 13]],  # in the paths' only
    ],
)
@pytest.mark.parametrize("every_key", [True, False])
def test_attention_groups_of_two_families_attend_in_one_call_with_uneven_shares(
    every_key, shares, monkeypatch
):
    """run_groups (parallel's grouped path) with two multi-view paths and two darshanas whose largest
    shares are equal and whose other shares are not: one call, each module's output equal to its
    forward_tokens, with padding and a cached past."""
    monkeypatch.setattr(grouped, "EVERY_KEY_LIMIT", grouped.EVERY_KEY_LIMIT if every_key else 0)
    calls, computed = [], grouped._attention
    monkeypatch.setattr(grouped, "_attention", lambda b, *a: calls.append(len(b)) or computed(b, *a))
    members, hidden, past, mask = attending(["paths.jnana", "paths.yoga", *DARSHANAS[: len(shares) - 2]])
    rows = [torch.tensor(share) for share in shares]
    together = run_groups(members, hidden, ModuleContext(mask, past), rows)
    assert calls == [2 * 2 + len(shares) - 2]  # both views of both paths, and the darshanas
    for index, module_rows in enumerate(rows):
        x = hidden.flatten(0, 1)[module_rows]
        expected = members[index].forward_tokens(x, hidden, ModuleContext(mask, past, rows=module_rows))
        torch.testing.assert_close(together[index].delta, expected.delta, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(together[index].score, expected.score, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("held", [False, True])
@pytest.mark.parametrize("every_key", [True, False])
def test_attention_groups_with_other_largest_shares_attend_in_one_call(every_key, held, batch, monkeypatch):
    """Routed so that the darshanas compute at every token and the multi-view paths at half of
    them: one call, each group padded to the darshanas' share and its part cut back; the same
    logits, loss and gradients as each group attending on its own (``held``: every run computing
    with all its members, as when its weights are held stacked)."""
    from dharma_kernel.stack import ModuleStack

    monkeypatch.setattr(grouped, "EVERY_KEY_LIMIT", grouped.EVERY_KEY_LIMIT if every_key else 0)
    refs = standard_refs()
    always = [refs.index(r) for r in ("darshanas.vedanta", "darshanas.yoga")]
    views = [refs.index(r) for r in ("paths.jnana", "paths.yoga")]
    plain = [refs.index(r) for r in ("paths.dharma", "paths.seva")]

    def evidence(self, hits, attention_mask, cache, starts):
        logits = torch.full_like(hits, -10.0)
        logits[..., always] = 10.0
        logits[:, ::2, views] = 9.0  # every other position the multi-view paths, else two others
        logits[:, 1::2, plain] = 9.0
        return logits + 0.0 * hits

    monkeypatch.setattr(ModuleStack, "_evidence", evidence)
    calls, computed = [], grouped._attention
    monkeypatch.setattr(
        grouped, "_attention", lambda b, *a: calls.append(tuple(a[0].shape[:2])) or computed(b, *a)
    )
    model = all_modules("routed", top_k=4).train()
    set_grouped(model, True)
    if held:
        for stack in model.stacks.values():
            stack.held_runs = frozenset(run[0] for run in stack._runs[True])
    ids, mask = batch
    together = loss_and_grads(model, ids, mask)
    copies = len(model.stacks["0"].members["paths__jnana"].attention.views)
    darshanas = sum(ref.startswith("darshanas.") for ref in refs) if held else 2
    most = int(mask.sum())  # the darshanas' share: every real token (the multi-view paths': half)
    assert calls == [(2 * copies + darshanas, most)] * len(model.stacks)
    calls.clear()
    monkeypatch.setattr(stack_module, "attend_together", lambda *a: None)
    apart = loss_and_grads(model, ids, mask)
    assert len(calls) == 2 * len(model.stacks)
    torch.testing.assert_close(together[0], apart[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(together[1], apart[1], rtol=1e-5, atol=1e-6)
    assert together[2].keys() == apart[2].keys()
    for name, grad in together[2].items():
        torch.testing.assert_close(grad, apart[2][name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("composition", ["routed", "parallel"])
def test_a_stacks_attention_pool_goes_with_its_forward(composition, batch, monkeypatch):
    """The pool refers back to the stack's context (its requests' inputs do): dropped after the
    groups run, it is freed when the forward returns, not whenever the cycle collector runs (with
    its outputs, the size of a stack's attention)."""
    import gc
    import weakref

    pools, init = [], attention_pool.AttentionPool.__init__

    def record(self, *args):
        init(self, *args)
        pools.append(weakref.ref(self))

    monkeypatch.setattr(attention_pool.AttentionPool, "__init__", record)
    model = all_modules(composition, top_k=len(standard_refs())).eval()
    set_grouped(model, True)
    ids, mask = batch
    gc.collect()
    gc.disable()
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        assert len(pools) == len(model.stacks)
        assert all(pool() is None for pool in pools)
    finally:
        gc.enable()
