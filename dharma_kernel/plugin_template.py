"""The files ``dharma new-plugin`` writes: a complete module or head distribution.

Each template is plain text with ``{placeholders}`` filled by :func:`render`; the
generated code composes kernel blocks and is checked by the conformance suite
(``dharma_kernel.testing``) in the distribution's own tests.
"""

from __future__ import annotations

from dataclasses import dataclass

from .version import MODULE_API, __version__


@dataclass(frozen=True)
class Plugin:
    """What the templates need to know about the plugin being written."""

    kind: str  # "module" | "head"
    name: str  # "tarka"
    family: str | None  # "darshanas" for modules
    distribution: str  # "dharma-plugin-tarka"
    package: str  # "dharma_plugin_tarka"

    @property
    def ref(self) -> str:
        return f"{self.family}.{self.name}" if self.kind == "module" else self.name

    @property
    def class_name(self) -> str:
        return "".join(part.capitalize() for part in self.name.split("_"))


def kernel_requirement(version: str = __version__) -> str:
    """The ``dharma-kernel`` range a plugin written against ``version`` works with.

    Below 1.0 a minor release may break plugins, so the range stops at the next minor;
    from 1.0 on, at the next major (MODULE_API follows the same rule).
    """
    major, minor = (int(part) for part in version.split(".")[:2])
    upper = f"{major}.{minor + 1}" if major == 0 else f"{major + 1}"
    return f"dharma-kernel>={major}.{minor},<{upper}"


def render(plugin: Plugin) -> dict[str, str]:
    """Relative path -> file text, for the whole distribution."""
    values = {
        "name": plugin.name,
        "family": plugin.family or "",
        "ref": plugin.ref,
        "distribution": plugin.distribution,
        "package": plugin.package,
        "cls": plugin.class_name,
        "api": MODULE_API,
        "kernel": kernel_requirement(),
        "group": "dharma.modules" if plugin.kind == "module" else "dharma.heads",
    }
    files = _MODULE if plugin.kind == "module" else _HEAD
    return {path.format(**values): text.format(**values).lstrip("\n") for path, text in files.items()}


_PYPROJECT = """
[build-system]
requires = ["hatchling>=1.21"]
build-backend = "hatchling.build"

[project]
name = "{distribution}"
version = "0.1.0"
description = "The {name} {kind_word} for Dharma."
readme = "README.md"
requires-python = ">=3.11"
dependencies = ["{kernel}"]

# How the kernel finds the plugin without importing it.
[project.entry-points."{group}"]
"{ref}" = "{package}:{cls}"

# The MODULE_API the class is written for: `dharma plugins` shows it without importing.
[project.entry-points."dharma.api"]
"{ref}" = "{api}"

[tool.hatch.build.targets.wheel]
packages = ["{package}"]

[tool.pytest.ini_options]
testpaths = ["tests"]
"""

