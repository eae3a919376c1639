"""DharmaModel: modules inside the backbone, compositions, masks, losses, generation."""

from __future__ import annotations

import pytest
import torch
from tiny import recorded_hits, tiny_model

from dharma_kernel.assemble import build_model
from dharma_kernel.errors import DharmaError
from dharma_kernel.losses import lm_loss
from dharma_kernel.testing import tiny_backbone_config

COMPOSITIONS = ["sequential", "parallel", "routed"]


def test_fresh_modules_leave_the_backbone_unchanged():
    # Output projections start at zero: assembling onto a backbone must not change its logits.
    model = tiny_model(trained=False)
    bare = build_model(tiny_backbone_config(), {}, seed=0).eval()
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, bare(ids).logits)


@pytest.mark.parametrize("composition", COMPOSITIONS)
def test_modules_shape_the_logits(composition):
    model = tiny_model(composition)
    bare = build_model(tiny_backbone_config(), {}, seed=0).eval()
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        out = model(ids)
    assert out.logits.shape == (2, 9, 97)
    assert not torch.allclose(out.logits, bare(ids).logits)
    assert set(out.module_scores) == {"paths.dharma", "darshanas.vedanta"}
    for score in out.module_scores.values():
        assert score.shape == (2, 9) and 0 <= score.min() and score.max() <= 1


@pytest.mark.parametrize("composition", COMPOSITIONS)
@pytest.mark.parametrize("top_k", [1, 2])
def test_cached_generation_equals_uncached(composition, top_k, prompt):
    model = tiny_model(composition, top_k)
    ids, mask = prompt
    kwargs = {
        "max_new_tokens": 10,
        "do_sample": False,
        "pad_token_id": 0,
        "attention_mask": mask,
        "output_logits": True,
        "return_dict_in_generate": True,
    }
    with torch.no_grad():
        cached = model.generate(ids, use_cache=True, **kwargs)
        uncached = model.generate(ids, use_cache=False, **kwargs)
    assert cached.sequences.shape == (2, 16)
    assert torch.equal(cached.sequences, uncached.sequences)
    # equal tokens could hide small module effects: the logits of every step agree too
    torch.testing.assert_close(torch.stack(cached.logits), torch.stack(uncached.logits), rtol=1e-4, atol=1e-5)


def test_beam_search_reorders_module_caches(prompt):
    model = tiny_model("sequential")
    ids, mask = prompt
    kwargs = {
        "max_new_tokens": 6,
        "num_beams": 3,
        "do_sample": False,
        "pad_token_id": 0,
        "attention_mask": mask,
    }
    with torch.no_grad():
        assert torch.equal(
            model.generate(ids, use_cache=True, **kwargs), model.generate(ids, use_cache=False, **kwargs)
        )


