"""Freeze groups: ``backbone``, ``spiritual`` (every module and router), a family, a ref, ``heads``."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from .catalogue import families_of
from .errors import DharmaError
from .model import DharmaModel
from .stack import module_key
from .suggest import pick_ref

SPECIAL_GROUPS = ("backbone", "spiritual", "heads")


def group_parameters(model: DharmaModel, group: str) -> list[nn.Parameter]:
    """The parameters a freeze group names; a DharmaError for a group the model lacks."""
    if group == "backbone":
        return list(model.backbone.parameters())
    if group == "spiritual":
        return list(model.stacks.parameters())
    if group == "heads":
        return list(model.heads.parameters())
    refs = model.module_refs
    families = families_of(refs)  # the standard six, and any a plugin in this model declares
    if group in families:
        chosen = [ref for ref in refs if ref.split(".")[0] == group]
    else:
        chosen = [pick_ref(group, [*SPECIAL_GROUPS, *families, *refs], "freeze", "a group of this model")]
        if chosen[0] in SPECIAL_GROUPS or chosen[0] in families:
            return group_parameters(model, chosen[0])
    return [
        param
        for stack in model.stacks.values()
        for ref in chosen
        if module_key(ref) in stack.members
        for param in stack.members[module_key(ref)].parameters()
    ]


def freeze_groups(model: DharmaModel, groups: Iterable[str]) -> None:
    """Turn off gradients for every named group; at least one parameter must stay trainable."""
    groups = list(dict.fromkeys(groups))
    for group in groups:
        for param in group_parameters(model, group):
            param.requires_grad_(False)
    if not any(p.requires_grad for p in model.parameters()):
        raise DharmaError(
            f"freezing {', '.join(groups)} leaves no trainable parameters",
            hint="Freeze fewer groups, e.g. only 'backbone', so something is left to train.",
        )


@dataclass(frozen=True)
class GroupCount:
    group: str
    parameters: int
    trainable: int


def parameter_table(model: DharmaModel) -> list[GroupCount]:
    """Parameters and trainable parameters of the backbone, each family, the routers, heads, total.

    Tied tensors (input and output embeddings) count once.
    """
    rows: list[tuple[str, list[nn.Parameter]]] = [("backbone", list(model.backbone.parameters()))]
    for family in sorted({ref.split(".")[0] for ref in model.module_refs}):
        rows.append((family, group_parameters(model, family)))
    routers = [p for s in model.stacks.values() for p in s.router_parameters()]
    if routers:
        rows.append(("routers", routers))
    if len(model.heads):
        rows.append(("heads", list(model.heads.parameters())))
    rows.append(("total", list(model.parameters())))
    return [_count(group, params) for group, params in rows]


def _count(group: str, params: list[nn.Parameter]) -> GroupCount:
    unique = {id(p): p for p in params}.values()
    return GroupCount(
        group, sum(p.numel() for p in unique), sum(p.numel() for p in unique if p.requires_grad)
    )