_MODULE_SOURCE = '''
"""{cls}: a Dharma module. Say here what the module is about and what its concepts are."""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field

from dharma_kernel.blocks import BottleneckAdapter, CausalAttention, ConceptDetector
from dharma_kernel.protocol import DharmaModule, ModuleConfig, ModuleContext, TokenOutput


class {cls}(DharmaModule):
    """Detectors gate an adapter and a causal attention over the text so far."""

    family = "{family}"
    name = "{name}"
    module_api = "{api}"
    # The lexicon: Devanagari, IAST and English terms. The kernel labels training text
    # with them and supervises the module's score there. Replace these with your own.
    concepts = ("विचार", "वितर्क", "vicāra", "vitarka", "reflection", "inquiry", "deliberation")

    class Config(ModuleConfig):  # unknown keys and wrong types are errors; a manifest overrides any field
        bottleneck: int = Field(16, ge=1)
        detectors: int = Field(2, ge=1)
        heads: int = Field(2, ge=1)
        head_dim: int = Field(8, ge=1)

    # Sizes per manifest preset: tiny (tests), lite (the Config defaults), seed (large).
    presets: ClassVar[dict] = {{
        "tiny": {{"bottleneck": 8, "head_dim": 4}},
        "seed": {{"bottleneck": 512, "detectors": 4, "heads": 8, "head_dim": 64}},
    }}

    def __init__(self, hidden_size: int, config: ModuleConfig | None = None) -> None:
        super().__init__(hidden_size, config)
        c = self.config
        self.detector = ConceptDetector(hidden_size, c.detectors)
        self.adapter = BottleneckAdapter(hidden_size, c.bottleneck)
        self.attention = CausalAttention(hidden_size, c.heads, c.head_dim)

    def forward_tokens(self, x: torch.Tensor, hidden: torch.Tensor, ctx: ModuleContext) -> TokenOutput:
        """The residual delta and score at the tokens ``x`` (all, or those routed here).

        ``hidden`` is the whole sequence: attention reads it (and ``ctx.past`` in cached
        generation) so the output stays causal and equal with and without the cache.
        """
        gate, _ = self.detector(x)
        delta = self.adapter(x) + self.attention.at_tokens(x, hidden, ctx)
        return TokenOutput(delta=gate[:, None] * delta, score=gate)
'''

_MODULE_TESTS = '''
"""The kernel's conformance suite (causal, stateless, fully trained, cache-equal), then the module's own."""

import torch
from {package} import {cls}

from dharma_kernel.concepts import Lexicon
from dharma_kernel.protocol import ModuleContext
from dharma_kernel.testing import ModuleConformance


class Test{cls}Conformance(ModuleConformance):
    plugin = {cls}


def test_lexicon_finds_its_terms_in_every_script():
    lexicon = Lexicon.from_module({cls})
    for text in ("सत्य विचार", "vicāra of the self", "A REFLECTION on duty"):
        assert lexicon.find(text), text
    assert not lexicon.find("the weather today")


def test_score_follows_the_detector():
    module = {cls}(16, {cls}.make_config("tiny"))
    hidden = torch.randn(1, 5, 16)
    out = module(hidden, ModuleContext())
    gate, _ = module.detector(hidden)
    torch.testing.assert_close(out.score, gate)
'''

_MODULE_README = """
# {distribution}

The `{ref}` module for [Dharma](https://pypi.org/project/dharma-kernel/): a
`{cls}` class in `{package}/__init__.py`, written for MODULE_API {api}.

```
pip install -e .          # installs it (and dharma-kernel) into this environment
pytest                    # the kernel's conformance suite and this plugin's tests
dharma plugins --check    # lists {ref} as ok
```

Use it in a manifest:

```toml
[modules]
include = ["{ref}"]
at_layers = [2]

[modules.override."{ref}"]   # any field of {cls}.Config
bottleneck = 32
```

Before publishing: replace the example concepts with your module's own terms
(Devanagari, IAST and English), describe the module in its docstring, then
`python -m build` and upload the wheel and sdist. The contract the tests check is
in the kernel's docs/AUTHORING.md.
"""

