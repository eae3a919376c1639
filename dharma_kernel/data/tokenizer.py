"""The tokenizer a run trains with: the manifest's, the backbone's, or a byte-level BPE trained on the corpus.

A trained tokenizer is byte-level (GPT-2's scheme): every string, Devanagari, IAST
diacritics and runs of whitespace included, encodes to tokens that decode back to
it exactly, and nothing is ever an unknown token. It carries the chat template
(:data:`~dharma_kernel.data.chat.CHAT_TEMPLATE`) and its role markers as special
tokens, and pads on the left, as batched generation needs. Save it with
:func:`~dharma_kernel.padding.save_tokenizer` (or ``tokenizer.save_pretrained(directory)``);
``AutoTokenizer.from_pretrained(directory)`` loads it back.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import chain
from typing import TYPE_CHECKING, Any

from ..errors import DharmaError
from ..manifest import Manifest, TrainedTokenizer

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerFast

__all__ = ["END_OF_TEXT", "resolve_tokenizer", "train_tokenizer"]

END_OF_TEXT = "<|endoftext|>"  # GPT-2's: ends every document; also the bos and pad token


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, min_frequency: int = 2, model_max_length: int = 1024
) -> PreTrainedTokenizerFast:
    """A byte-level BPE of at most ``vocab_size`` tokens trained on ``texts`` (any iterable: it is
    streamed, never held whole).

    The vocabulary holds :data:`END_OF_TEXT` (id 0: eos, bos and pad), the chat template's
    role markers ``<|system|>``, ``<|user|>``, ``<|assistant|>`` (ids 1 to 3), the 256 bytes, then
    merges of pairs seen at least ``min_frequency`` times; a small corpus may run out of
    such pairs before ``vocab_size``. No text is normalised, so decoding gives back
    exactly what was encoded, and offsets are character spans in the text as given. The
    same texts give the same vocabulary, whatever the number of threads.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from .chat import CHAT_TEMPLATE, MARKERS

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    # Untrimmed offsets: a token " karma" spans its space too, so no token has an empty span
    # (concept labels ignore tokens with empty spans, as they do special tokens).
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[END_OF_TEXT, *MARKERS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_batches(texts), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=END_OF_TEXT,
        bos_token=END_OF_TEXT,
        pad_token=END_OF_TEXT,
        extra_special_tokens=list(MARKERS),
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,  # " ." stays " .": decoding is exact
        chat_template=CHAT_TEMPLATE,
        padding_side="left",  # batched generation; training pads its own batches
    )


def resolve_tokenizer(
    manifest: Manifest, texts: Iterable[str], text_config: PretrainedConfig | None = None
) -> Any:
    """The tokenizer to train with, checked against the backbone's embedding table, with
    Dharma's chat template when it has none (:func:`~dharma_kernel.data.chat.ensure_chat_template`).

    ``backbone.tokenizer`` names one, or the pretrained backbone brings its own
    (:func:`~dharma_kernel.assemble.load_tokenizer`); otherwise, for a fresh backbone or
    ``tokenizer = { train = true, ... }``, a BPE is trained on ``texts`` (the cleaned
    training texts; only read then) with the spec's ``vocab_size``, else the backbone's.
    ``texts`` may be an iterator; at most ``max_training_chars`` of it is read.
    ``text_config`` is the backbone's config when the caller has it (``plan(manifest).config.text_config``).
    """
    from ..assemble import load_tokenizer
    from ..backbone import context_length
    from .chat import ensure_chat_template

    config = text_config if text_config is not None else _backbone_config(manifest)
    embeddings = int(config.vocab_size)
    spec = manifest.backbone.tokenizer
    tokenizer = load_tokenizer(manifest)
    if tokenizer is None:
        if spec is None and manifest.backbone.pretrained is not None:
            raise DharmaError(
                f"backbone.pretrained: '{manifest.backbone.pretrained}' has no tokenizer files",
                hint="Set backbone.tokenizer to the tokenizer it was trained with. "
                "(backbone.tokenizer = { train = true } trains a new one, which its pretrained "
                "embeddings do not know.)",
            )
        wanted = spec.vocab_size if isinstance(spec, TrainedTokenizer) else None
        size = wanted if wanted is not None else embeddings
        if size > embeddings:
            raise DharmaError(
                f"backbone.tokenizer.vocab_size: {size} is more than the backbone's {embeddings} embeddings",
                hint=f"Set backbone.tokenizer.vocab_size to at most {embeddings}, "
                f"or the backbone's vocab_size to at least {size}.",
            )
        min_frequency = spec.min_frequency if isinstance(spec, TrainedTokenizer) else 2
        remaining = _capped(iter(texts), training_cap(manifest))
        first = next((text for text in remaining if text), None)
        if first is None:
            raise DharmaError("cannot train a tokenizer: there is no training text")
        tokenizer = train_tokenizer(
            chain([first], remaining), size, min_frequency, context_length(config, default=1024)
        )
    if len(tokenizer) > embeddings:
        raise DharmaError(
            f"the tokenizer has {len(tokenizer)} tokens, more than the backbone's {embeddings} embeddings",
            hint=_too_large_hint(manifest, len(tokenizer), embeddings),
        )
    return ensure_chat_template(tokenizer)


def training_cap(manifest: Manifest) -> int:
    """Characters of training text a trained tokenizer learns from (``max_training_chars``)."""
    spec = manifest.backbone.tokenizer
    return spec.max_training_chars if isinstance(spec, TrainedTokenizer) else TrainedTokenizer.DEFAULT_CHARS


def _batches(texts: Iterable[str], size: int = 1000) -> Iterator[list[str]]:
    """The texts in lists of ``size``: the trainer's threads then take the GIL once per list, not once
    per text (about 15% less CPU on a 50 MB sample)."""
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _capped(texts: Iterator[str], max_chars: int) -> Iterator[str]:
    """The texts, in order, until ``max_chars`` characters have been given (the last one whole)."""
    given = 0
    for text in texts:
        if given >= max_chars:
            return
        given += len(text)
        yield text


def _too_large_hint(manifest: Manifest, tokens: int, embeddings: int) -> str:
    if manifest.backbone.config is not None:
        return (
            f"Set vocab_size = {tokens} in backbone.config, or train a tokenizer that fits: "
            f"backbone.tokenizer = {{ train = true, vocab_size = {embeddings} }}."
        )
    return "Use the tokenizer the pretrained backbone was trained with (leave backbone.tokenizer unset)."


def _backbone_config(manifest: Manifest) -> PretrainedConfig:
    from ..assemble import manifest_backbone_config

    return manifest_backbone_config(manifest)
