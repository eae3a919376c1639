from dharma_plugin_guru import Guru

from dharma_kernel.testing import ModuleConformance


class TestGuruConformance(ModuleConformance):
    plugin = Guru
