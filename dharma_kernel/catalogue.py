"""The standard modules, by family: what ``include = ["all"]`` and family names mean.

A manifest that asks for ``all`` or a family gets every standard module of it and
every installed third-party module of that family; a standard module that is not
installed is an error naming its distribution, never a silent omission.
"""

from __future__ import annotations

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
