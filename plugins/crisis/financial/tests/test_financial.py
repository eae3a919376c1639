from dharma_plugin_financial import Financial

from dharma_kernel.testing import ModuleConformance


class TestFinancialConformance(ModuleConformance):
    plugin = Financial
