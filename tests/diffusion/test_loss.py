import math

import torch

from dlmscope.diffusion.loss import elbo_loss, log_likelihood, masked_ce, next_token_ce, token_ce
from dlmscope.diffusion.noise import corrupt, corrupt_exact, sample_t
from dlmscope.models import load_model


def test_dream_shift(tiny_dirs):
    lm = load_model(tiny_dirs["dream"])
    ids = torch.randint(4, 100, (2, 6))
    raw, aligned = lm.forward(ids), lm.denoise_logits(ids)
    torch.testing.assert_close(aligned[:, 1:], raw[:, :-1])
    torch.testing.assert_close(aligned[:, 0], raw[:, 0])


def test_masked_ce_and_elbo_by_hand():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]]))
    x0 = torch.tensor([[0, 1]])
    mask = torch.tensor([[True, False]])
    assert math.isclose(float(masked_ce(logits, x0, mask)), math.log(2), rel_tol=1e-6)
    c = corrupt(x0, 2, 0.5)
    c.mask[:] = mask
    c.p_mask[:] = 0.5
    assert math.isclose(float(elbo_loss(logits, x0, c)), math.log(2) / 0.5 / 2, rel_tol=1e-6)


def test_noise_process():
    x0 = torch.randint(4, 50, (64, 100))
    g = torch.Generator().manual_seed(0)
    c = corrupt(x0, 3, torch.full((64,), 0.3), keep_first=True, generator=g)
    assert not c.mask[:, 0].any() and abs(float(c.mask[:, 1:].float().mean()) - 0.3) < 0.02
    assert (c.xt[c.mask] == 3).all() and torch.equal(c.xt[~c.mask], x0[~c.mask])
    t = sample_t(1000, (0.05, 0.5))
    assert t.min() >= 0.05 and t.max() <= 0.5
    e = corrupt_exact(x0[:4], 3, torch.ones(4, 100, dtype=torch.bool))
    assert torch.equal(e.mask.sum(1).float() / 100, e.p_mask)


def test_ar_loglik_is_exact(tiny_dirs):
    lm = load_model(tiny_dirs["causal"])
    prompt, answer = torch.tensor([5, 6, 7]), torch.tensor([8, 9])
    full = torch.cat([prompt, answer])[None]
    expected = -float(token_ce(lm.forward(full)[:, 2:4], full[:, 3:5]).sum())
    assert math.isclose(log_likelihood(lm, prompt, answer), expected, rel_tol=1e-5)
    assert next_token_ce(lm.forward(full), full).shape == (1, 4)


def test_dlm_loglik_finite(llada):
    v = log_likelihood(llada, torch.tensor([5, 6]), torch.tensor([7, 8, 9]), n_draws=8)
    assert math.isfinite(v) and v < 0
