"""Concept evidence: the running maximum of a router's per-token logits within each document."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny import recorded_hits, tiny_model

from dharma_kernel.routing import PAD_LOGIT, concept_evidence, document_starts


def reference(hit: torch.Tensor, starts: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """A plain loop: the maximum over real tokens since the last document start."""
    out = torch.empty_like(hit)
    for b in range(hit.shape[0]):
        best = torch.full(hit.shape[2:], PAD_LOGIT)
        for t in range(hit.shape[1]):
            if starts[b, t]:
                best = torch.full(hit.shape[2:], PAD_LOGIT)
            if real[b, t]:
                best = torch.maximum(best, hit[b, t])
            out[b, t] = best
    return out


@pytest.mark.parametrize("pairwise", [False, True])
def test_evidence_is_the_running_maximum_within_each_document(pairwise):
    generator = torch.Generator().manual_seed(0)
    hit = torch.randn(3, 17, 5, generator=generator) * 3
    hit[0, 4, 2] = -0.0  # signed zeros and ties order as numbers do
    hit[0, 5, 2] = 0.0
    starts = torch.rand(3, 17, generator=generator) < 0.2
    real = torch.rand(3, 17, generator=generator) < 0.85
    evidence = concept_evidence(hit, starts, real, pairwise=pairwise)
    torch.testing.assert_close(evidence, reference(hit, starts, real), rtol=0, atol=0)


def test_evidence_continues_from_the_previous_position():
    """Cached generation: the evidence of a chunk, given the last evidence before it, is the whole's."""
    hit = torch.randn(2, 12, 4)
    starts = torch.zeros(2, 12, dtype=torch.bool)
    starts[0, 7] = True  # a document ends inside the second chunk
    starts[1, 3] = True
    real = torch.ones(2, 12, dtype=torch.bool)
    whole = concept_evidence(hit, starts, real)
    first = concept_evidence(hit[:, :6], starts[:, :6], real[:, :6])
    second = concept_evidence(hit[:, 6:], starts[:, 6:], real[:, 6:], previous=first[:, -1])
    torch.testing.assert_close(torch.cat([first, second], 1), whole, rtol=0, atol=0)


def test_gradient_reaches_the_token_where_the_maximum_was_taken():
    hit = torch.tensor([[[0.0], [2.0], [1.0], [5.0], [-1.0]]], requires_grad=True)
    starts = torch.tensor([[False, False, False, True, False]])
    evidence = concept_evidence(hit, starts, torch.ones(1, 5, dtype=torch.bool))
    assert evidence[0, :, 0].tolist() == [0.0, 2.0, 2.0, 5.0, 5.0]
    evidence.sum().backward()
    assert hit.grad[0, :, 0].tolist() == [1.0, 2.0, 0.0, 2.0, 0.0]


def test_documents_start_at_end_of_text_tokens():
    ids = torch.tensor([[5, 0, 7, 9, 0]])
    assert document_starts(ids, 0).tolist() == [[False, True, False, False, True]]
    assert document_starts(ids, [0, 9]).tolist() == [[False, True, False, True, True]]
    assert document_starts(ids, None) is None and document_starts(None, 0) is None


def test_a_routed_model_forgets_a_concept_at_the_end_of_the_document():
    """In a packed row, the tokens after end-of-text take the evidence of their own document only."""
    model = tiny_model("routed", top_k=1, at_layers=(0, 1)).eval()
    eos = model.config.text_config.eos_token_id
    row = torch.cat([torch.randint(1, 97, (1, 9)), torch.tensor([[eos]]), torch.randint(1, 97, (1, 7))], 1)
    with torch.no_grad(), recorded_hits(model) as logits:
        scores = model(row).module_scores
    scores = torch.stack([scores[ref] for ref in model.module_refs], -1)

    def running(x: torch.Tensor) -> torch.Tensor:
        return torch.cummax(x, 1).values

    reset = torch.stack([torch.cat([running(x[:, :9]), running(x[:, 9:])], 1) for x in logits])
    torch.testing.assert_close(scores, torch.sigmoid(reset).mean(0))
    carried = torch.stack([running(x) for x in logits])
    assert not torch.allclose(scores, torch.sigmoid(carried).mean(0))


