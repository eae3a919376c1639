"""From a manifest to a model: resolve plugins, check layers, build (on meta or for real)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import registry
from .backbone import backbone_config, load_backbone, num_layers
from .catalogue import FAMILIES, distribution_for, families_of, family_problem, standard_refs
from .checkpoint import make_lock
from .errors import DharmaError, first_line
from .manifest import Manifest, TrainedTokenizer, check_requires, load_manifest
from .model import DharmaConfig, DharmaModel, plugin_config
from .suggest import did_you_mean, matching_refs, pick_ref

if TYPE_CHECKING:
    from transformers import PretrainedConfig


@dataclass
class Plan:
    """Everything needed to build the model, resolved, without weights."""

    config: DharmaConfig
    pretrained: str | None


def select_modules(include: list[str], exclude: list[str]) -> list[str]:
    """Module refs named by ``include`` minus ``exclude``, in catalogue order then installed order.

    ``all`` and family names mean every standard module of them plus installed
    third-party ones; a missing standard module is an error, never silently skipped.
    Installed but broken plugins count as installed: loading them says why they are broken.
    """
    installed = [p.ref for p in registry.discover("module")]
    known = list(dict.fromkeys(standard_refs() + installed))
    # DHARMA_PLUGINS and --no-plugin: a disabled module named outright is an error saying so
    off = {p.ref: p.disabled for p in registry.disabled_plugins("module")}
    chosen = [ref for entry in include for ref in _expand(entry, known, "modules.include", off)]
    dropped = {ref for entry in exclude for ref in _expand(entry, known, "modules.exclude", off)}
    chosen = [ref for ref in dict.fromkeys(chosen) if ref not in dropped]
    missing = [ref for ref in chosen if ref not in installed]
    if missing:
        lines = [f"{ref}: {off.get(ref) or 'pip install ' + distribution_for(ref)}" for ref in missing]
        disabled = set(missing) <= set(off)
        raise DharmaError(
            f"modules.include needs {len(missing)} module(s) that are "
            f"{'disabled' if disabled else 'not installed'}:\n  " + "\n  ".join(lines),
            hint=f"{'Allow' if disabled else 'Install'} them, or drop them with modules.exclude, "
            "or list only the modules you have.",
        )
    return chosen


def _expand(entry: str, known: list[str], where: str, off: dict[str, str] | None = None) -> list[str]:
    families = families_of(known)
    if entry == "all":
        return known
    if entry in families:
        return [ref for ref in known if ref.split(".")[0] == entry]
    refs = list(dict.fromkeys([*known, *(off or {})]))
    if not matching_refs(entry, refs):
        names = [*refs, *(ref.rpartition(".")[2] for ref in refs), *families]
        new = [family for family in families if family not in FAMILIES and not family_problem(family)]
        raise DharmaError(
            f"{where}: '{entry}' is not a known module or family{did_you_mean(entry, names)}",
            hint=f"families are: {', '.join(FAMILIES)}"
            + (f"; from installed plugins: {', '.join(new)}" if new else "")
            + "; `dharma plugins` lists the installed modules",
        )
    return [pick_ref(entry, refs, where)]


def resolve_layout(manifest: Manifest, depth: int) -> dict[str, Any]:
    """The model's layout: module refs with full configs, layers, composition, heads, loss weights."""
    section = manifest.modules
    refs = select_modules(section.include, section.exclude)
    for layer in section.at_layers:
        if not 0 <= layer < depth:
            raise DharmaError(
                f"modules.at_layers: layer {layer} is out of range; this backbone has layers 0 to {depth - 1}"
            )
    if section.composition == "routed" and refs and section.top_k > len(refs):
        raise DharmaError(f"modules.top_k: {section.top_k} is larger than the stack of {len(refs)} module(s)")
    if section.capacity_factor is not None and section.composition != "routed":
        raise DharmaError(
            f"modules.capacity_factor applies to routed stacks; this one is {section.composition}",
            hint='Set composition = "routed", or remove capacity_factor.',
        )
    overrides = _resolve_overrides(section.override, refs)
    modules = []
    for ref in refs:
        cls = registry.load(registry.resolve(ref, "module"))
        values = cls.make_config(section.preset).model_dump() | overrides.get(ref, {})
        config = plugin_config(cls, values, f"modules.override.{ref}")
        modules.append({"ref": ref, "config": config.model_dump(mode="json")})
    heads = []
    for index, head in enumerate(manifest.heads):
        cls = registry.load(registry.resolve(head.plugin, "head"))
        values = cls.make_config(section.preset).model_dump() | head.config
        config = plugin_config(cls, values, f"heads[{index}].config")
        heads.append({"plugin": head.plugin, "config": config.model_dump(mode="json")})
    return {
        "at_layers": sorted(section.at_layers) if refs else [],
        "composition": section.composition,
        "top_k": section.top_k,
        "capacity_factor": section.capacity_factor,
        "preset": section.preset,
        "modules": modules,
        "heads": heads,
        "loss": manifest.loss.model_dump(),
    }


