"""The splice study reuses a finished training run with the same FVUs a fresh run reports."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))
from splice_dlm_vs_ar import trained_saes  # noqa: E402


@pytest.mark.usefixtures("one_thread")
def test_reused_run_reports_the_fvu_of_the_fresh_run(tiny_dirs, tmp_path):
    from dlmscope.data import builtin_corpus
    from dlmscope.training import TrainSAEConfig

    text = tmp_path / "docs.txt"
    text.write_text("\n\n".join(builtin_corpus("train")[:60]))
    cfg = TrainSAEConfig(model=str(tiny_dirs["llada"]), dataset=str(text), layers="0,1", k="4", expansion=2,
                         total_tokens=256 * 4, batch_size=256, buffer_tokens=1024, seqs_per_forward=8,
                         context_length=32, eval_tokens=256, out=str(tmp_path / "runs"), name="s", progress=False)
    fresh = trained_saes(cfg)
    reused = trained_saes(cfg)  # the run exists now: read back from metrics.json, not retrained
    assert [p.name for p in fresh] == ["blocks_0_hook_resid_post-k4", "blocks_1_hook_resid_post-k4"]
    assert reused == fresh and all(0 < fvu < 2 for fvu in reused.values())
