"""The conformance suite for module plugins, shipped as a pytest plugin.

A plugin's tests subclass :class:`ModuleConformance` and name their class::

    class TestVedanta(ModuleConformance):
        plugin = Vedanta

pytest then checks the module contract: the declared attributes, a strict Config,
causality, statelessness, gradient reach, gradient checkpointing, a save/load round
trip and cache-equal generation. The kernel's own tests run the same class over
every installed plugin.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_model, save_model
from torch.utils.checkpoint import checkpoint

from .protocol import DharmaModule, ModuleConfig, ModuleContext, ModuleOutput
from .version import MODULE_API

DEVANAGARI = re.compile(r"[\u0900-\u097F]")


def perturb(module: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Random weights everywhere: zero-initialised outputs would hide missing gradients."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * std)
    return module


def tiny_backbone_config(**overrides: int) -> dict:
    """A GPT-2-shaped backbone small enough for tests (the manifest's ``backbone.config``)."""
    return {
        "architecture": "gpt2",
        "n_layer": 2,
        "n_embd": 32,
        "n_head": 2,
        "n_positions": 64,
        "vocab_size": 97,
        "bos_token_id": 0,
        "eos_token_id": 0,
        **overrides,
    }


class ModuleConformance:
    """Contract checks for one module class; set ``plugin`` in a subclass."""

    plugin: type[DharmaModule]
    hidden_size = 32
    preset = "tiny"
    atol = 1e-5

    @pytest.fixture
    def module_class(self) -> type[DharmaModule]:
        return self.plugin

    def build(self, module_class: type[DharmaModule], seed: int = 0) -> DharmaModule:
        torch.manual_seed(seed)
        module = module_class(self.hidden_size, module_class.make_config(self.preset))
        return perturb(module, seed)

    def run(
        self, module: DharmaModule, hidden: torch.Tensor, ctx: ModuleContext | None = None
    ) -> ModuleOutput:
        return module(hidden, ctx or ModuleContext())

    def inputs(self, batch: int = 2, length: int = 7, seed: int = 1) -> torch.Tensor:
        return torch.randn(batch, length, self.hidden_size, generator=torch.Generator().manual_seed(seed))

    def test_declares_the_contract(self, module_class):
        assert issubclass(module_class, DharmaModule)
        assert re.fullmatch(r"[a-z][a-z0-9_]*", module_class.family), "family: lowercase identifier"
        assert re.fullmatch(r"[a-z][a-z0-9_]*", module_class.name), "name: lowercase identifier"
        assert module_class.module_api.split(".")[0] == MODULE_API.split(".")[0]
        assert issubclass(module_class.Config, ModuleConfig)
        concepts = module_class.concepts
        assert any(DEVANAGARI.search(c) for c in concepts), "concepts need Devanagari terms"
        assert any(c.isascii() for c in concepts), "concepts need English terms"
        assert any(not c.isascii() and not DEVANAGARI.search(c) for c in concepts), "concepts need IAST terms"
        for preset in module_class.presets:
            assert preset in ("tiny", "lite", "seed"), f"unknown preset {preset!r}"
            module_class.make_config(preset)

    def test_metadata_agrees_with_the_class(self, module_class):
        """The entry point named after the class's ref loads this class and declares its MODULE_API."""
        from . import registry

        info = next((p for p in registry.discover("module") if p.ref == module_class.ref()), None)
        if info is None:
            pytest.skip(f"{module_class.ref()} is not installed as a plugin")
        assert info.value == f"{module_class.__module__}:{module_class.__qualname__}"
        assert info.module_api == module_class.module_api, "dharma.api entry point and module_api differ"

    def test_config_rejects_unknown_keys(self, module_class):
        with pytest.raises(ValidationError, match="no_such_option"):
            module_class.Config(no_such_option=1)

    def test_output_shapes_and_score_range(self, module_class):
        module = self.build(module_class)
        hidden = self.inputs()
        out = self.run(module, hidden)
        assert isinstance(out, ModuleOutput)
        assert out.hidden.shape == hidden.shape and out.hidden.dtype == hidden.dtype
        assert out.score.shape == hidden.shape[:2]
        assert torch.isfinite(out.hidden).all()
        assert (out.score >= 0).all() and (out.score <= 1).all()

    def test_causal(self, module_class):
        module = self.build(module_class).eval()
        hidden = self.inputs(length=9)
        changed = hidden.clone()
        changed[:, 5:] = torch.randn_like(changed[:, 5:])
        with torch.no_grad():
            a, b = self.run(module, hidden), self.run(module, changed)
        assert torch.equal(a.hidden[:, :5], b.hidden[:, :5]), "earlier outputs changed with later tokens"
        assert torch.equal(a.score[:, :5], b.score[:, :5]), "earlier scores changed with later tokens"

    def test_every_parameter_gets_a_gradient(self, module_class):
        module = self.build(module_class).train()
        out = self.run(module, self.inputs())
        (out.hidden.pow(2).mean() + out.score.mean() + sum(out.losses.values(), torch.tensor(0.0))).backward()
        missing = [n for n, p in module.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
        assert not missing, f"parameters without gradient: {missing}"

    def test_gradient_checkpointing_gives_the_same_gradients(self, module_class):
        module = self.build(module_class).train()
        hidden = self.inputs()

        def loss(out: ModuleOutput) -> torch.Tensor:
            return out.hidden.pow(2).mean() + out.score.mean()

        loss(self.run(module, hidden)).backward()
        plain = {n: p.grad.clone() for n, p in module.named_parameters()}
        module.zero_grad()
        loss(checkpoint(self.run, module, hidden, use_reentrant=False)).backward()
        for name, param in module.named_parameters():
            torch.testing.assert_close(param.grad, plain[name], rtol=0, atol=1e-6, msg=name)

    def test_stateless(self, module_class):
        module = self.build(module_class).train()
        before = {k: v.clone() for k, v in module.state_dict().items()}
        attributes = {name: set(vars(m)) for name, m in module.named_modules()}
        hidden = self.inputs()
        first = self.run(module, hidden).hidden
        second = self.run(module, hidden).hidden
        assert torch.equal(first, second), "same input, different output: the module keeps state"
        for key, value in module.state_dict().items():
            assert torch.equal(value, before[key]), f"forward changed {key}"
        assert attributes == {name: set(vars(m)) for name, m in module.named_modules()}, (
            "forward set attributes"
        )

    def test_save_load_round_trip(self, module_class):
        module = self.build(module_class, seed=0).eval()
        fresh = self.build(module_class, seed=1).eval()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "module.safetensors"
            save_model(module, str(path))
            load_model(fresh, str(path))
        hidden = self.inputs()
        with torch.no_grad():
            assert torch.equal(self.run(module, hidden).hidden, self.run(fresh, hidden).hidden)

    @pytest.mark.parametrize("padded", [False, True])
    def test_cache_equal(self, module_class, padded):
        """Feeding tokens one at a time with ``ctx.past`` equals one full forward."""
        module = self.build(module_class).eval()
        hidden = self.inputs(length=8)
        mask = torch.ones(hidden.shape[:2], dtype=torch.long)
        if padded:
            mask[0, :3] = 0  # left padding, as in batched generation
        with torch.no_grad():
            full = self.run(module, hidden, ModuleContext(attention_mask=mask))
            steps = [self.run(module, hidden[:, :4], ModuleContext(attention_mask=mask[:, :4]))]
            for t in range(4, hidden.shape[1]):
                ctx = ModuleContext(attention_mask=mask[:, : t + 1], past=hidden[:, :t])
                steps.append(self.run(module, hidden[:, t : t + 1], ctx))
        real = mask.bool()
        incremental = torch.cat([s.hidden for s in steps], dim=1)
        scores = torch.cat([s.score for s in steps], dim=1)
        torch.testing.assert_close(incremental[real], full.hidden[real], rtol=1e-4, atol=self.atol)
        torch.testing.assert_close(scores[real], full.score[real], rtol=1e-4, atol=self.atol)

    def test_routed_tokens_match_a_full_forward(self, module_class):
        """With ``ctx.active`` (routed composition) the active tokens get what a full forward gives them."""
        module = self.build(module_class).eval()
        hidden = self.inputs(batch=3, length=10)
        active = torch.rand(hidden.shape[:2], generator=torch.Generator().manual_seed(2)) < 0.25
        active[0, 0] = True  # at least one
        mask = torch.ones(hidden.shape[:2], dtype=torch.long)
        mask[2, :4] = 0
        active &= mask.bool()
        with torch.no_grad():
            full = self.run(module, hidden, ModuleContext(attention_mask=mask))
            routed = self.run(module, hidden, ModuleContext(attention_mask=mask, active=active))
        torch.testing.assert_close(routed.hidden[active], full.hidden[active], rtol=1e-4, atol=self.atol)
        torch.testing.assert_close(routed.score[active], full.score[active], rtol=1e-4, atol=self.atol)

    def test_padding_does_not_change_real_tokens(self, module_class):
        module = self.build(module_class).eval()
        hidden = self.inputs(batch=1, length=6)
        padded = torch.cat([torch.randn(1, 3, self.hidden_size), hidden], dim=1)
        mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
        with torch.no_grad():
            alone = self.run(module, hidden)
            with_pad = self.run(module, padded, ModuleContext(attention_mask=mask))
        torch.testing.assert_close(with_pad.hidden[:, 3:], alone.hidden, rtol=1e-4, atol=self.atol)

    def test_cache_equal_generation(self, module_class):
        """Inside a tiny model: greedy generation with KV cache gives the tokens it gives without."""
        from . import registry
        from .assemble import build_model

        ref = module_class.ref()
        try:
            registry.resolve(ref, "module")
        except Exception as err:  # not installed as an entry point: nothing to assemble
            pytest.skip(f"{ref} is not installed as a plugin ({err})")
        model = build_model(
            backbone=tiny_backbone_config(),
            layout={
                "at_layers": [0, 1],
                "composition": "sequential",
                "top_k": 1,
                "preset": self.preset,
                "modules": [{"ref": ref, "config": module_class.make_config(self.preset).model_dump()}],
            },
            seed=0,
        )
        perturb(model.stacks, seed=3, std=0.1)
        model.eval()
        prompt = torch.tensor([[5, 6, 7, 8, 9], [0, 0, 3, 4, 5]])
        mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
        kwargs = {
            "max_new_tokens": 8,
            "do_sample": False,
            "pad_token_id": 0,
            "attention_mask": mask,
            "output_logits": True,
            "return_dict_in_generate": True,
        }
        with torch.no_grad():
            cached = model.generate(prompt, use_cache=True, **kwargs)
            uncached = model.generate(prompt, use_cache=False, **kwargs)
        assert torch.equal(cached.sequences, uncached.sequences)
        torch.testing.assert_close(
            torch.stack(cached.logits), torch.stack(uncached.logits), rtol=1e-4, atol=self.atol
        )
