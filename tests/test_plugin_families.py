"""Families from plugins: a plugin that declares a new family (``stoics``) is listed, included,
frozen and conformance-checked by that name, as the six standard families are."""

from __future__ import annotations

import re
import sys

import pytest
from fakedists import install, run_dharma
from venvkit import (
    OFFLINE,
    ROOT,
    build_wheels,
    check,
    dharma,
    dharma_distributions,
    load_saved,
    make_venv,
    pip,
    plugin_rows,
    run,
    shared_deps,
    tiny_manifest,
)

from dharma_kernel import registry
from dharma_kernel.assemble import build_on_meta, plan, select_modules
from dharma_kernel.catalogue import FAMILIES, family_problem, standard_refs
from dharma_kernel.cli.new_plugin import plan_plugin
from dharma_kernel.errors import DharmaError
from dharma_kernel.freeze import freeze_groups, parameter_table
from dharma_kernel.manifest import parse_manifest
from dharma_kernel.testing import ModuleConformance

STOIC = """
from dharma_kernel.families import PathModule


class {cls}(PathModule):  # a standard family's architecture under a new family name
    family = "stoics"
    name = "{name}"
    module_api = "1.0"
    concepts = ("ऋत", "ṛta", "{name}", "cosmic order", "logos")
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Two modules of the new family ``stoics``, one of ``darshana`` (a misspelling), one of ``heads``."""
    site = tmp_path_factory.mktemp("site")
    for name in ("ritam", "apatheia"):
        cls, ref = name.title(), f"stoics.{name}"
        install(site, f"dharma-fake-{name}", {"dharma.modules": {ref: f"dharma_fake_{name}:{cls}"},
                                              "dharma.api": {ref: "1.0"}},
                {f"dharma_fake_{name}": STOIC.format(cls=cls, name=name)})  # fmt: skip
    for ref in ("darshana.tarka", "heads.gloss"):
        dist = f"dharma-fake-{ref.replace('.', '-')}"
        install(site, dist, {"dharma.modules": {ref: "dharma_fake_x:X"}, "dharma.api": {ref: "1.0"}})
    sys.path.insert(0, str(site))
    registry.clear_cache()
    yield site
    sys.path.remove(str(site))
    registry.clear_cache()
    for name in [name for name in sys.modules if name.startswith("dharma_fake_")]:
        del sys.modules[name]  # later tests check that discovery imports no plugin


def test_a_new_family_name_is_accepted_and_near_misses_and_reserved_words_are_not(site):
    infos = {info.ref: info for info in registry.discover("module")}
    assert infos["stoics.ritam"].problem is None
    assert registry.load(infos["stoics.ritam"]).family == "stoics"
    assert infos["darshana.tarka"].problem == "unknown family 'darshana'; did you mean 'darshanas'?"
    assert infos["heads.gloss"].problem.startswith("family 'heads' is a reserved word (all, backbone,")
    assert family_problem("yoga") == (
        "family 'yoga' is already a standard module's name (paths.yoga and darshanas.yoga)"
    )
    assert [family_problem(f) for f in (*FAMILIES, "stoics", "jains", "sufis", "lives")] == [None] * 10


def test_families_lists_the_standard_six_then_the_new_ones_with_their_modules(site):
    families = registry.families()
    assert list(families) == [*FAMILIES, "stoics"]  # the broken darshana and heads add none
    assert families["stoics"] == ["stoics.apatheia", "stoics.ritam"]
    assert families["darshanas"] == sorted(standard_refs("darshanas"))


def test_manifests_include_a_new_family_by_name_and_all_takes_it_in(site):
    assert select_modules(["stoics"], ["apatheia"]) == ["stoics.ritam"]
    # installed but broken plugins count too: building then says why they are broken
    third_party = ["darshana.tarka", "heads.gloss", "stoics.apatheia", "stoics.ritam"]
    assert select_modules(["all"], []) == [*standard_refs(), *third_party]
    with pytest.raises(DharmaError) as caught:
        select_modules(["stoic"], [])
    message = "modules.include: 'stoic' is not a known module or family; did you mean 'stoics'?"
    assert caught.value.message == message
    assert caught.value.hint == (
        f"families are: {', '.join(FAMILIES)}; from installed plugins: stoics; "
        "`dharma plugins` lists the installed modules"
    )


def test_freezing_takes_a_new_family_as_one_group(site):
    text = """
[backbone]
config = { architecture = "gpt2", n_layer = 2, n_embd = 32, n_head = 2, vocab_size = 97 }
[modules]
preset = "tiny"
include = ["stoics", "vedanta"]
at_layers = [0, 1]
"""
    model = build_on_meta(plan(parse_manifest(text, "m.toml")))
    assert model.module_refs == ["stoics.apatheia", "stoics.ritam", "darshanas.vedanta"]
    freeze_groups(model, ["stoics"])
    table = {row.group: (row.parameters, row.trainable) for row in parameter_table(model)}
    assert table["stoics"][0] > 0 and table["stoics"][1] == 0
    assert table["darshanas"][1] == table["darshanas"][0] > 0


