import pytest
import torch

from dlmscope.rl import elbo_draws, elbo_logp, one_step_input, rspo_loss


def test_rspo_gradient_is_regression_onto_advantage_target():
    """grad of -mean[sg(A - lam d_hat) d_hat] == grad of mean[0.5 lam (d_hat - A/lam)^2] (sign and scale)."""
    torch.manual_seed(0)
    for lam in (0.01, 0.3, 2.0):
        d1 = (5 * torch.randn(8)).requires_grad_(True)
        d2 = d1.detach().clone().requires_grad_(True)
        A = torch.randn(8)
        rspo_loss(d1, A, lam).backward()
        d_hat = d2 - d2.mean()
        (0.5 * lam * (d_hat - A / lam) ** 2).mean().backward()
        torch.testing.assert_close(d1.grad, d2.grad)
        # explicit form: dL/dd_i = (lam d_hat_i - A_i) / N, centred (A here is not zero-mean)
        g = (lam * d_hat.detach() - A) / 8
        torch.testing.assert_close(d1.grad, g - g.mean())


def test_rspo_accumulated_gradient_equals_full_batch():
    """Micro-batches with the full batch's mean as `center` reproduce the full-batch gradient."""
    torch.manual_seed(1)
    A = torch.randn(4, 3)
    A = (A - A.mean(1, keepdim=True)).flatten()  # group-centred advantages, as the trainer makes them
    d_full = torch.randn(12, requires_grad=True)
    rspo_loss(d_full, A, 0.1).backward()
    d_acc = d_full.detach().clone().requires_grad_(True)
    center = d_acc.detach().mean()
    for sl in (slice(0, 6), slice(6, 12)):
        (rspo_loss(d_acc[sl], A[sl], 0.1, center) / 2).backward()
    torch.testing.assert_close(d_acc.grad, d_full.grad)


def test_elbo_draws_mask_completion_only(llada):
    seqs = torch.randint(4, 200, (3, 10))
    completion = torch.zeros_like(seqs, dtype=torch.bool)
    completion[:, 6:] = True
    draws = elbo_draws(seqs, completion, llada.mask_id, 5, torch.Generator().manual_seed(0))
    for c in draws:
        assert (c.mask <= completion).all() and c.mask.any(-1).all()
        assert torch.equal(c.p_mask, c.mask.sum(1) / 4.0)  # weight n/k: exactly k of the n=4 tokens masked
    d = elbo_logp(llada, seqs, torch.ones_like(seqs), draws) - elbo_logp(llada, seqs, torch.ones_like(seqs), draws)
    assert torch.equal(d, torch.zeros(3))  # same model, same masks: exactly zero log-ratio


def test_one_step_input_masks_completion_and_some_prompt():
    seqs = torch.randint(4, 200, (4, 200))
    attn = torch.ones_like(seqs)
    attn[0, :3] = 0  # left padding is never masked
    completion = torch.zeros_like(seqs, dtype=torch.bool)
    completion[:, 150:] = True
    xt = one_step_input(seqs, attn, completion, 3, 0.15, torch.Generator().manual_seed(0))
    assert (xt[:, 150:] == 3).all() and (xt[0, :3] == seqs[0, :3]).all()
    assert (xt[:, :150] == 3).float().mean() == pytest.approx(0.15, abs=0.03)
