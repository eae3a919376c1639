"""How the kernel pads: the id a batch is padded with, and tokenizers saved to pad as generation needs.

Below everything that tokenizes (concept labels, data packing, head batches, generation) and
everything that saves a tokenizer (checkpoints, applications, the Hub), so all of them take it from
here. Importing this module imports neither torch nor transformers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def pad_id(tokenizer: Any) -> int:
    """The id that pads a batch: the tokenizer's pad token, else its end-of-text token, else 0."""
    for value in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if value is not None:
            return int(value)
    return 0


def save_tokenizer(tokenizer: Any, directory: str | Path) -> None:
    """Save ``tokenizer`` ready for batched generation: left padding and a pad token (its
    end-of-text token when it has none), so ``model.generate`` on a padded batch gives each
    prompt what it gives alone. Training pads its own batches, whatever the side saved;
    the object passed in is left as it was."""
    side, pad = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"
    if pad is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        tokenizer.save_pretrained(directory)
    finally:
        tokenizer.padding_side, tokenizer.pad_token = side, pad
