import torch
from dharma_plugin_prana import Prana

from dharma_kernel.concepts import Lexicon
from dharma_kernel.protocol import ModuleContext
from dharma_kernel.testing import ModuleConformance


class TestPranaConformance(ModuleConformance):
    plugin = Prana


def test_lexicon_marks_breath_in_every_script():
    lexicon = Lexicon.from_module(Prana)
    text = "प्राणायाम is the practice of prāṇāyāma: watching the breath"
    spans = [text[a:b].lower() for a, b in lexicon.find(text)]
    assert spans == ["प्राणायाम", "prāṇāyāma", "breath"]


def test_an_early_token_reaches_a_later_one_through_the_summary():
    torch.manual_seed(0)
    module = Prana(16, Prana.make_config("tiny"))
    for p in module.parameters():
        p.data.normal_(0, 0.2)
    hidden = torch.randn(1, 5, 16)
    changed = hidden.clone()
    changed[0, 0] = torch.randn(16)
    a, b = module(hidden, ModuleContext()).hidden, module(changed, ModuleContext()).hidden
    assert not torch.allclose(a[0, 4], b[0, 4])
