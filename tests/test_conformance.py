"""The conformance suite over every installed module plugin, whoever wrote it."""

from __future__ import annotations

import pytest

from dharma_kernel import registry
from dharma_kernel.testing import ModuleConformance

INSTALLED = [info for info in registry.discover("module") if info.problem is None]


def test_the_bundled_plugins_are_installed():
    assert {"paths.dharma", "darshanas.vedanta"} <= {info.ref for info in INSTALLED}


class TestInstalledModules(ModuleConformance):
    @pytest.fixture(params=INSTALLED, ids=lambda info: info.ref)
    def module_class(self, request):
        return registry.load(request.param)
