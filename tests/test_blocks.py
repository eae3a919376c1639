"""Kernel blocks: what the modules of one stack share."""

from __future__ import annotations

import torch

from dharma_kernel.blocks import RunningSummary
from dharma_kernel.protocol import ModuleContext


def test_running_summary_is_shared_only_for_the_same_input():
    summary, ctx = RunningSummary(), ModuleContext()
    a, b = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    first = summary(a, ctx)
    assert summary(a, ctx) is first  # the next module of the stack reads it, no recomputation
    torch.testing.assert_close(summary(b, ctx), summary(b))  # another input is never served a's
    torch.testing.assert_close(first[:, 2], a[:, :3].mean(1))
