"""The diffing study's text mix holds the stated share of task tokens, half Countdown and half Sudoku."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))
import diff_rspo  # noqa: E402


@pytest.mark.parametrize("share", [0.2, 0.5])
def test_mixed_text_has_the_stated_task_share(monkeypatch, tmp_path, share):
    import dlmscope.data
    from dlmscope.data import builtin_corpus
    from dlmscope.models import load_model

    prose = builtin_corpus("train")[:300]
    monkeypatch.setattr(dlmscope.data, "load_texts", lambda name, split, *a: prose if split == "train" else [])
    path = diff_rspo.mixed_text(tmp_path, share)
    assert path.name == f"diff_mixed_task{share:g}.txt"
    tok = load_model("dlmscope-tiny-dlm").tokenizer
    docs = path.read_text().strip().split("\n\n")
    counts = {"countdown": 0, "sudoku": 0, "prose": 0}
    for doc, ids in zip(docs, tok(docs)["input_ids"]):
        counts[diff_rspo._is_task_text(doc) or "prose"] += len(ids)
    total = sum(counts.values())
    assert counts["countdown"] / total == pytest.approx(share / 2, abs=0.01)
    assert counts["sudoku"] / total == pytest.approx(share / 2, abs=0.01)
    assert sorted(d for d in docs if diff_rspo._is_task_text(d) is None) == sorted(p.replace("\n\n", "\n") for p in prose)
