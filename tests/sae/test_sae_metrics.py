import pytest
import torch

from dlmscope.sae.metrics import (cosine, dead_fraction, density, evaluate_sae, explained_variance, fvu, l0,
                                  log10_density_histogram)


def test_fvu_is_textbook_and_differs_from_saelens_legacy():
    x = torch.tensor([[0.0, 0.0], [2.0, 0.0], [4.0, 0.0], [2.0, 0.1]])
    x_hat = x + torch.tensor([[0.5, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.1]])
    mean = x.mean(0)
    expected = float(((x - x_hat) ** 2).sum() / ((x - mean) ** 2).sum())
    assert fvu(x, x_hat) == pytest.approx(expected)
    assert explained_variance(x, x_hat) == pytest.approx(1 - expected)
    legacy = float((1 - ((x - x_hat) ** 2).sum(-1) / ((x - mean) ** 2).sum(-1)).mean())  # SAELens' per-token ratio
    assert abs(legacy - (1 - expected)) > 0.1
    assert fvu(x, x) == 0.0 and fvu(x, mean.expand_as(x)) == pytest.approx(1.0)


def test_l0_density_dead_cosine_histogram():
    lat = torch.tensor([[1.0, 0.0, 2.0, 0.0], [0.5, 0.0, 0.0, 0.0]])
    assert l0(lat) == 1.5
    torch.testing.assert_close(density(lat), torch.tensor([1.0, 0.0, 0.5, 0.0]))
    assert dead_fraction(density(lat)) == 0.5
    assert cosine(torch.tensor([[1.0, 0.0]]), torch.tensor([[2.0, 0.0]])) == pytest.approx(1.0)
    hist = log10_density_histogram(torch.tensor([1.0, 0.1, 0.0, 1e-3]), bins=8, floor=-8.0)
    assert sum(hist["counts"]) == 4 and hist["counts"][0] == 1 and len(hist["edges"]) == 9


def test_evaluate_sae_streams_to_the_same_numbers(trained):
    x = torch.randn(300, 16) * 5 + 2
    ev = evaluate_sae(trained.sae, x, batch_size=64)
    x_hat = trained.sae.reconstruct(x)
    assert ev["fvu"] == pytest.approx(fvu(x, x_hat), rel=1e-5)
    assert ev["cosine"] == pytest.approx(cosine(x, x_hat), rel=1e-5)
    assert ev["l0"] == pytest.approx(l0(trained.sae.encode(x)))
    torch.testing.assert_close(ev["density"], density(trained.sae.encode(x)))
