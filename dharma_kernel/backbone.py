"""Load the Hugging Face causal LM that modules plug into, and find its blocks."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from .errors import DharmaError, error_line, first_line
from .suggest import closest

# DistilGPT2's shape: what `config = {}` builds when a key is not given.
GPT2_DEFAULTS: dict[str, Any] = {"n_layer": 6, "n_embd": 768, "n_head": 12, "n_positions": 1024}


def backbone_config(pretrained: str | None, config: dict[str, Any] | None) -> PretrainedConfig:
    """The backbone's HF config, from a hub id / directory or from manifest keys (fresh weights)."""
    if pretrained is not None:
        try:
            return AutoConfig.from_pretrained(pretrained)
        except (OSError, ValueError) as err:
            raise DharmaError(
                f"backbone.pretrained: cannot load config of '{pretrained}': {first_line(err)}",
                hint="Give a local model directory, or a hub id while online (downloads are cached).",
            ) from err
    values = dict(config or {})
    architecture = values.pop("architecture", "gpt2")
    try:
        config_class = AutoConfig.for_model(architecture).__class__
    except ValueError as err:
        raise DharmaError(
            f"backbone.config.architecture: unknown architecture '{architecture}'",
            hint="Use a transformers model type such as 'gpt2' or 'llama'.",
        ) from err
    _check_config_keys(config_class, values)
    if architecture == "gpt2":
        values = {**GPT2_DEFAULTS, **values}
        if "vocab_size" in values:  # GPT-2's end-of-text is its last id; keep it inside a smaller vocabulary
            for key in ("bos_token_id", "eos_token_id"):
                values.setdefault(key, values["vocab_size"] - 1)
    try:
        return config_class(**values)
    except Exception as err:  # transformers' own checks of values and types
        raise DharmaError(f"backbone.config: {error_line(err)}") from None


def _check_config_keys(config_class: type[PretrainedConfig], values: dict[str, Any]) -> None:
    valid = (
        {f.name for f in dataclasses.fields(config_class)}
        if dataclasses.is_dataclass(config_class)
        else set()
    )
    valid |= set(getattr(config_class, "attribute_map", {}))
    if not valid:
        return
    problems = []
    for key in values:
        if key not in valid:
            guess = closest(key, valid)
            hint = f"; did you mean '{guess}'?" if guess else ""
            problems.append(f"backbone.config.{key}: unknown key for {config_class.model_type}{hint}")
    if problems:
        raise DharmaError("\n".join(problems))


def load_backbone(pretrained: str | None, config: PretrainedConfig) -> PreTrainedModel:
    """Pretrained weights when ``pretrained`` is set, else fresh weights from ``config``."""
    if pretrained is None:
        return fresh_backbone(config)
    try:
        return AutoModelForCausalLM.from_pretrained(pretrained, config=config)
    except (OSError, ValueError) as err:
        raise DharmaError(f"backbone.pretrained: cannot load '{pretrained}': {first_line(err)}") from err


def fresh_backbone(config: PretrainedConfig) -> PreTrainedModel:
    """Randomly initialised weights of ``config``'s shape; a shape the model rejects is a DharmaError."""
    try:
        return AutoModelForCausalLM.from_config(config)
    except (ValueError, TypeError, AssertionError, RuntimeError) as err:
        problem = error_line(err)
        raise DharmaError(f"backbone.config: {config.model_type} rejects this shape: {problem}") from None


# Where common architectures keep their transformer blocks.
_BLOCK_PATHS = (
    "transformer.h",
    "model.layers",
    "gpt_neox.layers",
    "model.decoder.layers",
    "transformer.layers",
)


def find_blocks(model: nn.Module, num_layers: int) -> nn.ModuleList:
    """The model's list of transformer blocks: a known path, else the ModuleList of ``num_layers``."""
    for path in _BLOCK_PATHS:
        blocks = _get_path(model, path)
        if isinstance(blocks, nn.ModuleList) and len(blocks) == num_layers:
            return blocks
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            return module
    raise DharmaError(
        f"cannot find the {num_layers} transformer blocks of {type(model).__name__}",
        hint="Dharma supports GPT-2 and Llama-style causal LMs; please report this architecture.",
    )


def num_layers(config: PretrainedConfig) -> int:
    return int(config.get_text_config().num_hidden_layers)


def hidden_size(config: PretrainedConfig) -> int:
    return int(config.get_text_config().hidden_size)


def _get_path(module: nn.Module, path: str) -> Any:
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


_CONTEXT_KEYS = ("n_positions", "max_position_embeddings", "n_ctx")


def context_length(config: Any, default: int | None = None) -> int:
    """The most tokens the backbone attends over, from its config (an object or config.json's dict);
    ``default`` when the config does not say, or a DharmaError when there is no default."""
    for key in _CONTEXT_KEYS:
        value = config.get(key) if isinstance(config, dict) else getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    if default is None:
        raise DharmaError("the model's config does not say its context length (n_positions)")
    return default