@pytest.mark.parametrize("composition", COMPOSITIONS)
def test_padding_never_changes_real_tokens(composition):
    model = tiny_model(composition, top_k=1)
    seq = torch.tensor([[11, 12, 13, 14, 15]])
    padded = torch.tensor([[0, 0, 11, 12, 13, 14, 15]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        alone = model(seq, position_ids=torch.arange(5)[None])
        batch = model(padded, attention_mask=mask, position_ids=torch.tensor([[0, 0, 0, 1, 2, 3, 4]]))
    torch.testing.assert_close(batch.logits[:, 2:], alone.logits, rtol=1e-4, atol=1e-5)


def test_routed_module_changes_only_the_tokens_routed_to_it():
    model = tiny_model("routed", top_k=1, at_layers=(1,))  # one stack, after the last block
    ids = torch.randint(1, 97, (2, 12))
    with torch.no_grad():
        before = model(ids, output_hidden_states=True)
    vedanta = before.module_active["darshanas.vedanta"]  # where the router sent tokens to it
    assert vedanta.any() and not vedanta.all()
    from dharma_kernel.testing import perturb

    perturb(model.module_at("darshanas.vedanta", 1), seed=9)
    with torch.no_grad():
        after = model(ids)
    changed = (after.logits - before.logits).abs().amax(-1) > 1e-6
    assert torch.equal(changed, vedanta)


def test_routed_scores_are_defined_at_every_token_and_are_the_router_evidence():
    model = tiny_model("routed", top_k=1, at_layers=(0, 1))
    ids = torch.randint(1, 97, (2, 12))
    with torch.no_grad():
        out = model(ids)
    refs = model.module_refs
    for ref in refs:
        score = out.module_scores[ref]
        assert bool((score > 0).all()) and bool((score < 1).all())  # also where the module did not run
    # the mean over the module's layers of sigmoid(router evidence)
    with torch.no_grad(), recorded_hits(model) as logits:
        model(ids)
    # no end-of-text among the ids: one document, so the evidence is the running maximum
    assert not torch.isin(ids, torch.tensor(model.config.text_config.eos_token_id)).any()
    expected = torch.sigmoid(torch.stack([torch.cummax(x, 1).values for x in logits])).mean(0)
    for index, ref in enumerate(refs):
        torch.testing.assert_close(out.module_scores[ref], expected[..., index], rtol=1e-5, atol=1e-6)


def test_switched_off_modules_add_nothing():
    model = tiny_model("routed", top_k=2, at_layers=(1,))
    model.eval()
    ids = torch.randint(1, 97, (2, 10))
    with torch.no_grad():
        full = model(ids).logits
        with model.switched_off(model.module_refs):
            bare = model(ids).logits
        with model.switched_off(["darshanas.vedanta"]):
            one_off = model(ids).logits
        again = model(ids).logits
    from dharma_kernel.testing import perturb

    for ref in model.module_refs:
        perturb(model.module_at(ref, 1), seed=3)
    with torch.no_grad(), model.switched_off(model.module_refs):
        torch.testing.assert_close(model(ids).logits, bare, rtol=0, atol=0)  # all off: no module counts
    assert not torch.allclose(full, bare)
    torch.testing.assert_close(again, full)  # switched back on when the block ends
    vedanta = model(ids).module_active["darshanas.vedanta"]
    changed = (one_off - full).abs().amax(-1) > 1e-6
    assert torch.equal(changed, vedanta)
    with pytest.raises(DharmaError, match="not in this model: paths.nothing"):
        with model.switched_off(["paths.nothing"]):
            pass


def test_hidden_states_include_the_modules():
    model = tiny_model("sequential", at_layers=(0,))
    ids = torch.randint(1, 97, (1, 5))
    with torch.no_grad():
        with_modules = model(ids, output_hidden_states=True).hidden_states
        for stack in model.stacks.values():
            stack.composition = "parallel"  # a different module output at layer 0 ...
        other = model(ids, output_hidden_states=True).hidden_states
    assert not torch.allclose(with_modules[1], other[1])  # ... shows in hidden_states[1]
    assert torch.equal(with_modules[0], other[0])


def test_static_cache_is_refused_with_a_message(prompt):
    from dharma_kernel.errors import DharmaError

    ids, mask = prompt
    with pytest.raises(DharmaError, match="dynamic KV cache only"):
        tiny_model().generate(
            ids, attention_mask=mask, max_new_tokens=2, cache_implementation="static", pad_token_id=0
        )


def test_loss_components_add_up():
    model = tiny_model("routed", top_k=1).train()
    ids = torch.randint(1, 97, (2, 8))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    concept = torch.tensor([[1.0, 0.0], [-100.0, 1.0]])  # [B, M] per sequence; -100 = unknown
    out = model(ids, attention_mask=mask, labels=ids, concept_labels=concept)
    routers = {"router_balance@0", "router_balance@1", "routing@0", "routing@1"}
    assert {"lm", "concept", *routers} == set(out.losses)
    expected = (
        out.losses["lm"]
        + 0.1 * out.losses["concept"]
        + 0.01 * (out.losses["router_balance@0"] + out.losses["router_balance@1"])
        + 1.0 * (out.losses["routing@0"] + out.losses["routing@1"])
    )
    torch.testing.assert_close(out.loss, expected)
    assert int(out.lm_tokens) == 5 + 7  # padding and the first token of each row never count
    out.loss.backward()
    # with top_k 1 on 14 tokens some module may not be chosen at all; those chosen all learn
    for name, param in model.stacks.named_parameters():
        assert param.grad is None or torch.isfinite(param.grad).all(), name
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.stacks["0"].router.parameters())


def test_routed_stack_mixes_what_each_chosen_module_gives_a_full_forward():
    """Modules compute only at their routed tokens, yet each token gets the router-weighted deltas a
    full (unrouted) forward of its chosen modules gives it; padding keeps the block's output."""
    from dharma_kernel.protocol import ModuleContext
    from dharma_kernel.routing import concept_evidence

    stack = tiny_model("routed", top_k=1).stacks["0"]
    hidden = torch.randn(3, 11, 32, generator=torch.Generator().manual_seed(4))
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, :4] = 0
    with torch.no_grad():
        routed = stack(hidden, mask).hidden
        evidence = concept_evidence(stack._hits(hidden, None), None, mask.bool())  # one document per row
        probs = torch.softmax(evidence, dim=-1)
        top_weight, top_index = probs.topk(1, dim=-1)
        weight = torch.zeros_like(probs).scatter(-1, top_index, top_weight / top_weight.sum(-1, keepdim=True))
        weight = weight * mask[..., None]
        expected = hidden.clone()
        for index, module in enumerate(stack.members.values()):
            full = module(hidden, ModuleContext(attention_mask=mask)).hidden
            expected += weight[..., index, None] * (full - hidden)
    assert 0 < int((top_index[..., 0] == 0).sum()) < 33  # both modules ran, on different tokens
    torch.testing.assert_close(routed, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"composition": "sequential"},
        # two modules, top 2: every token runs both; a forward override over a token-wise
        # family must still run under routing
        {"composition": "routed", "top_k": 2},
    ],
)
def test_module_losses_count_once_per_layer(monkeypatch, kwargs):
    from dharma_plugin_dharma import Dharma

    plain = Dharma.forward

    def with_aux(self, hidden, ctx):
        out = plain(self, hidden, ctx)
        out.losses["aux"] = torch.tensor(1.0)
        return out

    monkeypatch.setattr(Dharma, "forward", with_aux)
    model = tiny_model(**kwargs)
    ids = torch.randint(1, 97, (1, 6))
    out = model(ids, labels=ids)
    assert out.losses["paths.dharma/aux@0"] == 1.0 and out.losses["paths.dharma/aux@1"] == 1.0
    if kwargs["composition"] == "sequential":  # routed adds the router's balance loss too
        torch.testing.assert_close(out.loss, out.losses["lm"] + 2.0)


