import pytest
import torch

from dlmscope import DLMScopeError
from dlmscope.data import builtin_corpus, load_texts, pack


def test_corpus_split_deterministic_and_disjoint():
    train, held = builtin_corpus("train"), builtin_corpus("heldout")
    assert len(train) > 3000 and len(held) > 50
    assert not set(train) & set(held)
    assert builtin_corpus("train") == train


def test_load_texts_formats_and_errors(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\n\nsecond doc\n")
    assert load_texts(str(tmp_path / "a.txt")) == ["first doc", "second doc"]
    (tmp_path / "a.jsonl").write_text('{"body": "x y"}\n{"body": "z"}\n')
    assert load_texts(str(tmp_path / "a.jsonl"), column="body") == ["x y", "z"]
    import pandas as pd

    pd.DataFrame({"text": ["p q", "r"]}).to_parquet(tmp_path / "a.parquet")
    assert load_texts(str(tmp_path / "a.parquet")) == ["p q", "r"]
    with pytest.raises(DLMScopeError, match="does not exist"):
        load_texts(str(tmp_path / "missing.txt"))
    with pytest.raises(DLMScopeError, match="unknown corpus file type"):
        (tmp_path / "a.csv").write_text("x")
        load_texts(str(tmp_path / "a.csv"))
    with pytest.raises(DLMScopeError, match="no column 'text'; available: body"):
        load_texts(str(tmp_path / "a.jsonl"))
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(DLMScopeError, match="is empty"):
        load_texts(str(tmp_path / "empty.txt"))


def test_pack(tokenizer):
    texts = ["hello world", "another document here"]
    p = pack(tokenizer, texts * 10, 8)
    flat = p.input_ids.flatten().tolist()
    assert flat[0] == tokenizer.bos_token_id and tokenizer.eos_token_id in flat
    q = pack(tokenizer, texts, 16, cross_document=False)
    for row, docs in zip(q.input_ids, q.doc_ids):
        assert len(set(docs[docs >= 0].tolist())) == 1 and row[0] == tokenizer.bos_token_id
    with pytest.raises(DLMScopeError, match="fewer than one row"):
        pack(tokenizer, ["hi"], 512)


def test_tokenizer_roundtrip_and_specials(tokenizer, tmp_path):
    assert [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.mask_token_id] == [0, 1, 2, 3]
    for text in builtin_corpus("heldout")[:20] + ["Sudoku: 1030 café ✓"]:
        assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    ids = tokenizer("1234", add_special_tokens=False)["input_ids"]
    assert len(ids) == 4
    tokenizer.save_pretrained(str(tmp_path))
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(tmp_path)).mask_token_id == 3
