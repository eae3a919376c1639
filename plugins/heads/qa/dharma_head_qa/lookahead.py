"""One bidirectional self-attention layer over the backbone's final hidden states.

The backbone is causal: a context token's state has seen the question and the context
before it, never after. Whether an answer starts at a token often shows only in the
words that follow ("Krishna taught Arjuna"), so the head lets every token read the whole
input once before scoring it. Padding is never attended to.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dharma_kernel.errors import DharmaError


class Lookahead(nn.Module):
    def __init__(self, hidden_size: int, heads: int) -> None:
        super().__init__()
        if hidden_size % heads:
            raise DharmaError(f"qa: lookahead_heads {heads} must divide the hidden size {hidden_size}")
        self.heads = heads
        self.norm = nn.LayerNorm(hidden_size)
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.out = nn.Linear(hidden_size, hidden_size)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        batch, length, width = hidden.shape
        q, k, v = (
            t.view(batch, length, self.heads, width // self.heads).transpose(1, 2)
            for t in self.qkv(self.norm(hidden)).chunk(3, dim=-1)
        )
        allowed = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        mixed = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return hidden + self.out(mixed.transpose(1, 2).reshape(batch, length, width))
