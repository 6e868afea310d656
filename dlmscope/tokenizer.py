"""A small byte-level BPE tokenizer for the built-in models, with digits split one per token."""

from __future__ import annotations

from collections.abc import Iterable

SPECIAL_TOKENS = {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>", "mask_token": "<|mask|>"}
"""Fixed ids 0..3 in this order, so every model trained with it agrees on them."""


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096):
    """Train BPE on `texts` and return a transformers `PreTrainedTokenizerFast`.

    Each digit is its own token (a Sudoku cell is one position), and byte-level pre-tokenisation
    makes every string round-trip.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)
