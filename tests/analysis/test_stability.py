import pytest
import torch

from dlmscope import DLMScopeError
from dlmscope.analysis.stability import check_compatible, stability_report
from dlmscope.models import load_model


def test_identical_checkpoints_are_perfectly_stable(tiny_dirs, tiny_sae):
    a, b = load_model(tiny_dirs["llada"]), load_model(tiny_dirs["llada"])
    rows = torch.randint(4, 200, (8, 16), generator=torch.Generator().manual_seed(0))
    r = stability_report(tiny_sae, [a, b], rows, saes_per_checkpoint=[tiny_sae, tiny_sae], n_seqs=8)
    t0, t1 = r["transfer"]
    assert t0["fvu"] == t1["fvu"] and t0["delta_ce"] == t1["delta_ce"]
    assert r["features"][1]["mean_correlation"] == pytest.approx(1.0, abs=1e-5)
    assert r["features"][1]["top_example_overlap_ge_half"] == 1.0
    assert r["matching"][0]["mean"] == pytest.approx(1.0, abs=1e-5)


def test_control_sae_gives_the_matching_floor(tiny_dirs, tiny_sae):
    import copy

    a = load_model(tiny_dirs["llada"])
    rows = torch.randint(4, 200, (8, 16), generator=torch.Generator().manual_seed(0))
    other = copy.deepcopy(tiny_sae)
    with torch.no_grad():  # an unrelated dictionary
        other.W_dec.copy_(torch.randn(other.W_dec.shape, generator=torch.Generator().manual_seed(123)))
    r = stability_report(tiny_sae, [a, a], rows, saes_per_checkpoint=[tiny_sae, tiny_sae], control_sae=other, n_seqs=8)
    assert r["matching"][0]["mean"] == pytest.approx(1.0, abs=1e-5)
    assert r["matching_control"]["mean"] < 0.6 and r["matching_control"]["fraction_above_0.9"] == 0.0
    with pytest.raises(DLMScopeError, match="control SAE needs per-checkpoint SAEs"):
        stability_report(tiny_sae, [a, a], rows, control_sae=other, n_seqs=8)


def test_different_architectures_rejected(tiny_dirs, tmp_path, tokenizer):
    from dlmscope.models.tiny import write_tiny_llada

    other = load_model(write_tiny_llada(tmp_path / "big", n_layers=3, vocab_size=len(tokenizer), tokenizer=tokenizer))
    with pytest.raises(DLMScopeError, match="differ in architecture"):
        check_compatible(load_model(tiny_dirs["llada"]), other)
