"""The presets' parameter budgets, counted on the meta device (no weights allocated)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dharma_kernel.assemble import build_on_meta, plan
from dharma_kernel.catalogue import FAMILIES
from dharma_kernel.freeze import parameter_table
from dharma_kernel.manifest import load_manifest, parse_manifest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
DISTILGPT2 = 81_912_576


def counts(manifest) -> dict[str, int]:
    return {row.group: row.parameters for row in parameter_table(build_on_meta(plan(manifest)))}


def all_37(preset: str, at_layers: str) -> dict[str, int]:
    text = f'[backbone]\nconfig = {{}}\n[modules]\npreset = "{preset}"\ninclude = ["all"]\n'
    text += f'at_layers = {at_layers}\ncomposition = "routed"\n'
    return counts(parse_manifest(text))


def test_lite_adds_at_most_five_percent_to_distilgpt2():
    table = all_37("lite", "[2, 4]")
    assert table["backbone"] == DISTILGPT2
    added = table["total"] - table["backbone"]
    assert added / DISTILGPT2 <= 0.05  # measured: 4,027,472 = 4.92% (routers' token tables included)
    assert set(FAMILIES) <= set(table)


def test_seed_example_has_the_original_scale():
    table = counts(load_manifest(EXAMPLES / "seed-262m.toml"))
    modules = table["total"] - table["backbone"]
    assert modules == pytest.approx(174e6, rel=0.03)  # measured: 176,287,714
    assert table["total"] == pytest.approx(262e6, rel=0.03)  # measured: 258,200,290


def test_presets_grow():
    tiny, lite, seed = (all_37(p, "[3]")["total"] - DISTILGPT2 for p in ("tiny", "lite", "seed"))
    assert tiny < lite < seed
