"""From manifest to model: plugin selection, layer checks, overrides and the meta-device build."""

from __future__ import annotations

import pytest
import torch

from dharma_kernel.assemble import build, build_on_meta, plan, select_modules
from dharma_kernel.errors import DharmaError
from dharma_kernel.freeze import parameter_table
from dharma_kernel.manifest import parse_manifest

BACKBONE = 'config = { architecture = "gpt2", n_layer = 2, n_embd = 32, n_head = 2, vocab_size = 97 }'


def manifest(modules: str = "", extra: str = ""):
    text = f"""
[backbone]
{BACKBONE}

[modules]
preset = "tiny"
include = ["dharma", "vedanta"]
at_layers = [0, 1]
{modules}
{extra}
"""
    return parse_manifest(text, "m.toml")


def test_plan_resolves_short_refs_presets_and_overrides():
    p = plan(manifest(extra="[modules.override.vedanta]\nheads = 3\n"))
    layout = p.config.layout
    assert [m["ref"] for m in layout["modules"]] == ["paths.dharma", "darshanas.vedanta"]
    assert layout["modules"][0]["config"] == {"bottleneck": 8, "detectors": 2}  # the tiny preset
    assert layout["modules"][1]["config"] == {
        "heads": 3,
        "head_dim": 4,
        "kv_heads": 1,
        "feed_forward": 8,
        "summary": 4,
    }
    assert {e["distribution"] for e in p.config.lock} == {"dharma-plugin-dharma", "dharma-plugin-vedanta"}


def test_meta_build_matches_the_real_build():
    p = plan(manifest())
    meta = build_on_meta(p)
    assert all(t.is_meta for t in meta.parameters())
    real = build(p)
    assert [r.__dict__ for r in parameter_table(meta)] == [r.__dict__ for r in parameter_table(real)]


def test_unknown_module_suggests_the_closest():
    with pytest.raises(
        DharmaError,
        match="modules.include: 'vedantaa' is not a known module or family; did you mean 'vedanta'",
    ):
        select_modules(["vedantaa"], [])


def test_ambiguous_yoga_lists_both_refs():
    with pytest.raises(DharmaError, match="'yoga' is ambiguous: paths.yoga or darshanas.yoga"):
        select_modules(["yoga"], [])


def without(monkeypatch, *refs: str) -> None:
    """Hide installed plugins, as if their distributions had been uninstalled."""
    from dharma_kernel import registry

    real = registry.discover
    monkeypatch.setattr(registry, "discover", lambda kind=None: [p for p in real(kind) if p.ref not in refs])


def test_all_names_every_missing_standard_module(monkeypatch):
    # `all` must say what is missing, never assemble fewer modules than the 37.
    without(monkeypatch, "paths.karma", "darshanas.yoga")
    with pytest.raises(DharmaError) as err:
        select_modules(["all"], [])
    message = str(err.value)
    assert "needs 2 module(s) that are not installed" in message
    assert "paths.karma: pip install dharma-plugin-karma" in message
    assert "darshanas.yoga: pip install dharma-plugin-yoga-darshana" in message


def test_all_and_families_expand_in_catalogue_order():
    from dharma_kernel.catalogue import standard_refs

    assert select_modules(["all"], []) == standard_refs()
    assert select_modules(["crisis", "vedanta"], ["crisis.health"]) == [
        "crisis.career", "crisis.financial", "crisis.clarity", "crisis.leadership", "crisis.wellness",
        "darshanas.vedanta",
    ]  # fmt: skip


def test_exclude_drops_missing_modules(monkeypatch):
    without(monkeypatch, "paths.karma")
    assert "paths.karma" not in select_modules(["all"], ["karma"])


def test_at_layers_out_of_range():
    with pytest.raises(DharmaError, match="layer 5 is out of range; this backbone has layers 0 to 1"):
        plan(
            manifest().model_copy(
                update={"modules": manifest().modules.model_copy(update={"at_layers": [0, 5]})}
            )
        )


def test_top_k_larger_than_the_stack():
    with pytest.raises(DharmaError, match="modules.top_k: 3 is larger than the stack of 2 module"):
        plan(manifest('composition = "routed"\ntop_k = 3'))


def test_override_with_unknown_key_suggests():
    with pytest.raises(
        DharmaError, match=r"modules\.override\.darshanas\.vedanta\.head: unknown key; did you mean 'heads'"
    ):
        plan(manifest(extra="[modules.override.vedanta]\nhead = 3\n"))


def test_override_for_a_module_not_in_the_manifest():
    with pytest.raises(DharmaError, match="modules.override.karma: 'karma' is not a module in this manifest"):
        plan(manifest(extra="[modules.override.karma]\nbottleneck = 3\n"))


def test_unknown_backbone_config_key_suggests():
    text = '[backbone]\nconfig = { architecture = "gpt2", n_layers = 2 }\n'
    with pytest.raises(
        DharmaError, match="backbone.config.n_layers: unknown key for gpt2; did you mean 'n_layer'"
    ):
        plan(parse_manifest(text))


def test_fresh_gpt2_defaults_to_distilgpt2_shape():
    p = plan(parse_manifest("[backbone]\nconfig = {}\n"))
    text = p.config.text_config
    assert (text.n_layer, text.n_embd, text.n_head, text.vocab_size) == (6, 768, 12, 50257)
    total = next(r for r in parameter_table(build_on_meta(p)) if r.group == "total")
    assert total.parameters == 81_912_576  # DistilGPT2's parameter count, tied embeddings once


def test_pretrained_local_directory_relative_to_the_manifest(tmp_path):
    from dharma_kernel.assemble import build_model

    backbone = build_model(
        {"architecture": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 2, "vocab_size": 97}, {}
    ).backbone
    backbone.save_pretrained(tmp_path / "weights" / "tiny-gpt2")
    path = tmp_path / "m.toml"
    path.write_text(
        '[backbone]\npretrained = "weights/tiny-gpt2"\n[modules]\ninclude = ["dharma"]\nat_layers = [1]\n'
    )
    from dharma_kernel.manifest import load_manifest

    model = build(plan(load_manifest(path)))
    loaded = model.backbone.state_dict()
    for name, param in backbone.state_dict().items():
        name = name.replace("h.1.", "h.1.block.")  # layer 1 now runs inside its module slot
        assert torch.equal(loaded[name], param), name  # pretrained weights kept
