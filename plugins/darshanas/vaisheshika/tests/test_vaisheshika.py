from dharma_plugin_vaisheshika import Vaisheshika

from dharma_kernel.testing import ModuleConformance


class TestVaisheshikaConformance(ModuleConformance):
    plugin = Vaisheshika
