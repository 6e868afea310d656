"""A small byte-level BPE tokenizer for the built-in models, with digits split one per token."""

from __future__ import annotations

from collections.abc import Iterable

SPECIAL_TOKENS = {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>", "mask_token": "<|mask|>"}
"""Ids 0, 1, 2, 3 in this order (BOS, EOS, pad, mask), so every model trained with it agrees on them."""


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096):
    """Train BPE on `texts` and return a transformers `PreTrainedTokenizerFast`.

    Each digit is its own token (a Sudoku cell is one position, a number's digits line up), and
    byte-level pre-tokenisation makes every string round-trip through encode/decode. Save it with
    `save_pretrained(folder)` (tokenizer.json + tokenizer_config.json); `AutoTokenizer.from_pretrained`
    loads it back. It adds no special tokens by itself: `dlmscope.data.pack` and the models put BOS/EOS.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from .errors import DLMScopeError

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(SPECIAL_TOKENS):
        raise DLMScopeError(f"vocab_size={vocab_size} is too small; need at least "
                            f"{len(alphabet) + len(SPECIAL_TOKENS)} (256 bytes + 4 special tokens)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS.values()),
                                  initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, **SPECIAL_TOKENS)
