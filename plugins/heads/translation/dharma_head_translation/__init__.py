"""Translation head: the language model learns to continue a source text with its translation."""

from .head import Translation, TranslationConfig

__all__ = ["Translation", "TranslationConfig"]
