"""Loss aggregation and the class-balanced routing loss (dharma_kernel.losses)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dharma_kernel.losses import IGNORE, concept_losses, routing_loss, total_loss


def test_total_loss_weights_each_component_by_its_kind():
    components = {
        "lm": torch.tensor(2.0),
        "concept": torch.tensor(0.5),
        "router_balance@1": torch.tensor(3.0),
        "router_balance@3": torch.tensor(1.0),
        "routing@1": torch.tensor(4.0),
        "paths.karma/extra@1": torch.tensor(0.25),
    }
    weights = {"lm": 1.0, "concept": 2.0, "router": 0.5, "routing": 0.1}
    expected = 2.0 + 2.0 * 0.5 + 0.5 * (3.0 + 1.0) + 0.1 * 4.0 + 0.25
    torch.testing.assert_close(total_loss(components, weights), torch.tensor(expected))
    # defaults: lm and concept 1, router balance 0.01, routing 1
    torch.testing.assert_close(total_loss(components, {}), torch.tensor(2.0 + 0.5 + 0.04 + 4.0 + 0.25))


def test_total_loss_sums_in_the_widest_dtype():
    """A plugin's bf16 losses are not added in bf16 (256 + 1 is 256 there)."""
    components = {
        "lm": torch.tensor(0.5),
        "a@0": torch.tensor(256.0, dtype=torch.bfloat16),
        "b@0": torch.tensor(1.0, dtype=torch.bfloat16),
    }
    total = total_loss(components, {})
    assert total.dtype == torch.float32
    assert total.item() == 257.5


def _reference_bce(logits, positive, keep):
    """Per module, the mean BCE over kept positives and over kept negatives; the mean of those that exist."""
    means = []
    for m in range(logits.shape[-1]):
        for cls in (positive[..., m], ~positive[..., m]):
            mask = keep[..., m] & cls
            if mask.any():
                target = positive[..., m][mask].float()
                means.append(F.binary_cross_entropy_with_logits(logits[..., m][mask], target))
    return torch.stack(means).mean()


def test_routing_loss_balances_classes_per_module():
    g = torch.Generator().manual_seed(0)
    evidence = torch.randn(2, 9, 4, generator=g) * 3
    hits = torch.randn(2, 9, 4, generator=g)
    labels = torch.randint(0, 2, (2, 9, 4), generator=g, dtype=torch.int8)
    labels[torch.rand(2, 9, 4, generator=g) < 0.2] = IGNORE
    labels[:, :, 3] = 0  # a module with no positive token: its negatives' mean only
    real = torch.rand(2, 9, generator=g) < 0.8
    keep = real[..., None] & (labels != IGNORE)
    positive = labels == 1
    before = F.pad(positive[:, :-1], (0, 0, 1, 0), value=False)
    onset = positive & ~before
    expected = (
        _reference_bce(evidence, positive, keep) + _reference_bce(hits, onset, keep & ((labels == 0) | onset))
    ) / 2
    torch.testing.assert_close(routing_loss(evidence, hits, labels, real), expected)
    per_sequence = labels[:, 0].clone()
    keep = real[..., None] & (per_sequence[:, None] != IGNORE)
    expected = _reference_bce(evidence, (per_sequence == 1)[:, None].expand_as(evidence), keep)
    torch.testing.assert_close(routing_loss(evidence, hits, per_sequence, real), expected)
    assert routing_loss(evidence, hits, torch.full_like(labels, IGNORE), real) is None


def test_concept_losses_are_the_mean_cross_entropy_where_each_module_counts():
    g = torch.Generator().manual_seed(1)
    score = torch.rand(2, 7, 3, generator=g)
    labels = torch.randint(0, 2, (2, 7, 3), generator=g, dtype=torch.int8)
    labels[0, :3, 1] = IGNORE
    counted = torch.rand(2, 7, 3, generator=g) < 0.7
    counted[..., 2] = False  # a module that ran nowhere: no loss, not present
    loss, has = concept_losses(score, labels, counted)
    keep = counted & (labels != IGNORE)
    for m in range(2):
        mask = keep[..., m]
        expected = F.binary_cross_entropy(score[..., m][mask], labels[..., m][mask].float())
        torch.testing.assert_close(loss[m], expected)
    assert has.tolist() == [True, True, False] and loss[2].item() == 0.0
