"""The standard modules, by family: what ``include = ["all"]`` and family names mean.

A manifest that asks for ``all`` or a family gets every standard module of it and
every installed third-party module of that family; a standard module that is not
installed is an error naming its distribution, never a silent omission.

A family is only the name a module declares. Besides the six standard ones, a
plugin may declare a new family (``stoics``): once installed, its name is an include
name and a freeze group like the standard ones. :func:`family_problem` says which
new names cannot be one.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable

STANDARD_MODULES: dict[str, tuple[str, ...]] = {
    "paths": ("dharma", "karma", "moksha", "bhakti", "jnana", "ahimsa", "seva", "yoga"),
    "consciousness": ("atman", "chitta", "manas", "ahamkara", "ananda", "dhyana", "smarana", "sankalpa"),
    "life": ("grihastha", "varna", "kama", "tapas", "shraddha"),
    "energy": ("shakti", "shanti", "satya", "guru"),
    "crisis": ("career", "financial", "health", "clarity", "leadership", "wellness"),
    "darshanas": ("vedanta", "yoga", "samkhya", "nyaya", "vaisheshika", "mimamsa"),
}

FAMILIES: tuple[str, ...] = tuple(STANDARD_MODULES)

STANDARD_HEADS: tuple[str, ...] = ("qa", "classification", "translation")

# Words a manifest or --freeze already gives a meaning (include "all"; the freeze groups and
# the parameter table's rows): a family by one of these names could never be asked for.
RESERVED_NAMES: tuple[str, ...] = ("all", "backbone", "spiritual", "heads", "routers", "total")

_IDENTIFIER = re.compile(r"[a-z][a-z0-9_]*")


def family_problem(family: str) -> str | None:
    """Why ``family`` cannot be a module family, or None (every standard family is fine).

    A new family must be a lower-case identifier, must not be a reserved word or a standard
    module's short name (``yoga`` in a manifest would then mean two things), and must not be
    one letter away from a standard family: ``darshana`` is a misspelling, not a new family.
    """
    if family in FAMILIES:
        return None
    if not _IDENTIFIER.fullmatch(family):
        return f"family '{family}' is not a lower-case identifier"
    if family in RESERVED_NAMES:
        return f"family '{family}' is a reserved word ({', '.join(RESERVED_NAMES)})"
    owners = [ref for ref in standard_refs() if ref.split(".")[1] == family]
    if owners:
        return f"family '{family}' is already a standard module's name ({' and '.join(owners)})"
    near = [f for f in FAMILIES if _one_edit_apart(family, f)]
    if near:
        return f"unknown family '{family}'; did you mean '{near[0]}'?"
    return None


def _one_edit_apart(a: str, b: str) -> bool:
    """One letter inserted, deleted or replaced turns ``a`` into ``b``."""
    if abs(len(a) - len(b)) > 1:
        return False
    ops = [op for op in difflib.SequenceMatcher(None, a, b).get_opcodes() if op[0] != "equal"]
    return len(ops) == 1 and max(op[2] - op[1] for op in ops) <= 1 and max(op[4] - op[3] for op in ops) <= 1


def families_of(refs: Iterable[str]) -> list[str]:
    """The standard families, then every other family the module ``refs`` declare, sorted."""
    others = sorted({ref.split(".")[0] for ref in refs} - set(FAMILIES))
    return [*FAMILIES, *others]


def standard_refs(family: str | None = None) -> list[str]:
    families = [family] if family else list(FAMILIES)
    return [f"{f}.{name}" for f in families for name in STANDARD_MODULES.get(f, ())]


def distribution_for(ref: str, kind: str = "module") -> str:
    """The pip distribution that conventionally provides ``ref`` (a full ref or a short name)."""
    if kind == "head":
        return f"dharma-head-{ref.replace('_', '-')}"
    family, _, name = ref.rpartition(".")
    if (family, name) == ("darshanas", "yoga"):
        return "dharma-plugin-yoga-darshana"
    return f"dharma-plugin-{name.replace('_', '-')}"