def test_lm_loss_ignores_padding():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    loss, count = lm_loss(logits, labels, mask)
    garbage = labels.clone()
    garbage[1, 3:] = 7
    assert torch.equal(loss, lm_loss(logits, garbage, mask)[0])
    assert int(count) == 4 + 2


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = torch.randint(1, 97, (2, 8))

    calls = {"block": 0, "module": 0}

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = tiny_model("sequential").train()
        if checkpointing:
            model.backbone.activation_checkpointing_enable({"use_reentrant": False})
            model.set_module_checkpointing(True)
        calls.update(block=0, module=0)
        # pre-hooks: checkpoint recomputation stops early, so a post-forward hook may never fire in it
        model.backbone.transformer.h[0].block.mlp.register_forward_pre_hook(
            lambda *_: calls.update(block=calls["block"] + 1)
        )
        model.module_at("darshanas.vedanta", 0).register_forward_pre_hook(
            lambda *_: calls.update(module=calls["module"] + 1)
        )
        model(ids, labels=ids).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    torch.manual_seed(0)
    plain = grads(False)
    assert calls == {"block": 1, "module": 1}
    torch.manual_seed(0)
    checkpointed = grads(True)
    assert calls == {"block": 2, "module": 2}  # both recomputed in backward: checkpointing is really on
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_llama_style_backbone():
    backbone = {
        "architecture": "llama",
        "num_hidden_layers": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 97,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    from tiny import tiny_layout

    from dharma_kernel.testing import perturb

    model = build_model(backbone, tiny_layout("parallel"), seed=0)
    perturb(model.stacks, seed=1, std=0.1)
    model.eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
        uncached = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, uncached)
    assert len(model.stacks) == 2


