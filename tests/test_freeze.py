"""Freeze groups and the parameter table."""

from __future__ import annotations

import pytest
from tiny import tiny_model

from dharma_kernel.errors import DharmaError
from dharma_kernel.freeze import freeze_groups, parameter_table


def counts(model) -> dict[str, tuple[int, int]]:
    return {row.group: (row.parameters, row.trainable) for row in parameter_table(model)}


def test_table_counts_each_group_once():
    model = tiny_model("routed")
    table = counts(model)
    assert set(table) == {"backbone", "paths", "darshanas", "routers", "total"}
    parts = sum(table[g][0] for g in ("backbone", "paths", "darshanas", "routers"))
    assert parts == table["total"][0]
    # tied input/output embeddings count once
    unique = {id(p): p.numel() for p in model.parameters()}
    assert table["total"][0] == sum(unique.values())
    # two layers: a router (hidden 32, two modules) and a token table (97 ids x 16, read out to 2)
    assert table["routers"][0] == 2 * (32 * 2 + 97 * 16 + 16 * 2)


@pytest.mark.parametrize(
    ("groups", "frozen"),
    [
        (["backbone"], {"backbone"}),
        (["spiritual"], {"paths", "darshanas", "routers"}),
        (["paths"], {"paths"}),
        (["darshanas.vedanta"], {"darshanas"}),
        (["vedanta", "backbone"], {"darshanas", "backbone"}),
    ],
)
def test_groups(groups, frozen):
    model = tiny_model("routed")
    freeze_groups(model, groups)
    for group, (total, trainable) in counts(model).items():
        if group == "total":
            continue
        assert trainable == (0 if group in frozen else total), group


def test_freezing_everything_is_an_error():
    model = tiny_model("sequential")
    with pytest.raises(DharmaError, match="leaves no trainable parameters"):
        freeze_groups(model, ["backbone", "spiritual"])


def test_unknown_group_suggests():
    model = tiny_model("sequential")
    with pytest.raises(
        DharmaError, match="freeze: 'spirtual' is not a group of this model; did you mean 'spiritual'"
    ):
        freeze_groups(model, ["spirtual"])
