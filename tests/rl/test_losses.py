import math

import pytest
import torch

from dlmscope.rl import elbo_draws, elbo_logp, one_step_input, rspo_loss
from dlmscope.rl.losses import grpo_loss


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


def _grpo_case():
    """Two sequences; log-probs chosen so the ratios are 1.5, 0.5 and 1.5 on the completion tokens."""
    ln = math.log
    logp = torch.tensor([[ln(1.5), ln(0.5), 3.0], [ln(1.5), -7.0, 2.0]], requires_grad=True)
    old = torch.tensor([[0.0, 0.0, -9.0], [0.0, 1.0, 0.0]])  # last tokens: huge ratios, outside the completion
    ref = torch.tensor([[ln(1.5), ln(0.5) + ln(2), 0.0], [ln(1.5), 0.0, 0.0]])  # KL only on token (0, 1)
    completion = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.float32)
    return logp, old, ref, torch.tensor([1.0, -2.0]), completion


def test_grpo_loss_by_hand():
    """Clipped ratio (clip 0.2) and the k3 KL (beta 0.1), averaged over completion tokens then sequences.

    Row 0 (A=+1): ratio 1.5 is clipped to 1.2; ratio 0.5 stays (min with 0.8); KL of token 1:
    e^(ln 2) - ln 2 - 1 = 1 - ln 2. Row 1 (A=-2): min(1.5 * -2, 1.2 * -2) = -3 (no clipping helps a
    negative advantage). Loss = mean(-(1.2 + 0.5 - 0.1 (1 - ln 2)) / 2, 3).
    """
    logp, old, ref, adv, completion = _grpo_case()
    loss = grpo_loss(logp, old, ref, adv, completion, clip=0.2, beta=0.1)
    row0 = -(1.2 + 0.5 - 0.1 * (1 - math.log(2))) / 2
    assert float(loss.detach()) == pytest.approx((row0 + 3.0) / 2, rel=1e-6)
    loss.backward()
    # d/dlogp: 0 where clipped (token (0, 0), KL 0 there); -(0.5 - 0.1 * (1 - e^ln2)) / 2 / 2 = -0.15 at (0, 1);
    # -(1.5 * -2) / 1 / 2 = 1.5 at (1, 0); nothing outside the completion
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -0.15, 0.0], [1.5, 0.0, 0.0]]))


def test_grpo_loss_on_policy_is_minus_mean_advantage():
    """Current = old = reference: ratio 1 and zero KL, so the loss is -mean(A) and its gradient -A / (n tokens B)."""
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -0.5]], requires_grad=True)
    completion = torch.tensor([[0, 1, 1], [1, 1, 1]], dtype=torch.float32)
    loss = grpo_loss(logp, logp.detach(), logp.detach(), torch.tensor([2.0, -1.0]), completion)
    assert float(loss.detach()) == pytest.approx(-(2.0 - 1.0) / 2)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -0.5, -0.5], [1 / 6, 1 / 6, 1 / 6]]))
