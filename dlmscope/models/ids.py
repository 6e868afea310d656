"""Special token ids (mask, padding, end of sequence) of a loaded checkpoint, released folders included.

The released LLaDA-MoE and LLaDA 2.x folders declare no mask id in config.json, and their tokenizers may
not declare a mask token either: upstream code passes the ids itself. Each id comes from, in order: the
caller (`load_model(..., mask_id=, pad_id=, eos_id=)`), config.json (mask) or the tokenizer (pad, EOS),
the other of the two, then the family's documented upstream default (its registration's `released_ids`,
`models.families`). Pad falls back to EOS.
"""

from __future__ import annotations

from typing import Any

from .. import checks
from .base import LoadedModel
from .families import FAMILIES


_CONFIG_KEYS = {"pad": "pad_token_id", "eos": "eos_token_id"}


def check_overrides(**ids: int | None) -> None:
    """One-line errors for ids given to `load_model`, before anything loads (the vocabulary is checked after)."""
    for name, value in ids.items():
        if value is not None:
            checks.integer(name, value, 0)


def _declared(config: dict, tokenizer: Any, kind: str) -> int | None:
    """The tokenizer's id, else config.json's (a list of EOS ids gives its first)."""
    from_tokenizer = getattr(tokenizer, f"{kind}_token_id", None) if tokenizer is not None else None
    if from_tokenizer is not None:
        return from_tokenizer
    from_config = config.get(_CONFIG_KEYS[kind])
    if isinstance(from_config, list):
        from_config = from_config[0] if from_config else None
    return from_config


def resolve_ids(lm: LoadedModel, config: dict, mask_id: int | None = None, pad_id: int | None = None,
                eos_id: int | None = None) -> LoadedModel:
    """Fill `lm.mask_id`, `pad_id` and `eos_id`: overrides, else what the folder declares, else the family default."""
    for name, value in (("mask_id", mask_id), ("pad_id", pad_id), ("eos_id", eos_id)):
        if value is not None:
            checks.integer(name, value, 0, lm.vocab_size - 1)
    released = FAMILIES[lm.family].released_ids if lm.family in FAMILIES else {}
    defaults = {k: v for k, v in released.items() if v < lm.vocab_size}  # never past the vocab
    if not lm.causal:
        lm.mask_id = mask_id if mask_id is not None else (
            lm.mask_id if lm.mask_id is not None else defaults.get("mask"))
    elif mask_id is not None:
        lm.mask_id = mask_id
    lm.eos_id = eos_id if eos_id is not None else _declared(config, lm.tokenizer, "eos")
    if lm.eos_id is None:
        lm.eos_id = defaults.get("eos")
    lm.pad_id = pad_id if pad_id is not None else _declared(config, lm.tokenizer, "pad")
    if lm.pad_id is None:
        lm.pad_id = lm.eos_id
    return lm
