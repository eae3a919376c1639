import torch
from dharma_plugin_vedanta import Vedanta

from dharma_kernel.protocol import ModuleContext
from dharma_kernel.testing import ModuleConformance


class TestVedantaConformance(ModuleConformance):
    plugin = Vedanta


def test_summary_reads_the_past_so_far():
    # Position t of the output depends on every earlier position (attention and the
    # running summary), not only on its own token.
    torch.manual_seed(0)
    module = Vedanta(16, Vedanta.make_config("tiny"))
    for p in module.parameters():
        p.data.normal_(0, 0.2)
    hidden = torch.randn(1, 5, 16)
    changed = hidden.clone()
    changed[0, 0] = torch.randn(16)
    a = module(hidden, ModuleContext()).hidden
    b = module(changed, ModuleContext()).hidden
    assert not torch.allclose(a[0, 4], b[0, 4])


def test_presets_grow():
    sizes = [
        sum(p.numel() for p in Vedanta(768, Vedanta.make_config(p)).parameters())
        for p in ("tiny", "lite", "seed")
    ]
    assert sizes == sorted(sizes) and sizes[0] < sizes[2]