def _resolve_overrides(overrides: dict[str, dict[str, Any]], refs: list[str]) -> dict[str, dict[str, Any]]:
    resolved: dict[str, dict[str, Any]] = {}
    for key, values in overrides.items():
        ref = pick_ref(key, refs, f"modules.override.{key}", "a module in this manifest")
        if ref in resolved:
            raise DharmaError(f"modules.override.{key}: {ref} is overridden twice; merge the two tables")
        resolved[ref] = values
    return resolved


def plan(manifest: Manifest) -> Plan:
    """Resolve the manifest into a model config; loads plugin classes, allocates no weights."""
    pretrained = _local_or_hub(manifest, manifest.backbone.pretrained, "backbone.pretrained")
    text = manifest_backbone_config(manifest)
    layout = resolve_layout(manifest, num_layers(text))
    config = DharmaConfig(
        text_config=text.to_dict(), layout=layout, manifest=manifest.to_dict(), lock=make_lock(layout)
    )
    return Plan(config=config, pretrained=pretrained)


def manifest_backbone_config(manifest: Manifest) -> PretrainedConfig:
    """The ``[backbone]``'s config: the pretrained one, or a fresh one from ``backbone.config``.

    A fresh backbone whose tokenizer is trained with a ``vocab_size`` gets that many embeddings
    when ``backbone.config`` sets none: else it keeps the architecture's default (GPT-2's 50,257
    rows), nearly all of them never used.
    """
    pretrained = _local_or_hub(manifest, manifest.backbone.pretrained, "backbone.pretrained")
    values = manifest.backbone.config
    spec = manifest.backbone.tokenizer
    trained = isinstance(spec, TrainedTokenizer) and spec.vocab_size is not None
    if pretrained is None and trained and "vocab_size" not in (values or {}):
        values = {**(values or {}), "vocab_size": spec.vocab_size}
    return backbone_config(pretrained, values)


def plan_manifest(path: str | Path) -> tuple[Manifest, Plan]:
    """Load, check ``requires`` and plan: what ``dharma validate`` and ``assemble`` start with."""
    manifest = load_manifest(path)
    if manifest.finetune is not None:  # its model is the foundation plus a head, not the [backbone]
        raise DharmaError(
            f"{path} fine-tunes {manifest.finetune.from_} ([finetune]): it describes no model to build",
            hint=f"Run it with: dharma train {path}",
        )
    check_requires(manifest)
    return manifest, plan(manifest)


def _local_or_hub(manifest: Manifest, name: str | None, key: str) -> str | None:
    """A path relative to the manifest when it exists there, else the name as given (a hub id)."""
    if name is None:
        return None
    local = manifest.resolve_path(name)
    if local.exists():
        return str(local)
    if name.startswith((".", "/", "~")):
        raise DharmaError(f"{key}: directory '{local}' does not exist")
    return name


def load_tokenizer(manifest: Manifest) -> Any:
    """The manifest's tokenizer, else the pretrained backbone's when it has one, else None.

    None also when the manifest asks for a BPE trained on the corpus: training does that.
    """
    from transformers import AutoTokenizer

    given = manifest.backbone.tokenizer
    if given is not None and not isinstance(given, str):
        return None
    explicit = given is not None
    key = "backbone.tokenizer" if explicit else "backbone.pretrained"
    name = _local_or_hub(manifest, given or manifest.backbone.pretrained, key)
    if name is None:
        return None
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as err:
        if not explicit:
            return None  # a backbone directory without tokenizer files
        raise DharmaError(f"backbone.tokenizer: cannot load '{name}': {first_line(err)}") from None
    if tokenizer.vocab_size == 0:  # transformers builds an empty one from a bare config.json
        if not explicit:
            return None
        raise DharmaError(f"backbone.tokenizer: '{name}' holds no tokenizer files")
    return tokenizer


def build_on_meta(plan_: Plan) -> DharmaModel:
    """The full model on the meta device: shapes and parameter counts, no memory."""
    with torch.device("meta"):
        return DharmaModel(plan_.config)


def build(plan_: Plan, seed: int = 0) -> DharmaModel:
    """The model with real weights: pretrained backbone or fresh, modules seeded."""
    torch.manual_seed(seed)
    backbone = load_backbone(plan_.pretrained, plan_.config.text_config)
    return DharmaModel(plan_.config, backbone=backbone)


def build_model(backbone: dict[str, Any], layout: dict[str, Any], seed: int = 0) -> DharmaModel:
    """A model from a fresh backbone config and a layout, for tests and notebooks."""
    text = backbone_config(None, backbone)
    layout = {
        "composition": "sequential",
        "top_k": 2,
        "modules": [],
        "heads": [],
        "at_layers": [],
        "loss": {"lm": 1.0, "concept": 0.1, "router": 0.01},
        **layout,
    }
    config = DharmaConfig(text_config=text.to_dict(), layout=layout, manifest=None, lock=make_lock(layout))
    return build(Plan(config=config, pretrained=None), seed=seed)
