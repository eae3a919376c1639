"""Installing a plugin changes what ``all`` and family names mean: a saved run or model keeps its
modules, and validate, eval and resume say so, naming the modules added; resume refuses the change
unless --run-modules asks to keep the run's own modules."""

from __future__ import annotations

import pytest
from fakedists import install
from trainkit import write_corpus, write_manifest
from venvkit import ROOT

from dharma_kernel import registry
from dharma_kernel.module_set import change, saved_refs
from dharma_kernel.testing import run_cli

ENERGY = ["energy.shakti", "energy.shanti", "energy.satya", "energy.guru"]
MODULES = '[modules]\npreset = "tiny"\ninclude = ["energy"]\nat_layers = [0, 1]\ncomposition = "routed"\n'


def test_change_names_what_was_added_and_what_is_missing():
    assert change(["a", "b"], ["a", "b"]) is None
    assert change(["a", "b"], ["b", "a"]) is None
    assert change(["a", "b"], ["a", "b", "c"]) == "added c"
    assert change(["a", "b", "c"], ["b", "d"]) == "added d; missing a, c"


@pytest.fixture
def prana(tmp_path, monkeypatch):
    """Installs the third-party energy.prana (examples/third_party_plugin) when called."""

    def installed() -> None:
        site = tmp_path / "site"
        site.mkdir()
        install(site, "dharma-plugin-prana", {"dharma.modules": {"energy.prana": "dharma_plugin_prana:Prana"},
                                              "dharma.api": {"energy.prana": "1.0"}})  # fmt: skip
        monkeypatch.syspath_prepend(str(ROOT / "examples" / "third_party_plugin"))
        monkeypatch.syspath_prepend(str(site))
        registry.clear_cache()

    yield installed
    registry.clear_cache()


def test_a_plugin_joining_a_family_is_named_by_validate_eval_and_resume(tmp_path, capsys, prana):
    manifest = write_manifest(tmp_path, modules=False, train={"max_steps": 2, "eval_every": 2}, extra=MODULES)
    code, _, err = run_cli(capsys, "train", manifest, "--quiet")
    assert code == 0, err
    run = tmp_path / "run"
    assert saved_refs(run / "latest") == ENERGY

    prana()  # `pip install dharma-plugin-prana`: the family now has five modules
    code, _, err = run_cli(capsys, "validate", manifest)
    assert code == 0, err
    assert (
        f"warning: the run in {run} was trained with 4 modules; this manifest now resolves to 5 "
        "(added energy.prana)."
    ) in err

    data = write_corpus(tmp_path / "heldout", copies=1)
    code, out, err = run_cli(capsys, "eval", run, "--data", data, "--max-length", "32")
    assert code == 0, err
    assert (
        f"warning: {(run / 'best').resolve()} was built with 4 modules; its manifest's include = "
        '["energy"] now resolves to 5 (added energy.prana): the model runs with the 4 it was built with'
    ) in err

    code, _, err = run_cli(capsys, "train", manifest, "--resume", "--max-steps", "3")
    assert code == 2
    first, hint = err.splitlines()[-2:]
    assert first.startswith("error: ") and first.endswith(
        "was trained with 4 modules; the manifest's include = "
        '["energy"] now resolves to 5 (added energy.prana)'
    ), err
    assert hint.startswith("  hint: Pass --run-modules to resume with the run's own modules")
    assert saved_refs(run / "latest") == ENERGY and (run / "latest").resolve().name == "step-00000002"

    code, _, err = run_cli(
        capsys, "train", manifest, "--resume", "--run-modules", "--max-steps", "3", "--quiet"
    )
    assert code == 0, err
    assert (run / "latest").resolve().name == "step-00000003"
    assert saved_refs(run / "latest") == ENERGY  # resumed with the run's own four


def test_run_modules_needs_resume(tmp_path, capsys):
    manifest = write_manifest(tmp_path, modules=False, extra=MODULES)
    code, _, err = run_cli(capsys, "train", manifest, "--run-modules")
    assert code == 2 and err.startswith("error: --run-modules only applies with --resume")
