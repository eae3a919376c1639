"""Plugin discovery against fake installed distributions written into a temporary site directory."""

from __future__ import annotations

import sys

import pytest
import torch
from fakedists import install

from dharma_kernel import registry
from dharma_kernel.errors import DharmaError
from dharma_kernel.protocol import ModuleContext
from dharma_kernel.registry import PluginBroken, PluginInfo
from dharma_kernel.version import MODULE_API

MAJOR, MINOR = (int(part) for part in MODULE_API.split("."))

MODULE = """
import torch

from dharma_kernel.protocol import DharmaModule, ModuleOutput


class Plugin(DharmaModule):
    family = {family!r}
    name = {name!r}
    module_api = {api!r}

    def forward(self, hidden, ctx):
        return ModuleOutput(hidden, torch.zeros(hidden.shape[:2]))
"""

HEAD = """
from dharma_kernel.protocol import HeadModule, HeadOutput


class Gloss(HeadModule):
    name = "gloss"
    module_api = "1.0"

    def forward(self, hidden, attention_mask, **labels):
        return HeadOutput(hidden.mean(-1))
"""


def module_plugin(site, ref, *, api="1.0", class_api=None, declared=None, source=None, value=None, dist=None):
    """A module plugin ``ref`` in distribution ``dharma-fake-<family>-<name>``, module ``dharma_fake_*``."""
    family, _, name = ref.rpartition(".")
    module = f"dharma_fake_{family}_{name}".replace(".", "_")
    declared_family, _, declared_name = (declared or ref).rpartition(".")
    if source is None:
        source = MODULE.format(family=declared_family, name=declared_name, api=class_api or api)
    entries = {"dharma.modules": {ref: value or f"{module}:Plugin"}}
    if api is not None:
        entries["dharma.api"] = {ref: api}
    install(site, dist or f"dharma-fake-{family}-{name}", entries, {module: source})


def head_plugin(site):
    entries = {"dharma.heads": {"gloss": "dharma_fake_gloss:Gloss"}, "dharma.api": {"gloss": "1.0"}}
    install(site, "dharma-fake-gloss", entries, {"dharma_fake_gloss": HEAD})


