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

import contextlib
import functools
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_model, save_model
from torch.utils.checkpoint import checkpoint

from .catalogue import family_problem
from .protocol import DharmaModule, HeadModule, HeadOutput, ModuleConfig, ModuleContext, ModuleOutput
from .version import MODULE_API

DEVANAGARI = re.compile(r"[\u0900-\u097F]")


def perturb(module: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Random weights everywhere: zero-initialised outputs would hide missing gradients."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * std)
    return module


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Torch on one CPU thread for the block: runs compared bit for bit need the same kernels
    every time, and tiny models on a busy machine run faster without contended threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run_cli(capsys: Any, *argv: Any) -> tuple[int, str, str]:
    """``dharma ARGV`` in this process: its exit code, stdout and stderr (``capsys`` captures them)."""
    from . import registry
    from .cli import main

    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as exit_:
        code = exit_.code or 0
    finally:
        registry.disable((), reset=True)  # --no-plugin lasts one command line, as in its own process
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def cli_output(capsys: Any, *argv: Any) -> str:
    """``dharma ARGV``'s stdout; a failed command raises DharmaError with what it printed on stderr."""
    from .errors import DharmaError

    code, out, err = run_cli(capsys, *argv)
    if code != 0:
        raise DharmaError(err)
    return out


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
        # a standard family, or a new one that a manifest and --freeze can name as a group
        assert family_problem(module_class.family) is None, family_problem(module_class.family)
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


class HeadConformance:
    """Contract checks for one head class; set ``plugin``, a fitted ``config`` and a few valid
    ``records`` (with targets) in a subclass. See docs/HEADS.md."""

    plugin: type[HeadModule]
    config: dict = {}
    records: list[dict] = []
    hidden_size = 32
    max_length = 48

    @pytest.fixture
    def tokenizer(self):
        texts = tuple(str(value) for record in self.records for value in record.values())
        return _records_tokenizer(texts)

    def build(self, seed: int = 0) -> HeadModule:
        torch.manual_seed(seed)
        head = self.plugin(self.hidden_size, self.plugin.Config(**self.config))
        return perturb(head, seed)

    def batch(self, head: HeadModule, tokenizer, records: list[dict], extra_pad: int = 0) -> dict:
        from .head_data import pad_features, pad_id

        features = [head.encode(record, tokenizer, self.max_length) for record in records]
        tensors = pad_features(features, pad_id(tokenizer), type(head).pad_values)
        if extra_pad:
            tensors = {k: _pad_right(v, extra_pad, k, type(head).pad_values) for k, v in tensors.items()}
        return tensors

    def run(self, head: HeadModule, tensors: dict, seed: int = 1, width: int | None = None) -> HeadOutput:
        """The head on random hidden states (the first ``T`` of ``width`` positions drawn from ``seed``)."""
        from .head_data import MODEL_KEYS

        length = tensors["input_ids"].shape[1]
        generator = torch.Generator().manual_seed(seed)
        hidden = torch.randn(
            len(tensors["input_ids"]), width or length, self.hidden_size, generator=generator
        )
        hidden = hidden[:, :length]
        features = {k: v for k, v in tensors.items() if k not in MODEL_KEYS}
        return head(hidden, tensors["attention_mask"], **features)

    def test_declares_the_contract(self):
        cls = self.plugin
        assert issubclass(cls, HeadModule)
        assert re.fullmatch(r"[a-z][a-z0-9_]*", cls.name), "name: lowercase identifier"
        assert cls.module_api.split(".")[0] == MODULE_API.split(".")[0]
        assert issubclass(cls.Config, ModuleConfig)
        assert cls.inputs and all(isinstance(f, str) for f in (*cls.inputs, *cls.targets))
        assert self.records, "set records: a few valid records with targets"

    def test_metadata_agrees_with_the_class(self):
        from . import registry

        info = next((p for p in registry.discover("head") if p.ref == self.plugin.name), None)
        if info is None:
            pytest.skip(f"{self.plugin.name} is not installed as a plugin")
        assert info.value == f"{self.plugin.__module__}:{self.plugin.__qualname__}"
        assert info.module_api == self.plugin.module_api, "dharma.api entry point and module_api differ"

    def test_config_rejects_unknown_keys(self):
        with pytest.raises(ValidationError, match="no_such_option"):
            self.plugin.Config(no_such_option=1)

    def test_encode_and_forward_shapes(self, tokenizer):
        head = self.build()
        tensors = self.batch(head, tokenizer, self.records)
        assert tensors["input_ids"].shape[1] <= self.max_length
        out = self.run(head, tensors)
        assert isinstance(out, HeadOutput)
        for value in _tensors(out.logits):
            assert value.numel() == 0 or value.shape[0] == len(self.records)
            assert torch.isfinite(value).all()
        if not self.plugin.uses_lm_loss:
            assert out.losses, "with targets, the head returns its loss"
        for name, value in out.losses.items():
            assert value.dim() == 0 and torch.isfinite(value), name
        unlabelled = [{k: r[k] for k in self.plugin.inputs} for r in self.records]
        assert not self.run(head, self.batch(head, tokenizer, unlabelled)).losses, "no targets, no loss"

    def test_padding_does_not_change_real_outputs(self, tokenizer):
        head = self.build().eval()
        for index, record in enumerate(self.records):
            alone = self.batch(head, tokenizer, [record])
            padded = self.batch(head, tokenizer, [record], extra_pad=5)
            with torch.no_grad():
                a = self.run(head, alone, width=alone["input_ids"].shape[1] + 5)
                b = self.run(head, padded)
            length = alone["input_ids"].shape[1]
            for x, y in zip(_tensors(a.logits), _tensors(b.logits), strict=True):
                if y.dim() >= 2 and y.shape[1] == length + 5:
                    y = y[:, :length]
                torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=f"record {index}")
            for name in a.losses:
                torch.testing.assert_close(a.losses[name], b.losses[name], rtol=1e-4, atol=1e-5)

    def test_every_parameter_gets_a_gradient(self, tokenizer):
        head = self.build().train()
        if not any(True for _ in head.parameters()):
            pytest.skip("the head has no parameters of its own (the LM loss trains the model)")
        out = self.run(head, self.batch(head, tokenizer, self.records))
        terms = list(out.losses.values()) or [v.float().pow(2).mean() for v in _tensors(out.logits)]
        torch.stack(terms).sum().backward()
        missing = [n for n, p in head.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
        assert not missing, f"parameters without gradient: {missing}"

    def test_save_load_round_trip(self, tokenizer):
        head, fresh = self.build(seed=0).eval(), self.build(seed=1).eval()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "head.safetensors"
            save_model(head, str(path))
            load_model(fresh, str(path))
        tensors = self.batch(head, tokenizer, self.records)
        with torch.no_grad():
            before, after = self.run(head, tensors).logits, self.run(fresh, tensors).logits
            for x, y in zip(_tensors(before), _tensors(after), strict=True):
                assert torch.equal(x, y)

    def test_predict_and_metrics_in_a_tiny_model(self, tokenizer):
        import json

        from . import registry
        from .assemble import build_model

        try:
            registry.resolve(self.plugin.name, "head")
        except Exception as err:
            pytest.skip(f"{self.plugin.name} is not installed as a plugin ({err})")
        model = build_model(
            backbone=tiny_backbone_config(vocab_size=len(tokenizer), n_positions=self.max_length + 16),
            layout={"heads": [{"plugin": self.plugin.name, "config": self.config}]},
        ).eval()
        inputs = [{k: r[k] for k in self.plugin.inputs} for r in self.records]
        with torch.no_grad():
            predictions = model.heads[self.plugin.name].predict(model, tokenizer, inputs)
        assert len(predictions) == len(self.records)
        json.dumps(predictions)
        scores = model.heads[self.plugin.name].metrics(predictions, self.records)
        assert scores and all(isinstance(v, float) for v in scores.values())
        # the score fine-tuning selects checkpoints by must be one the head reports
        assert self.plugin.metric is None or self.plugin.metric in scores, (
            f"metric = {self.plugin.metric!r} is not among metrics(): {sorted(scores)}"
        )


@functools.cache
def _records_tokenizer(texts: tuple[str, ...]):
    """A byte-level BPE trained on the records' text (cached: trained once per set of records)."""
    from .data.tokenizer import train_tokenizer

    return train_tokenizer(list(texts) * 3, vocab_size=300, min_frequency=1)


def _tensors(logits) -> list[torch.Tensor]:
    return [logits[k] for k in sorted(logits)] if isinstance(logits, dict) else [logits]


def _pad_right(value: torch.Tensor, extra: int, key: str, pad_values: dict) -> torch.Tensor:
    """``value`` with ``extra`` more padding positions, when it is per token (dim 2)."""
    if value.dim() != 2:
        return value
    fill = {"attention_mask": 0, "labels": -100}.get(key, pad_values.get(key, 0))
    if key == "input_ids":
        fill = 0
    return torch.cat([value, value.new_full((value.shape[0], extra), fill)], dim=1)


def tiny_foundation(
    directory: str | Path,
    texts: list[str],
    modules: tuple[str, ...] = (),
    seed: int = 0,
    positions: int = 128,
) -> Path:
    """A saved foundation for head tests: a 2-layer, 64-wide GPT-2 with fresh weights and a
    byte-level BPE trained on ``texts`` (EOS, BOS and pad are id 0), and the module ``refs``
    (tiny preset) after layer 0. Loads with ``DharmaModel.from_pretrained``; no download."""
    from . import registry
    from .assemble import build_model
    from .checkpoint import save
    from .data.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(texts, vocab_size=400, min_frequency=1, model_max_length=positions)
    specs = [
        {"ref": ref, "config": registry.load(registry.resolve(ref)).make_config("tiny").model_dump()}
        for ref in modules
    ]
    layout = {"at_layers": [0], "preset": "tiny", "modules": specs} if specs else {}
    backbone = tiny_backbone_config(
        vocab_size=len(tokenizer), n_embd=64, n_positions=positions, pad_token_id=0
    )
    model = build_model(backbone=backbone, layout=layout, seed=seed)
    return save(model, directory, tokenizer)


SERVING_MODULES = ("darshanas.vedanta", "darshanas.yoga", "darshanas.nyaya")


def tiny_serving_model(directory: str | Path, positions: int = 512, width: int = 64, layers: int = 2) -> Path:
    """A saved GPT-2 (2 layers, 64 wide unless told) with the :data:`SERVING_MODULES` routed (top 1)
    after layers 0 and 1 (layer 0 alone if it has one), for `dharma serve` tests and benchmarks.
    Random weights large enough that greedy decoding varies from token to token; tokens that
    decode to no whole character (and end-of-text) get a zero output row, so replies are readable
    text that runs to max_tokens. No download."""
    from . import registry
    from .assemble import build_model
    from .checkpoint import save
    from .data.tokenizer import train_tokenizer

    texts = ["dharma is duty and karma is action", "moksha is freedom and seva is service"] * 10
    tokenizer = train_tokenizer(texts, vocab_size=400, min_frequency=1, model_max_length=positions)
    specs = [
        {"ref": ref, "config": registry.load(registry.resolve(ref)).make_config("tiny").model_dump()}
        for ref in SERVING_MODULES
    ]
    at = list(range(min(2, layers)))
    layout = {"at_layers": at, "preset": "tiny", "composition": "routed", "top_k": 1, "modules": specs}
    backbone = tiny_backbone_config(
        vocab_size=len(tokenizer), n_embd=width, n_layer=layers, n_positions=positions, pad_token_id=0
    )
    model = build_model(backbone=backbone, layout=layout, seed=0)
    perturb(model, seed=1, std=1.0)
    unreadable = [i for i in range(len(tokenizer)) if i == 0 or "\ufffd" in tokenizer.decode([i])]
    with torch.no_grad():
        model.get_output_embeddings().weight[unreadable] = 0.0
    return save(model, directory, tokenizer)
