import json

import pytest
import torch

from dlmscope import DLMScopeError
from dlmscope.data import CORPUS_VERSION, builtin_corpus, corpus_stats, load_texts, pack


def test_corpus_split_deterministic_and_disjoint(tmp_path, monkeypatch):
    train, held = builtin_corpus("train"), builtin_corpus("heldout")
    assert len(train) > 8000 and 200 < len(held) < 0.1 * len(train)
    assert not set(train) & set(held) and len(set(train)) == len(train)
    stats = corpus_stats()
    assert stats["train"]["characters"] > 1_000_000 and stats["heldout"]["documents"] == len(held)
    assert all(len(d) >= 40 and "\n" not in d and ">>>" not in d for d in train[:2000])
    monkeypatch.setenv("DLMSCOPE_CACHE", str(tmp_path))  # a fresh build equals the cached one
    assert builtin_corpus("heldout") == held and builtin_corpus("train") == train
    cache = next(tmp_path.glob(f"corpus-v{CORPUS_VERSION}-*.json"))
    cache.write_text("{not json")  # a damaged cache is rebuilt
    assert builtin_corpus("heldout") == held and json.loads(cache.read_text())["heldout"] == held
    with pytest.raises(DLMScopeError, match="unknown split 'test'; allowed: train, heldout"):
        builtin_corpus("test")


def test_load_texts_formats_and_errors(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\nstill first\n\n\nsecond doc\n")
    assert load_texts(str(tmp_path / "a.txt")) == ["first doc\nstill first", "second doc"]
    assert load_texts(str(tmp_path / "a.txt"), limit=1) == ["first doc\nstill first"]
    (tmp_path / "a.jsonl").write_text('{"body": "x y"}\n{"body": "z"}\n')
    assert load_texts(str(tmp_path / "a.jsonl"), column="body") == ["x y", "z"]
    import pandas as pd

    pd.DataFrame({"text": ["p q", "r"]}).to_parquet(tmp_path / "a.parquet")
    assert load_texts(str(tmp_path / "a.parquet")) == ["p q", "r"]
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["d1", "d2"]}),
                          "test": datasets.Dataset.from_dict({"text": ["t1"]})}).save_to_disk(str(tmp_path / "ds"))
    assert load_texts(str(tmp_path / "ds"), split="test") == ["t1"]
    assert load_texts("builtin", split="heldout", limit=3) == builtin_corpus("heldout")[:3]

    def fails(match, source, **kw):
        with pytest.raises(DLMScopeError, match=match) as err:
            load_texts(source, **kw)
        assert "\n" not in str(err.value)

    fails("text file '.*missing.txt' does not exist", str(tmp_path / "missing.txt"))
    (tmp_path / "a.csv").write_text("x")
    fails("unknown text file type '.csv'", str(tmp_path / "a.csv"))
    fails("has no column 'text'; available: body", str(tmp_path / "a.jsonl"))
    fails("has no split 'validation'; available: train, test", str(tmp_path / "ds"), split="validation")
    (tmp_path / "empty.txt").write_text("\n\n")
    fails("has no non-empty texts", str(tmp_path / "empty.txt"))
    (tmp_path / "empty.jsonl").write_text('{"text": ""}\n')
    fails("has no non-empty texts", str(tmp_path / "empty.jsonl"))
    fails("cannot load dataset 'no-such-dataset-xyz' offline", "no-such-dataset-xyz")
    fails("limit=0 must be a positive", "builtin", limit=0)


def test_pack_cross_document(tokenizer):
    texts = ["hello world", "another document here", "third"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    p = pack(tokenizer, texts * 5, 8)
    flat, docs = p.input_ids.flatten(), p.doc_ids.flatten()
    assert p.input_ids.shape[1] == 8 and p.input_ids.dtype == torch.long and p.doc_ids.shape == p.input_ids.shape
    assert bool(p.attention_mask.all())
    starts = torch.nonzero(flat == bos).flatten().tolist()
    assert starts[0] == 0 and docs[starts].tolist() == list(range(len(starts)))  # BOS opens each document
    for d in range(len(starts) - 1):  # each full document is BOS, its tokens, EOS
        span = flat[docs == d].tolist()
        assert span[0] == bos and span[-1] == eos and bos not in span[1:-1] and eos not in span[:-1]
        assert tokenizer.decode(span[1:-1]) == texts[d % 3]
    with pytest.raises(DLMScopeError, match="fewer than one row of 512"):
        pack(tokenizer, ["hi"], 512)


def test_pack_one_document_per_row(tokenizer):
    long = " ".join(["word"] * 30)
    q = pack(tokenizer, ["short one", long, "x"], 16, cross_document=False)
    pad = tokenizer.pad_token_id
    n_long = len(tokenizer(long, add_special_tokens=False)["input_ids"]) + 2
    assert q.input_ids.shape == (2 + -(-n_long // 16), 16)
    for row, docs, mask in zip(q.input_ids, q.doc_ids, q.attention_mask):
        assert len(set(docs[docs >= 0].tolist())) == 1  # no leakage between documents
        assert torch.equal(mask.bool(), docs >= 0) and bool((row[~mask.bool()] == pad).all())
    rows_of_long = q.input_ids[q.doc_ids[:, 0] == 1]
    flat = rows_of_long[q.attention_mask[q.doc_ids[:, 0] == 1].bool()].tolist()
    assert flat[0] == tokenizer.bos_token_id and flat[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(flat[1:-1]) == long  # a long document continues over rows, nothing dropped
    with pytest.raises(DLMScopeError, match="no texts"):
        pack(tokenizer, [], 16, cross_document=False)


def test_tests_never_write_to_the_users_cache():
    from pathlib import Path

    from dlmscope.data import cache_dir

    assert not cache_dir().is_relative_to(Path.home() / ".cache")  # tests/conftest.py's temporary_cache


def test_corpus_reads_only_the_pinned_modules(tmp_path, monkeypatch):
    """Modules outside the pinned list never add text; a pinned one that does not import is named in a warning."""
    import dlmscope.corpus_modules as pinned
    from dlmscope.data import _extract_docstrings

    assert pinned.TOP_LEVEL[:3] == ("abc", "aifc", "argparse") and "nt" not in pinned.TOP_LEVEL
    assert len(pinned.TOP_LEVEL) == 201 and len(pinned.SUBMODULES) == 321
    core, extra, missing = _extract_docstrings(["json", "no_such_module"], ["json.decoder"])
    assert missing == ["no_such_module"] and core[0].startswith("JSON (JavaScript Object Notation)")
    assert any(d.startswith("Simple JSON <https://json.org> decoder") for d in extra)
    monkeypatch.setenv("DLMSCOPE_CACHE", str(tmp_path))
    monkeypatch.setattr(pinned, "TOP_LEVEL", ("json", "no_such_module"))
    monkeypatch.setattr(pinned, "SUBMODULES", ())
    with pytest.warns(UserWarning, match=r"1 pinned standard-library module\(s\) do not import .*\(no_such_module\)"):
        stats = corpus_stats()
    assert stats["train"]["documents"] + stats["heldout"]["documents"] < 3000  # topic prose + json only