_HEAD_SOURCE = '''
"""{cls}: a Dharma task head. Say here what it predicts from which record fields."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from dharma_kernel.head_data import pad_features, pad_id
from dharma_kernel.protocol import HeadModule, HeadOutput, ModuleConfig, RecordError


class {cls}(HeadModule):
    """Scores each record's text: the mean of the real tokens' final hidden states, then a linear layer."""

    name = "{name}"
    module_api = "{api}"
    inputs = ("text",)
    targets = ("label",)

    class Config(ModuleConfig):
        labels: list[str] = Field(default_factory=list)  # learned from the training records

    @classmethod
    def fit_config(cls, config: ModuleConfig, records: list[dict[str, Any]]) -> ModuleConfig:
        return config.model_copy(update={{"labels": sorted({{str(r["label"]) for r in records}})}})

    def __init__(self, hidden_size: int, config: ModuleConfig | None = None) -> None:
        super().__init__(hidden_size, config)
        self.norm = torch.nn.LayerNorm(hidden_size)
        self.score = torch.nn.Linear(hidden_size, max(len(self.config.labels), 1))

    def encode(self, record: dict[str, Any], tokenizer: Any, max_length: int) -> dict[str, Any]:
        features: dict[str, Any] = {{"input_ids": tokenizer.encode(str(record["text"]))[:max_length]}}
        if "label" in record:
            label = str(record["label"])
            if label not in self.config.labels:
                known = ", ".join(self.config.labels)
                raise RecordError(f"label '{{label}}' is not one of the training labels: {{known}}")
            features["label"] = self.config.labels.index(label)
        return features

    def forward(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor | None, **features: torch.Tensor
    ) -> HeadOutput:
        if attention_mask is None:
            attention_mask = torch.ones(hidden.shape[:2], device=hidden.device)
        weights = attention_mask.to(hidden.dtype)[..., None]
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
        logits = self.score(self.norm(pooled))
        losses = {{}}
        if "label" in features:
            losses["loss"] = torch.nn.functional.cross_entropy(logits.float(), features["label"].long())
        return HeadOutput(logits=logits, losses=losses)

    def predict(
        self, model: torch.nn.Module, tokenizer: Any, records: list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        features = [self.encode({{"text": r["text"]}}, tokenizer, 512) for r in records]
        batch = pad_features(features, pad_id(tokenizer))
        output = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        probabilities = output.heads[self.name].logits.softmax(-1)
        labels = self.config.labels
        best = [(labels[int(p.argmax())] if labels else None, float(p.max())) for p in probabilities]
        return [{{"label": label, "score": score}} for label, score in best]

    def metrics(self, predictions: list[dict[str, Any]], records: list[dict[str, Any]]) -> dict[str, float]:
        right = sum(p["label"] == str(r["label"]) for p, r in zip(predictions, records, strict=True))
        return {{"accuracy": right / max(len(records), 1)}}
'''

_HEAD_TESTS = '''
"""The kernel's head conformance suite, then the head's own tests."""

from {package} import {cls}

from dharma_kernel.testing import HeadConformance

RECORDS = [
    {{"text": "the self is not the body", "label": "vedanta"}},
    {{"text": "act without attachment to the fruit", "label": "karma"}},
    {{"text": "devotion to the beloved", "label": "bhakti"}},
]


class Test{cls}Conformance(HeadConformance):
    plugin = {cls}
    config = {{"labels": ["bhakti", "karma", "vedanta"]}}
    records = RECORDS


def test_fit_config_learns_the_sorted_labels():
    config = {cls}.fit_config({cls}.Config(), RECORDS)
    assert config.labels == ["bhakti", "karma", "vedanta"]
'''

_HEAD_README = """
# {distribution}

The `{ref}` task head for [Dharma](https://pypi.org/project/dharma-kernel/): a
`{cls}` class in `{package}/__init__.py`, written for MODULE_API {api}. It reads
records with `text` and `label` fields.

```
pip install -e .          # installs it (and dharma-kernel) into this environment
pytest                    # the kernel's head conformance suite and this plugin's tests
dharma plugins --check    # lists {ref} as ok
```

Use it in a manifest:

```toml
[[heads]]
plugin = "{ref}"
```

The contract the tests check is in the kernel's docs/AUTHORING.md and docs/HEADS.md.
"""

_MODULE = {
    "pyproject.toml": _PYPROJECT.replace("{kind_word}", "module"),
    "README.md": _MODULE_README,
    "{package}/__init__.py": _MODULE_SOURCE,
    "tests/test_{name}.py": _MODULE_TESTS,
}
_HEAD = {
    "pyproject.toml": _PYPROJECT.replace("{kind_word}", "task head"),
    "README.md": _HEAD_README,
    "{package}/__init__.py": _HEAD_SOURCE,
    "tests/test_{name}.py": _HEAD_TESTS,
}
