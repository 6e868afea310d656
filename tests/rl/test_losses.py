import math

import pytest
import torch

from dlmscope import DLMScopeError
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
def _spg_case(seed=0, B=3, T=2, L=6):
    g = torch.Generator().manual_seed(seed)
    logp = (-3 * torch.rand(B, T, L, generator=g)).requires_grad_(True)
    masked = torch.rand(B, T, L, generator=g) < 0.5
    masked[:, :, 1] = True  # every draw masks at least one completion token
    completion = torch.ones(B, L, dtype=torch.bool)
    completion[:, 0] = False  # a prompt token
    completion[2, 4:] = False  # a shorter completion
    return logp, masked, completion


@pytest.mark.parametrize("estimate,w", [("eubo", 0.5), ("mix", 0.3), ("elbo", 0.5)])
def test_spg_gradient_matches_analytic(estimate, w):
    """dL/dlogp of -sum(A n logp_est)/sum(n): ELBO rows w/(T k_t), upper-bound rows p^beta m/(t_emp T avg S) (beta cancels)."""
    from dlmscope.rl import spg_logp, spg_loss

    logp, masked, completion = _spg_case()
    A = torch.tensor([0.7, -0.4, -0.3])
    beta = 1.7
    n = completion.sum(1)
    spg_loss(spg_logp(logp, masked, completion, A > 0, beta, estimate, w), A, n).backward()
    m = (masked & completion[:, None]).float()
    k = m.sum(2, keepdim=True)
    T = logp.shape[1]
    x = logp.detach()
    g_elbo = m / (T * k)
    t_emp = k / completion.sum(1)[:, None, None]
    avg = (torch.exp(beta * x) * m / t_emp).mean(1, keepdim=True)
    seen = (avg > 0).float()
    g_eubo = torch.exp(beta * x) * m / (t_emp * T * avg.clamp_min(1e-30)) * seen / seen.sum(2, keepdim=True)
    upper = {"eubo": g_eubo, "mix": w * g_eubo + (1 - w) * g_elbo, "elbo": g_elbo}[estimate]
    per_row = torch.where((A > 0)[:, None, None], g_elbo, upper)
    expected = -(A * n / n.sum())[:, None, None] * per_row
    torch.testing.assert_close(logp.grad, expected)
    assert logp.grad[:, :, 0].abs().sum() == 0 and logp.grad[2, :, 4:].abs().sum() == 0  # prompt and past-end


def test_spg_masks_block_structure():
    from dlmscope.rl import spg_masks

    seqs = torch.randint(4, 200, (5, 24))
    for seed in range(4):
        xt = spg_masks(seqs, 16, 3, 2, 8, 0.0, torch.Generator().manual_seed(seed))
        m = xt == 3
        assert xt.shape == (5, 2, 24) and not m[:, :, :8].any()  # prompt_mask_p 0: prompt clean
        for i in range(5):
            for j in range(2):
                first = int(m[i, j].nonzero()[0])
                block = 8 + 8 * ((first - 8) // 8)  # the chosen block: partly masked, later blocks all masked
                assert m[i, j, block + 8:].all() and 1 <= int(m[i, j, block:block + 8].sum()) <= 8
    # the two draws of a row pick different blocks (a permutation's first two entries)
    firsts = (spg_masks(seqs, 16, 3, 2, 8, 0.0, torch.Generator().manual_seed(0)) == 3).float().argmax(2)
    assert ((firsts - 8) // 8).sort(1).values.tolist() == [[0, 1]] * 5
    with pytest.raises(DLMScopeError, match="at least as many blocks"):
        spg_masks(seqs, 16, 3, 3, 8, 0.0)


def test_spg_matches_upstream_golden():
    """Upstream SPG (facebookresearch/SPG spg_trainer.py) on the tiny LLaDA fixture: same masks, bounds and loss."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    from dlmscope.models import load_model
    from dlmscope.rl import spg_logp, spg_loss, spg_masks, token_logp

    root = Path(__file__).resolve().parents[1] / "fixtures"
    g, meta = load_file(root / "spg" / "golden.safetensors"), json.loads((root / "spg" / "golden.json").read_text())
    lm = load_model(root / "llada_tiny")
    seqs = torch.cat([g["inputs.prompt_ids"], g["inputs.completion_ids"]], 1)
    attn = torch.cat([g["inputs.prompt_mask"], torch.ones_like(g["inputs.completion_ids"])], 1)
    valid = g["inputs.completion_mask"].bool()
    completion = torch.cat([torch.zeros_like(g["inputs.prompt_ids"], dtype=torch.bool), valid], 1)
    A = g["inputs.advantages"]
    for name, case in meta["cases"].items():
        xt = spg_masks(seqs, meta["gen_length"], meta["mask_id"], meta["num_t"], meta["block_length"],
                       meta["p_mask_prompt"], torch.Generator().manual_seed(meta["seed"]), valid=valid)
        assert torch.equal(xt, g[f"{name}.perturbed"]), name
        with torch.no_grad():
            logp = torch.stack([token_logp(lm, xt[:, t], seqs, attn) for t in range(meta["num_t"])], 1)
        lp = spg_logp(logp, xt == meta["mask_id"], completion, A > 0, case["eubo_beta"], case["logp_estimation"],
                      case["mix_weight"])
        torch.testing.assert_close(lp, g[f"{name}.per_seq_logps"], atol=1e-5, rtol=0)
        torch.testing.assert_close(spg_loss(lp, A, valid.sum(1)).reshape(1), g[f"{name}.loss"], atol=1e-5, rtol=0)


def test_eubo_above_elbo_on_tiny_dlm():
    """Shipped tiny DLM, Sudoku solutions, the same masks: with enough draws the EUBO exceeds the ELBO.

    The per-token EUBO takes a log of a mean over draws of p^beta m / t; with few draws that mean of the
    heavy-tailed weights m / t is usually below its expectation 1, so at SPG's num_t = 2..8 the estimate
    sits *below* the ELBO on this model (measured: -0.1 to -0.2 nats/token at 4-8 draws). Unbiased masks
    (k ~ U{1..n}, E[m/t] = 1) and 128 draws show the bound itself.
    """
    from dlmscope.models import load_model
    from dlmscope.rl import elbo_draws, spg_logp, token_logp
    from dlmscope.tasks import get_task

    lm = load_model("dlmscope-tiny-dlm")
    ex = get_task("sudoku", min_empty=10, max_empty=12).examples("train", 4)
    seqs = torch.tensor([list(lm.to_tokens([e.prompt])[0]) + lm.tokenizer(e.answer, add_special_tokens=False)["input_ids"]
                         for e in ex])
    completion = torch.zeros_like(seqs, dtype=torch.bool)
    completion[:, -16:] = True  # one token per digit
    xt = torch.stack([c.xt for c in elbo_draws(seqs, completion, lm.mask_id, 128, torch.Generator().manual_seed(0))], 1)
    rows = seqs.repeat_interleave(128, 0)
    with torch.no_grad():  # all draws in one batch
        logp = token_logp(lm, xt.flatten(0, 1), rows, torch.ones_like(rows)).view(xt.shape)
    elbo = spg_logp(logp, xt == lm.mask_id, completion, torch.ones(4, dtype=torch.bool))
    for beta in (1.0, 1.5):
        eubo = spg_logp(logp, xt == lm.mask_id, completion, torch.zeros(4, dtype=torch.bool), beta)
        assert (eubo - elbo).mean() > 0.005 and (eubo > elbo).all(), (beta, eubo - elbo)
