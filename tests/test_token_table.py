"""Routed models saved before the router's token table existed still load: the table starts fresh."""

from __future__ import annotations

import torch
from safetensors.torch import load_file, save_file
from tiny import tiny_model


def test_a_model_saved_without_token_tables_loads_with_fresh_ones(tmp_path):
    from dharma_kernel.model import DharmaModel

    model = tiny_model("routed", top_k=1, at_layers=(0, 1)).eval()
    for stack in model.stacks.values():
        with torch.no_grad():
            stack.prior_out.zero_()  # as an older model behaves: no table
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    tensors = load_file(weights)
    older = {k: v for k, v in tensors.items() if "token_prior" not in k and "prior_out" not in k}
    assert len(older) == len(tensors) - 4  # two stacks, two tensors each
    save_file(older, weights, metadata={"format": "pt"})
    loaded = DharmaModel.from_pretrained(tmp_path).eval()
    ids = torch.randint(1, 97, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    for stack in loaded.stacks.values():
        assert not stack.prior_out.any() and stack.token_prior.weight.shape == (97, 16)
        assert torch.isfinite(stack.token_prior.weight).all()