def test_a_loaded_model_computes_bit_for_bit_what_was_saved(tmp_path):
    # safetensors maps weights at whatever offset the header leaves; unaligned, kernels sum in another order
    from dharma_kernel.model import DharmaModel

    model = tiny_model("routed")
    model.save_pretrained(tmp_path)
    loaded = DharmaModel.from_pretrained(tmp_path).eval()
    assert all(p.data_ptr() % 64 == 0 for p in loaded.parameters())
    ids = torch.randint(1, 97, (3, 17), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[2, :6] = 0
    with torch.no_grad():
        assert torch.equal(loaded(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)


def _concept_loss_module_by_module(results, labels, mask):
    """The concept loss as the model computed it before one table held every module: per
    (layer, module) the mean cross-entropy over its counted labelled tokens, then the mean."""
    terms = []
    for result in results:
        for index, ref in enumerate(result.scores):
            column = labels[..., index]
            if column.dim() == 1:
                column = column[:, None].expand_as(result.scores[ref])
            keep = result.active[ref] & mask.bool() & (column != -100)
            if keep.any():
                prob = result.scores[ref].float()[keep].clamp(1e-6, 1 - 1e-6)
                target = column[keep].float()
                terms.append(-(target * prob.log() + (1 - target) * (1 - prob).log()).mean())
    return torch.stack(terms).mean()


@pytest.mark.parametrize("composition", COMPOSITIONS)
@pytest.mark.parametrize(("per_sequence", "unlabelled"), [(False, False), (False, True), (True, True)])
def test_concept_loss_of_all_modules_at_once_equals_module_by_module(composition, per_sequence, unlabelled):
    model = tiny_model(composition, top_k=1, at_layers=(0, 1)).train()
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 97, (3, 10), generator=generator)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[0, :4] = 0  # left padding
    shape = (3, 2) if per_sequence else (3, 10, 2)
    labels = torch.randint(0, 2, shape, generator=generator)
    labels[torch.rand(shape, generator=generator) < 0.3] = -100
    if unlabelled:
        labels[..., 1] = -100  # a module without a labelled token
    results = []
    hooks = [s.register_forward_hook(lambda _m, _i, out: results.append(out)) for s in model.stacks.values()]
    try:
        out = model(ids, attention_mask=mask, concept_labels=labels)
    finally:
        for hook in hooks:
            hook.remove()
    expected = _concept_loss_module_by_module(results, labels, mask)
    torch.testing.assert_close(out.losses["concept"], expected, rtol=1e-6, atol=1e-7)
    # and the gradient it sends back
    weights = list(model.stacks.parameters())
    got = torch.autograd.grad(out.losses["concept"], weights, retain_graph=True, allow_unused=True)
    want = torch.autograd.grad(expected, weights, allow_unused=True)
    assert sum(g is not None for g in got) > 10
    for weight, a, b in zip(weights, got, want, strict=True):  # None: zero
        zero = torch.zeros_like(weight)
        torch.testing.assert_close(zero if a is None else a, zero if b is None else b, rtol=1e-5, atol=1e-8)


def test_no_labelled_token_gives_no_concept_loss():
    model = tiny_model("routed", top_k=1).train()
    ids = torch.randint(1, 97, (2, 6))
    out = model(ids, concept_labels=torch.full((2, 6, 2), -100))
    assert "concept" not in out.losses