def test_new_plugin_scaffolds_into_a_new_family_and_still_refuses_misspellings(site):
    plugin = plan_plugin("ritam_nova", "module", "stoics")
    assert (plugin.ref, plugin.distribution) == ("stoics.ritam_nova", "dharma-plugin-ritam-nova")
    assert plan_plugin("logos", "module", "sufis").ref == "sufis.logos"
    with pytest.raises(DharmaError) as caught:
        plan_plugin("tarka", "module", "darshana")
    assert caught.value.message == "unknown family 'darshana'; did you mean 'darshanas'?"
    assert caught.value.hint.startswith(
        f"standard families are: {', '.join(FAMILIES)}; installed plugins add: stoics; "
    )
    with pytest.raises(DharmaError, match="module 'stoics.ritam' is already installed or standard"):
        plan_plugin("ritam", "module", "stoics")


def test_dharma_plugins_lists_each_family_with_its_modules(site):
    result = run_dharma(site, "plugins", "--kind", "module")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    start = lines.index("families (include or freeze each by name):")
    listed = {line.split()[0]: line.split(None, 1)[1] for line in lines[start + 1 : start + 8]}
    assert list(listed) == [*FAMILIES, "stoics"]
    assert listed["stoics"] == "apatheia, ritam  (new family, from plugins)"
    assert listed["energy"] == "guru, satya, shakti, shanti"
    assert re.search(r"^ *darshana\.tarka .* broken: unknown family 'darshana'", result.stdout, re.M)


class TestNewFamilyConformance(ModuleConformance):
    """The kernel's conformance suite runs over a module of a new family as over any other."""

    @pytest.fixture
    def module_class(self, site):
        return registry.load(registry.resolve("stoics.ritam"))


@pytest.mark.slow
def test_a_new_family_from_new_plugin_to_a_frozen_assembled_model_in_a_fresh_venv(tmp_path):
    """SLOW (about a minute): the kernel's wheel in a fresh venv; two plugins scaffolded with
    ``--family stoics``, installed, listed, their tests passed; a manifest including and freezing
    ``stoics`` validates and assembles."""
    wheels = build_wheels([ROOT], tmp_path / "wheels")
    venv = make_venv(tmp_path / "venv", shared_deps(tmp_path))
    check(pip(venv, "install", *OFFLINE, "--find-links", wheels, "dharma-kernel"))
    for name in ("ritam", "logos"):
        said = check(dharma(venv, "new-plugin", name, "--family", "stoics", "-o", tmp_path / name))
        assert said.startswith(f"wrote module stoics.{name} as dharma-plugin-{name} in ")
    check(pip(venv, "install", *OFFLINE, "--find-links", wheels, tmp_path / "ritam", tmp_path / "logos"))
    assert dharma_distributions(venv) == ["dharma-kernel", "dharma-plugin-logos", "dharma-plugin-ritam"]

    rows = plugin_rows(venv, "--check")
    assert [(r["ref"], r["family"], r["status"]) for r in rows] == [
        ("stoics.logos", "stoics", "ok"),
        ("stoics.ritam", "stoics", "ok"),
    ]
    listed = check(dharma(venv, "plugins"))
    assert "\n  stoics  logos, ritam  (new family, from plugins)\n" in listed, listed

    python = venv / "bin" / "python"
    result = run([python, "-m", "pytest", tmp_path / "ritam", "-q", "-p", "no:cacheprovider"], tmp_path)
    assert result.returncode == 0 and re.match(r"16 passed in ", result.stdout.strip().splitlines()[-1]), (
        result.stdout[-3000:]
    )  # the kernel's conformance suite, nothing skipped: it is installed

    manifest = tiny_manifest(tmp_path / "manifest.toml", '"stoics"')
    manifest.write_text(manifest.read_text() + '[freeze]\ngroups = ["stoics"]\n')
    validated = check(dharma(venv, "validate", manifest))
    assert "modules: 2 at layers [0, 1], sequential, preset tiny" in validated
    stoics = re.search(r"^ *stoics +([\d,]+) +[\d.]+% +([\d,]+) *$", validated, re.M)
    assert stoics and stoics[1] != "0" and stoics[2] == "0", validated  # frozen as one group
    check(dharma(venv, "assemble", manifest, "-o", tmp_path / "model"))
    name, refs, kernel = load_saved(venv, tmp_path / "model")
    assert (name, refs) == ("DharmaModel", "stoics.logos,stoics.ritam")
    assert kernel.startswith(str(venv))  # the fresh venv's kernel, from the wheel
