import pytest

from dlmscope import DLMScopeError
from dlmscope.data import builtin_corpus
from dlmscope.tasks import task_corpus
from dlmscope.tokenizer import train_tokenizer


def test_special_ids_and_round_trip(tokenizer):
    ids = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.mask_token_id]
    assert ids == [0, 1, 2, 3]
    assert [tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.mask_token] == \
        ["<|bos|>", "<|eos|>", "<|pad|>", "<|mask|>"]
    samples = builtin_corpus("heldout")[:50] + task_corpus(3) + \
        ["Sudoku: 1030 café ✓ 日本", "a , b . c ' d", "  two  spaces\tand\ttabs\n\nnew lines  ", ""]
    for text in samples:
        assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_digits_one_per_token(tokenizer):
    for digits in ("1234341221434321", "0000", "9876543210"):
        tokens = tokenizer.convert_ids_to_tokens(tokenizer(digits, add_special_tokens=False)["input_ids"])
        assert tokens == list(digits)
    ids = tokenizer("Sudoku: 1030040002001304\nSolution: ", add_special_tokens=False)["input_ids"]
    assert sum(tokenizer.convert_ids_to_tokens(i).isdigit() for i in ids) == 16


def test_save_and_load(tokenizer, tmp_path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tokenizer.save_pretrained(str(tmp_path))
    assert (tmp_path / "tokenizer.json").is_file() and (tmp_path / "tokenizer_config.json").is_file()
    text = "Countdown: 3 7 25 -> 46\nEquation: 25+3*7"
    for cls in (AutoTokenizer, PreTrainedTokenizerFast):
        loaded = cls.from_pretrained(str(tmp_path))
        assert loaded.mask_token_id == 3 and loaded.pad_token == "<|pad|>"
        assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_vocab_size_and_errors():
    tok = train_tokenizer(builtin_corpus("train")[:200], vocab_size=400)
    assert len(tok) == 400
    with pytest.raises(DLMScopeError, match="vocab_size=100 is too small"):
        train_tokenizer(["abc"], vocab_size=100)
