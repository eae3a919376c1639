from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def dharma_cache(tmp_path_factory, monkeypatch):
    """Prepared data goes to a cache inside pytest's temporary directory, never the user's."""
    path = tmp_path_factory.getbasetemp() / "dharma-cache"
    monkeypatch.setenv("DHARMA_CACHE", str(path))
    return path


@pytest.fixture
def prompt() -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts, the second left-padded, as batched generation sees them."""
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [0, 0, 0, 3, 4, 5]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1]])
    return ids, mask