def test_routing_loss_trains_the_hits_where_a_concept_begins():
    """The hit term: 1 at the token where a label turns on, 0 where the label is 0, and no say at the
    later tokens of the concept (the evidence term covers those)."""
    from dharma_kernel.losses import routing_loss

    labels = torch.tensor([[[0.0], [0.0], [1.0], [1.0], [-100.0], [1.0]]])  # EOS at 4, a tagged doc after
    real = torch.ones(1, 6, dtype=torch.bool)
    hits = torch.zeros(1, 6, 1, requires_grad=True)
    evidence = torch.zeros(1, 6, 1)
    routing_loss(evidence, hits, labels, real).backward()
    grad = hits.grad[0, :, 0]
    assert grad[0] > 0 and grad[1] > 0  # pushed down: no concept yet
    assert grad[2] < 0 and grad[5] < 0  # pushed up: the concept begins (after EOS, at once)
    assert grad[3] == 0 and grad[4] == 0  # later tokens of the concept, and unknown ones


def test_routing_loss_is_the_mean_over_modules_and_classes_that_have_tokens():
    from dharma_kernel.losses import routing_loss

    generator = torch.Generator().manual_seed(0)
    evidence, hits = torch.randn(2, 5, 3, generator=generator), torch.randn(2, 5, 3, generator=generator)
    labels = torch.zeros(2, 5, 3)
    labels[0, 2:, 0] = 1  # module 0 has both classes; 1 only negatives; 2 nothing known
    labels[..., 2] = -100
    real = torch.ones(2, 5, dtype=torch.bool)

    def mean_bce(logits, target, where):
        return F.binary_cross_entropy_with_logits(logits[where], target[where])

    known = labels != -100
    positive, negative = known & (labels == 1), known & (labels == 0)
    before = F.pad(labels[:, :-1], (0, 0, 1, 0), value=-100)
    onset = (labels == 1) & (before != 1)
    ones, zeros = torch.ones_like(labels), torch.zeros_like(labels)
    evidence_term = torch.stack(
        [mean_bce(evidence[..., 0], ones[..., 0], positive[..., 0])]
        + [mean_bce(evidence[..., m], zeros[..., m], negative[..., m]) for m in (0, 1)]
    ).mean()
    onsets = known & ((labels == 0) | onset)
    hit_term = torch.stack(
        [mean_bce(hits[..., 0], ones[..., 0], (onsets & onset)[..., 0])]
        + [mean_bce(hits[..., m], zeros[..., m], (onsets & ~onset)[..., m]) for m in (0, 1)]
    ).mean()
    expected = (evidence_term + hit_term) / 2
    torch.testing.assert_close(routing_loss(evidence, hits, labels, real), expected)


def test_the_balance_loss_is_one_when_routing_is_uniform_and_counts_real_tokens_only():
    from dharma_kernel.stack import _balance_loss

    modules, top_k = 4, 2
    uniform = torch.full((2, 6, modules), 1 / modules)
    picked = torch.zeros(2, 6, modules, dtype=torch.bool)
    for t in range(6):  # each module picked equally often: pairs (0, 1), (2, 3), ...
        picked[:, t, (2 * t) % modules] = picked[:, t, (2 * t + 1) % modules] = True
    real = torch.ones(2, 6, dtype=torch.bool)
    assert float(_balance_loss(uniform, picked, real, top_k)) == pytest.approx(1.0)
    # collapsed on module 0 at the real tokens; padding (the last two positions) counts for nothing
    generator = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(2, 6, modules, generator=generator), -1)
    real[:, 4:] = False
    collapsed = torch.zeros_like(picked)
    collapsed[..., 0] = collapsed[..., 1] = True
    collapsed[:, 4:] = picked[:, 4:]  # chosen at padding too: the stack masks choices by real
    loss = _balance_loss(probs, collapsed & real[..., None], real, top_k)  # as the stack passes them
    kept = probs[:, :4].reshape(-1, modules)
    fraction = torch.tensor([0.5, 0.5, 0.0, 0.0])
    assert float(loss) == pytest.approx(modules * float((fraction * kept.mean(0)).sum()))


def test_the_routers_read_of_the_backbone_scales_only_its_gradient():
    from dharma_kernel.stack import _scale_gradient

    x = torch.randn(3, 4, requires_grad=True)
    y = _scale_gradient(x, 0.25)
    assert torch.equal(y, x)
    (y * torch.arange(12.0).view(3, 4)).sum().backward()
    assert torch.equal(x.grad, 0.25 * torch.arange(12.0).view(3, 4))
    assert _scale_gradient(x, 1.0) is x and not _scale_gradient(x, 0.0).requires_grad
    # torch.func and forward-mode AD take the plain expression: the same gradient, the scaled tangent
    weights = torch.arange(12.0).view(3, 4)
    scaled = torch.func.grad(lambda x: (_scale_gradient(x, 0.25) * weights).sum())(x.detach())
    assert torch.equal(scaled, 0.25 * weights)
    _, tangent = torch.func.jvp(lambda x: _scale_gradient(x, 0.25), (x.detach(),), (torch.ones(3, 4),))
    assert torch.equal(tangent, torch.full((3, 4), 0.25))
