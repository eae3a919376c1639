"""A saved model's lock against installed plugin versions: same major warns, another is refused.

Fake distributions at chosen versions stand in for the installed plugins; the lock is the
one a saved model's ``config.json`` holds.
"""

from __future__ import annotations

import json
import sys
import warnings

import pytest
from fakedists import install

from dharma_kernel import checkpoint, registry
from dharma_kernel.checkpoint import LockWarning, check_lock
from dharma_kernel.errors import DharmaError

TARKA = """
import torch

from dharma_kernel.protocol import DharmaModule, ModuleOutput


class Tarka(DharmaModule):
    family, name, module_api = "darshanas", "tarka", "1.0"
    concepts = ("तर्क", "tarka", "reasoning")

    def __init__(self, hidden_size, config=None):
        super().__init__(hidden_size, config)
        self.scale = torch.nn.Parameter(torch.zeros(hidden_size))

    def forward(self, hidden, ctx):
        return ModuleOutput(hidden * (1 + self.scale), torch.zeros(hidden.shape[:2]))
"""


@pytest.fixture
def installed(tmp_path, monkeypatch):
    """Installs ``dharma-fake-tarka`` at a version; each call replaces the previous one."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def at(version: str, api: str = "1.0") -> None:
        for old in tmp_path.glob("dharma_fake_tarka-*.dist-info"):
            for f in old.iterdir():
                f.unlink()
            old.rmdir()
        entries = {"dharma.modules": {"darshanas.tarka": "dharma_fake_tarka:Tarka"},
                   "dharma.api": {"darshanas.tarka": api}}  # fmt: skip
        install(tmp_path, "dharma-fake-tarka", entries, {"dharma_fake_tarka": TARKA}, version=version)
        registry.clear_cache()

    yield at
    registry.clear_cache()
    sys.modules.pop("dharma_fake_tarka", None)


def lock(version: str, api: str = "1.0") -> list[dict]:
    return [{"kind": "module", "ref": "darshanas.tarka", "distribution": "dharma-fake-tarka",
             "version": version, "module_api": api}]  # fmt: skip


def test_the_lock_records_distribution_version_and_api(installed):
    installed("0.3.1")
    assert checkpoint.make_lock({"modules": [{"ref": "darshanas.tarka"}]}) == lock("0.3.1")


@pytest.mark.parametrize(("saved", "now"), [("0.3.1", "0.3.1"), ("1.2.0", "1.2.0")])
def test_the_same_version_loads_silently(installed, saved, now):
    installed(now)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_lock(lock(saved))


@pytest.mark.parametrize(("saved", "now"), [("0.3.1", "0.3.4"), ("0.3.4", "0.3.0"), ("1.2.0", "1.5.3")])
def test_a_compatible_version_loads_with_a_warning_naming_what_to_install(installed, saved, now):
    installed(now)
    with pytest.warns(LockWarning) as caught:
        check_lock(lock(saved))
    assert str(caught[0].message) == (
        f"darshanas.tarka: saved with dharma-fake-tarka {saved}, loading with {now}; "
        f"for the version it was saved with: pip install 'dharma-fake-tarka=={saved}'"
    )


@pytest.mark.parametrize(("saved", "now"), [("0.3.1", "0.4.0"), ("1.2.0", "2.0.0"), ("2.0.0", "1.9.0")])
def test_another_major_version_is_refused_naming_what_to_install(installed, saved, now):
    installed(now)
    with pytest.raises(DharmaError) as caught:
        check_lock(lock(saved))
    assert str(caught.value) == (
        f"cannot load this model:\n  darshanas.tarka was saved with dharma-fake-tarka {saved}, "
        f"but {now} is installed; run: pip install 'dharma-fake-tarka=={saved}'"
    )


def test_a_saved_model_checks_its_lock_when_loaded(installed, tmp_path):
    from dharma_kernel.assemble import build_model
    from dharma_kernel.model import DharmaModel
    from dharma_kernel.testing import tiny_backbone_config

    installed("0.3.1")
    layout = {"modules": [{"ref": "darshanas.tarka", "config": {}}], "at_layers": [1]}
    directory = checkpoint.save(build_model(tiny_backbone_config(), layout), tmp_path / "model")
    assert json.loads((directory / "config.json").read_text())["lock"] == lock("0.3.1")

    installed("0.3.2")
    with pytest.warns(LockWarning, match="saved with dharma-fake-tarka 0.3.1, loading with 0.3.2"):
        assert DharmaModel.from_pretrained(directory).module_refs == ["darshanas.tarka"]
    installed("0.4.0")
    with pytest.raises(DharmaError, match=r"run: pip install 'dharma-fake-tarka==0.3.1'"):
        DharmaModel.from_pretrained(directory)
