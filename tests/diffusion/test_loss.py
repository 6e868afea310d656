import math

import pytest
import torch

from dlmscope import DLMScopeError
from dlmscope.diffusion.loss import (diffusion_lm_loss, elbo_loss, log_likelihood, masked_ce, next_token_ce,
                                     token_ce)
from dlmscope.diffusion.noise import Corrupted, corrupt
from dlmscope.models import load_model


@torch.no_grad()
def test_dream_denoise_logits_are_raw_logits_shifted(tiny_dirs):
    lm = load_model(tiny_dirs["dream"])
    ids = torch.randint(4, 100, (2, 6))
    raw, aligned = lm.forward(ids), lm.denoise_logits(ids)
    torch.testing.assert_close(aligned[:, 1:], raw[:, :-1])  # position i-1 predicted token i
    torch.testing.assert_close(aligned[:, 0], raw[:, 0])


@torch.no_grad()
def test_llada_denoise_logits_are_raw(llada):
    ids = torch.randint(4, 100, (2, 6))
    torch.testing.assert_close(llada.denoise_logits(ids), llada.forward(ids))


# Two sequences of length 2 over a 3-token vocabulary, probabilities chosen for exact logs.
P = torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]],
                  [[0.2, 0.2, 0.6], [0.25, 0.25, 0.5]]])
LOGITS = torch.log(P)
X0 = torch.tensor([[0, 1], [2, 0]])


def test_token_and_masked_ce_by_hand():
    expected = -torch.log(torch.tensor([[0.5, 0.8], [0.6, 0.25]]))
    torch.testing.assert_close(token_ce(LOGITS, X0), expected)
    mask = torch.tensor([[True, False], [True, True]])
    by_hand = (math.log(2) - math.log(0.6) + math.log(4)) / 3
    assert math.isclose(float(masked_ce(LOGITS, X0, mask)), by_hand, rel_tol=1e-6)
    with pytest.raises(DLMScopeError, match="no masked positions"):
        masked_ce(LOGITS, X0, torch.zeros_like(mask))


def test_elbo_by_hand():
    mask = torch.tensor([[True, False], [False, True]])
    p_mask = torch.tensor([0.5, 0.25])
    c = Corrupted(torch.where(mask, 9, X0), mask, p_mask.clone(), p_mask)
    # sum over masked positions of CE / p_mask, divided by B * L
    by_hand = (math.log(2) / 0.5 + math.log(4) / 0.25) / 4
    assert math.isclose(float(elbo_loss(LOGITS, X0, c)), by_hand, rel_tol=1e-6)


def test_next_token_ce_by_hand():
    logits = torch.log(torch.tensor([[[0.5, 0.5, 0.0 + 1e-9], [0.1, 0.1, 0.8], [1 / 3, 1 / 3, 1 / 3]]]))
    ids = torch.tensor([[0, 1, 2]])
    ce = next_token_ce(logits, ids)
    torch.testing.assert_close(ce, torch.tensor([[math.log(2), -math.log(0.8)]]), rtol=1e-5, atol=1e-6)
    masked = next_token_ce(logits, ids, torch.tensor([[1, 1, 0]]))
    assert float(masked[0, 1]) == 0.0 and math.isclose(float(masked[0, 0]), math.log(2), rel_tol=1e-5)


@torch.no_grad()
def test_diffusion_loss_handles_the_shift(tiny_dirs):
    """Dream's loss is the ELBO on its aligned logits: the shift is undone exactly once."""
    lm = load_model(tiny_dirs["dream"])
    x0 = torch.randint(4, 100, (2, 8))
    c = corrupt(x0, lm.mask_id, 0.5, generator=torch.Generator().manual_seed(0))
    raw = lm.forward(c.xt)
    shifted = torch.cat([raw[:, :1], raw[:, :-1]], 1)
    assert math.isclose(float(diffusion_lm_loss(lm, x0, c)), float(elbo_loss(shifted, x0, c)), rel_tol=1e-6)
    assert not math.isclose(float(diffusion_lm_loss(lm, x0, c)), float(elbo_loss(raw, x0, c)), rel_tol=1e-3)


@torch.no_grad()
def test_ar_log_likelihood_is_the_exact_sum(tiny_dirs):
    lm = load_model(tiny_dirs["causal"])
    prompt, answer = torch.tensor([5, 6, 7]), torch.tensor([8, 9, 10])
    full = torch.cat([prompt, answer])[None]
    logp = torch.log_softmax(lm.forward(full)[0].float(), -1)
    exact = sum(float(logp[i - 1, full[0, i]]) for i in range(3, 6))
    assert math.isclose(log_likelihood(lm, prompt, answer), exact, rel_tol=1e-5)
    with pytest.raises(DLMScopeError, match="non-empty prompt") as e:  # it used to score only the last token
        log_likelihood(lm, torch.tensor([], dtype=torch.long), answer)
    assert "\n" not in str(e.value)


def test_dlm_log_likelihood(llada):
    g = torch.Generator().manual_seed(0)
    v = log_likelihood(llada, torch.tensor([5, 6]), torch.tensor([7, 8, 9]), n_draws=8, batch_size=3, generator=g)
    again = log_likelihood(llada, torch.tensor([5, 6]), torch.tensor([7, 8, 9]), n_draws=8, batch_size=8,
                           generator=torch.Generator().manual_seed(0))
    assert math.isfinite(v) and v < 0
    assert math.isclose(v, again, rel_tol=0.5)  # same estimator whatever the batching
    with pytest.raises(DLMScopeError, match="non-empty answer"):
        log_likelihood(llada, torch.tensor([5]), torch.tensor([], dtype=torch.long))


@torch.no_grad()
def test_dlm_log_likelihood_single_token_is_exact(llada):
    """With one answer token every draw masks it (k = n = 1): the estimate is exactly log p."""
    prompt, answer = torch.tensor([5, 6, 7]), torch.tensor([8])
    x = torch.tensor([[5, 6, 7, llada.mask_id]])
    exact = float(torch.log_softmax(llada.denoise_logits(x)[0, 3].float(), -1)[8])
    assert math.isclose(log_likelihood(llada, prompt, answer, n_draws=4), exact, rel_tol=1e-5)