@pytest.fixture
def site(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.clear_cache()
    yield tmp_path
    registry.clear_cache()
    for name in [name for name in sys.modules if name.startswith("dharma_fake_")]:
        del sys.modules[name]


def fakes(kind=None):
    """The discovered plugins that come from this test's fake distributions."""
    return [info for info in registry.discover(kind) if (info.distribution or "").startswith("dharma-fake-")]


def test_discover_reads_metadata_without_importing(site):
    module_plugin(site, "darshanas.tarka")
    head_plugin(site)

    assert fakes() == [
        PluginInfo("module", "darshanas.tarka", "darshanas", "tarka", "dharma_fake_darshanas_tarka:Plugin",
                   "dharma-fake-darshanas-tarka", "0.1", "1.0", None),
        PluginInfo("head", "gloss", None, "gloss", "dharma_fake_gloss:Gloss",
                   "dharma-fake-gloss", "0.1", "1.0", None),
    ]  # fmt: skip
    assert [info.ref for info in fakes("head")] == ["gloss"]
    everything = registry.discover()
    assert [info.ref for info in everything] == sorted(info.ref for info in everything)
    assert not [name for name in sys.modules if name.startswith("dharma_fake_")]


def test_resolve_accepts_full_ref_and_unambiguous_short_name(site):
    module_plugin(site, "darshanas.tarka")
    head_plugin(site)

    assert registry.resolve("tarka").ref == "darshanas.tarka"
    assert registry.resolve("darshanas.tarka").distribution == "dharma-fake-darshanas-tarka"
    assert registry.resolve("gloss", "head").distribution == "dharma-fake-gloss"


def test_ambiguous_short_name_lists_every_full_ref(site):
    module_plugin(site, "paths.yoga")
    module_plugin(site, "darshanas.yoga")

    with pytest.raises(DharmaError) as caught:
        registry.resolve("yoga")
    assert "'yoga' is ambiguous: it names darshanas.yoga and paths.yoga" in str(caught.value)
    assert registry.resolve("paths.yoga").ref == "paths.yoga"


def test_unknown_ref_suggests_closest_and_names_distribution(site):
    module_plugin(site, "darshanas.tarka")
    head_plugin(site)

    with pytest.raises(DharmaError) as caught:
        registry.resolve("darshanas.tarkka")
    assert str(caught.value) == (
        "no module plugin 'darshanas.tarkka' is installed; did you mean 'darshanas.tarka'?\n"
        "if 'darshanas.tarkka' is a plugin you have not installed: pip install dharma-plugin-tarkka"
    )
    with pytest.raises(DharmaError, match="did you mean 'darshanas.tarka'"):
        registry.resolve("tarkaa")
    with pytest.raises(DharmaError, match=r"no module plugin 'gloss' .*\('gloss' is a head plugin\)"):
        registry.resolve("gloss")
    with pytest.raises(DharmaError, match="pip install dharma-head-summary"):
        registry.resolve("summary", "head")


@pytest.mark.parametrize(
    ("ref", "kind", "distribution"),
    [
        ("darshanas.vedanta", "module", "dharma-plugin-vedanta"),
        ("darshanas.yoga", "module", "dharma-plugin-yoga-darshana"),
        ("paths.yoga", "module", "dharma-plugin-yoga"),
        ("crisis.career", "module", "dharma-plugin-career"),
        ("vedanta", "module", "dharma-plugin-vedanta"),
        ("qa", "head", "dharma-head-qa"),
        ("classification", "head", "dharma-head-classification"),
    ],
)
def test_distribution_for(ref, kind, distribution):
    assert registry.distribution_for(ref, kind) == distribution


def test_load_imports_once_and_returns_a_working_class(site):
    module_plugin(site, "darshanas.tarka")
    head_plugin(site)
    info = registry.resolve("tarka")

    cls = registry.load(info)
    out = cls(8)(torch.randn(2, 3, 8), ModuleContext())
    assert out.hidden.shape == (2, 3, 8) and out.score.shape == (2, 3)
    assert registry.load(registry.resolve("darshanas.tarka")) is cls
    assert registry.check(info) is None
    head = registry.load(registry.resolve("gloss", "head"))
    assert head(8)(torch.ones(2, 3, 8), None).logits.shape == (2, 3)


def test_import_failure_is_broken_and_isolated(site):
    module_plugin(site, "paths.tantra", source="raise RuntimeError('tantra needs a GPU\\nsecond line')\n")
    module_plugin(site, "darshanas.tarka")
    info = registry.resolve("tantra")

    with pytest.raises(PluginBroken) as caught:
        registry.load(info)
    assert caught.value.exit_code == 2
    assert str(caught.value) == (
        "module plugin 'paths.tantra' from dharma-fake-paths-tantra is broken: "
        "importing dharma_fake_paths_tantra raised RuntimeError: tantra needs a GPU\n"
        "reinstall or upgrade it: pip install --upgrade --force-reinstall dharma-fake-paths-tantra"
    )
    reason = "importing dharma_fake_paths_tantra raised RuntimeError: tantra needs a GPU"
    assert registry.check(info) == reason
    assert registry.check(registry.resolve("tarka")) is None


@pytest.mark.parametrize(
    ("plugin", "reason", "hint"),
    [
        (
            {"value": "dharma_fake_darshanas_tarka:Missing"},
            "dharma_fake_darshanas_tarka has no attribute 'Missing'",
            "pip install --upgrade --force-reinstall dharma-fake-darshanas-tarka",
        ),
        (
            {"source": "class Plugin:\n    family, name, module_api = 'darshanas', 'tarka', '1.0'\n"},
            "dharma_fake_darshanas_tarka:Plugin is not a DharmaModule subclass",
            "pip install --upgrade --force-reinstall dharma-fake-darshanas-tarka",
        ),
        (
            {"class_api": f"{MAJOR + 1}.0"},
            f"class written for MODULE_API {MAJOR + 1}.0, this kernel speaks {MODULE_API}",
            "upgrade the kernel: pip install --upgrade dharma-kernel",
        ),
        (
            {"class_api": f"{MAJOR - 1}.9"},
            f"class written for MODULE_API {MAJOR - 1}.9, this kernel speaks {MODULE_API}",
            "upgrade the plugin: pip install --upgrade dharma-fake-darshanas-tarka",
        ),
        (
            {"declared": "darshanas.nyaya"},
            "dharma_fake_darshanas_tarka:Plugin declares itself 'darshanas.nyaya', not 'darshanas.tarka'",
            "pip install --upgrade --force-reinstall dharma-fake-darshanas-tarka",
        ),
    ],
    ids=["attribute-missing", "not-a-module", "newer-major", "older-major", "other-name"],
)
def test_unusable_class_is_broken(site, plugin, reason, hint):
    module_plugin(site, "darshanas.tarka", **plugin)
    info = registry.resolve("tarka")

    with pytest.raises(PluginBroken) as caught:
        registry.load(info)
    assert caught.value.reason == reason
    assert str(caught.value).endswith(hint)
    assert registry.check(info) == reason


def test_newer_minor_loads_with_a_warning(site):
    newer = f"{MAJOR}.{MINOR + 1}"
    module_plugin(site, "darshanas.tarka", api=newer)
    info = registry.resolve("tarka")

    assert info.problem is None
    with pytest.warns(registry.PluginWarning, match=f"written for MODULE_API {newer}, newer than"):
        cls = registry.load(info)
    assert cls.module_api == newer


@pytest.mark.parametrize(
    ("modules", "api", "problem"),
    [
        (
            {"tarka": "dharma_fake_bad:Plugin"},
            {"tarka": "1.0"},
            "ref 'tarka' is not '<family>.<name>' in lower case",
        ),
        (
            {"darshana.tarka": "dharma_fake_bad:Plugin"},
            {"darshana.tarka": "1.0"},
            "unknown family 'darshana'; did you mean 'darshanas'?",
        ),
        (
            {"darshanas.tarka": "dharma_fake_bad:Plugin"},
            {},
            "no MODULE_API declared (entry point 'darshanas.tarka' in group dharma.api)",
        ),
        (
            {"darshanas.tarka": "dharma_fake_bad:Plugin"},
            {"darshanas.tarka": f"{MAJOR + 1}.0"},
            f"written for MODULE_API {MAJOR + 1}.0, this kernel speaks {MODULE_API}",
        ),
        (
            {"darshanas.tarka": "dharma_fake_bad"},
            {"darshanas.tarka": "1.0"},
            "entry point value 'dharma_fake_bad' is not 'package.module:Class'",
        ),
    ],
    ids=["ref-shape", "unknown-family", "no-api", "other-major-api", "value-shape"],
)
def test_metadata_problem_is_listed_and_never_imported(site, modules, api, problem):
    entries = {"dharma.modules": modules, "dharma.api": api} if api else {"dharma.modules": modules}
    install(site, "dharma-fake-bad", entries, {"dharma_fake_bad": "raise AssertionError('imported')\n"})

    [info] = fakes()
    assert info.problem == problem
    with pytest.raises(PluginBroken, match="dharma-fake-bad is broken"):
        registry.load(info)
    assert registry.check(info) == problem
    assert "dharma_fake_bad" not in sys.modules


def test_ref_from_two_distributions_is_broken_in_both(site):
    module_plugin(site, "darshanas.tarka", dist="dharma-fake-one")
    entries = {"dharma.modules": {"darshanas.tarka": "dharma_fake_darshanas_tarka:Plugin"},
               "dharma.api": {"darshanas.tarka": "1.0"}}  # fmt: skip
    install(site, "dharma-fake-two", entries)

    problems = {info.distribution: info.problem for info in fakes()}
    assert problems == {
        "dharma-fake-one": "'darshanas.tarka' is also provided by dharma-fake-two; uninstall one",
        "dharma-fake-two": "'darshanas.tarka' is also provided by dharma-fake-one; uninstall one",
    }
    with pytest.raises(PluginBroken, match="also provided by"):
        registry.load(registry.resolve("tarka"))


def test_unknown_kind_is_an_error():
    with pytest.raises(DharmaError, match="unknown plugin kind 'heads'; kinds are: module, head"):
        registry.discover("heads")
