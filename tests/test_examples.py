"""The example manifests assemble and run."""

from __future__ import annotations

from pathlib import Path

import torch

from dharma_kernel.assemble import build, plan
from dharma_kernel.catalogue import standard_refs
from dharma_kernel.manifest import load_manifest
from dharma_kernel.testing import perturb

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_all_37_forward_backward_and_cached_generation():
    model = build(plan(load_manifest(EXAMPLES / "all-37.toml")))
    assert model.module_refs == standard_refs()
    perturb(model.stacks, seed=0, std=0.05)
    model.train()
    # Routing holds each document's concept evidence, so many short documents reach many modules.
    ids = torch.randint(1, 512, (4, 48))
    ids[:, ::4] = model.config.text_config.eos_token_id
    out = model(ids, labels=ids)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    learned = {ref for ref in model.module_refs for layer in (0, 1)
               if any(p.grad is not None and p.grad.abs().sum() > 0
                      for p in model.module_at(ref, layer).parameters())}  # fmt: skip
    assert len(learned) >= 30  # top-2 routing of 48 four-token documents over 37 modules reaches most
    model.eval()
    prompt = torch.tensor([[1, 2, 3, 4, 5, 6]])
    kwargs = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0, "output_logits": True,
              "return_dict_in_generate": True}  # fmt: skip
    with torch.no_grad():
        cached = model.generate(prompt, use_cache=True, **kwargs)
        uncached = model.generate(prompt, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(torch.stack(cached.logits), torch.stack(uncached.logits), rtol=1e-4, atol=1e-5)


def test_foundation_example_plans():
    p = plan(load_manifest(EXAMPLES / "foundation.toml"))
    assert p.config.layout["at_layers"] == [1, 3]
    assert [m["ref"] for m in p.config.layout["modules"]] == standard_refs()
    assert p.config.text_config.n_embd == 256
