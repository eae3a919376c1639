import torch
from dharma_plugin_dharma import Dharma

from dharma_kernel.protocol import ModuleContext
from dharma_kernel.testing import ModuleConformance


class TestDharmaConformance(ModuleConformance):
    plugin = Dharma


def test_position_wise():
    # A path module looks at one token at a time: changing one position changes only it.
    torch.manual_seed(0)
    module = Dharma(16, Dharma.make_config("tiny"))
    for p in module.parameters():
        p.data.normal_(0, 0.2)
    hidden = torch.randn(2, 6, 16)
    changed = hidden.clone()
    changed[:, 2] = torch.randn(2, 16)
    a, b = module(hidden, ModuleContext()).hidden, module(changed, ModuleContext()).hidden
    untouched = [0, 1, 3, 4, 5]
    assert torch.equal(a[:, untouched], b[:, untouched])
    assert not torch.allclose(a[:, 2], b[:, 2])


def test_gate_scales_the_effect():
    torch.manual_seed(0)
    module = Dharma(16, Dharma.make_config("tiny"))
    for p in module.parameters():
        p.data.normal_(0, 0.2)
    with torch.no_grad():
        module.detector.proj.bias.fill_(-30.0)  # detector silent: the block must pass hidden through
    hidden = torch.randn(1, 4, 16)
    out = module(hidden, ModuleContext())
    assert out.score.max() < 1e-6
    assert torch.allclose(out.hidden, hidden, atol=1e-5)
