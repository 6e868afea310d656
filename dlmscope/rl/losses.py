"""Policy-gradient losses for masked diffusion LMs, whose sequence log-likelihood is intractable.

RSPO (Relative Score Policy Optimization): d = an ELBO estimate of log pi(y|x) - log pi_ref(y|x) from
the SAME random masks for policy and reference (the mask noise largely cancels in the difference);
d_hat = d - mean_batch(d); A = group advantage; L = -mean[stopgrad(A - lambda d_hat) d_hat].
dL/dd_hat_i = (lambda d_hat_i - A_i) / N, which is exactly the gradient of
mean[0.5 lambda (d_hat - A/lambda)^2] (same sign, same scale, no 1/lambda factor): a regression of
the centred log-ratio onto the reward-implied target A / lambda. No ratio clipping.

diffu-GRPO (d1): per-token log-probs from one forward with the completion fully masked and the
prompt masked at p = 0.15 (a fresh mask per inner iteration, shared by the current, old and reference
policies); clipped importance ratio and the k3 KL estimate to the reference.

SPG (Sandwiched Policy Gradient, Wang et al. 2025): loss = -sum_i A_i n_i logp_i / sum_i n_i (n_i the
completion length) with logp_i a lower bound (ELBO) of log pi(y_i|x) where A_i > 0 and an upper bound
(EUBO, or the mix w EUBO + (1-w) ELBO) where A_i <= 0, so every term pushes the true likelihood the
right way. Both come from the same `num_t` block-wise random masks; no reference, KL or clipping.
"""

from __future__ import annotations

import torch

from ..diffusion.loss import token_ce
from ..diffusion.noise import Corrupted, corrupt_exact
from ..errors import DLMScopeError
from ..models.base import LoadedModel


def elbo_draws(seqs: torch.Tensor, completion: torch.Tensor, mask_id: int, n_draws: int,
               generator: torch.Generator | None = None) -> list[Corrupted]:
    """n_draws LLaDA-style masks over the completion (exactly k ~ U{1..n} of its tokens, weight n/k).

    The prompt is never masked. Pass the same list to the policy and the reference.
    """
    return [corrupt_exact(seqs, mask_id, completion, generator=generator) for _ in range(n_draws)]


def elbo_logp(lm: LoadedModel, seqs: torch.Tensor, attn: torch.Tensor, draws: list[Corrupted],
              rows: slice = slice(None)) -> torch.Tensor:
    """ELBO estimate of log p(completion | prompt) for `seqs[rows]`, averaged over the mask draws."""
    total: torch.Tensor | None = None
    for c in draws:
        ce = token_ce(lm.denoise_logits(c.xt[rows], attn[rows]), seqs[rows]) * c.mask[rows]
        term = ce.sum(1) / c.p_mask[rows].to(ce.device)
        total = term if total is None else total + term
    if total is None:
        raise DLMScopeError("elbo_logp needs at least one mask draw")
    return -total / len(draws)


def rspo_loss(d: torch.Tensor, advantages: torch.Tensor, lam: float, center: torch.Tensor | None = None) -> torch.Tensor:
    """-mean[stopgrad(A - lambda d_hat) d_hat], d_hat = d - center (default: d's own mean).

    Under gradient accumulation pass `center` = the full batch's mean log-ratio (no grad): when the
    advantages sum to zero over the batch this gives exactly the full-batch gradient.
    """
    d_hat = d - (d.mean() if center is None else center)
    return -((advantages - lam * d_hat).detach() * d_hat).mean()


SPG_ESTIMATES = ("eubo", "mix", "elbo")


def spg_masks(seqs: torch.Tensor, gen_length: int, mask_id: int, num_t: int, block_length: int,
              prompt_mask_p: float, generator: torch.Generator | None = None,
              valid: torch.Tensor | None = None) -> torch.Tensor:
    """SPG's `block_random` perturbations: (B, num_t, L) inputs, the completion being the last `gen_length` columns.

    Per row and draw: a completion block b (a random permutation of the blocks, its first num_t entries
    taken modulo the row's own number of blocks), k ~ U{1..m} of its m valid tokens masked, every later
    block masked, every earlier token (prompt and earlier blocks) masked with probability
    `prompt_mask_p`, and positions past the valid completion (`valid`, (B, gen_length), default all)
    masked. Random draws are taken in upstream's order, so a generator seeded like upstream's `set_seed`
    reproduces its masks exactly.
    """
    B, L = seqs.shape
    if gen_length % block_length:
        raise DLMScopeError(f"gen_length={gen_length} is not a multiple of the SPG block length {block_length}")
    n_blocks = gen_length // block_length
    if num_t > n_blocks:
        raise DLMScopeError(f"num_t={num_t} mask draws need at least as many blocks; gen_length {gen_length} "
                            f"has {n_blocks} of {block_length}")
    valid = torch.ones(B, gen_length, dtype=torch.bool) if valid is None else valid.bool().cpu()
    n_valid = valid.sum(1)
    row_blocks = (n_valid - 1) // block_length + 1
    chosen = torch.stack([torch.randperm(n_blocks, generator=generator) % row_blocks[i] for i in range(B)])[:, :num_t]
    start = L - gen_length + chosen * block_length  # first column of the chosen block
    masked = torch.zeros(B, num_t, L, dtype=torch.bool)
    for i in range(B):
        for j in range(num_t):
            s = int(start[i, j])
            m = min(block_length, int(n_valid[i]) - int(chosen[i, j]) * block_length)
            k = int(torch.randint(1, m + 1, (1, 1), generator=generator))
            masked[i, j, s:s + m] = (torch.arange(block_length)[:m] < k)[torch.randperm(m, generator=generator)]
            masked[i, j, s + block_length:] = True
            masked[i, j, s + m:s + block_length] = True
    before = torch.arange(L)[None, None, :] < start[:, :, None]
    masked |= before & (torch.rand(B, num_t, L, generator=generator) < prompt_mask_p)
    tail = torch.cat([torch.zeros(B, L - gen_length, dtype=torch.bool), ~valid], 1)
    masked |= tail[:, None, :]
    return seqs[:, None, :].masked_fill(masked.to(seqs.device), mask_id)


def spg_logp(logp: torch.Tensor, masked: torch.Tensor, completion: torch.Tensor, positive: torch.Tensor,
             beta: float = 1.0, estimate: str = "eubo", mix_weight: float = 0.5) -> torch.Tensor:
    """Per-sequence SPG log-likelihood bounds (B,) from per-draw token log-probs.

    logp, masked: (B, T, L) log pi of the true token and whether it was masked in draw t; completion:
    (B, L) tokens that count. ELBO = mean over draws of the mean log-prob of the masked completion
    tokens. EUBO = mean over tokens of (1/beta) log mean_t[p^beta mask / t_emp] (t_emp: a draw's
    masked fraction of the completion; tokens never masked are left out). Rows with `positive` get
    the ELBO, the others `estimate`: eubo, mix (w EUBO + (1-w) ELBO) or elbo.
    """
    w = (masked & completion[:, None, :]).float()
    n_masked = w.sum(2)
    elbo = ((logp * w).sum(2) / n_masked.clamp_min(1e-8)).mean(1)
    if estimate == "elbo":
        return elbo
    t_emp = n_masked / completion.float().sum(1, keepdim=True)
    avg = (torch.exp(beta * logp) * w / t_emp[:, :, None].clamp_min(1e-8)).mean(1)
    seen = avg > 0
    eubo = (torch.where(seen, avg, torch.ones_like(avg)).log() * seen).sum(1) / seen.sum(1).clamp_min(1e-8) / beta
    upper = eubo if estimate == "eubo" else mix_weight * eubo + (1 - mix_weight) * elbo
    return torch.where(positive, elbo, upper)


def spg_loss(logp: torch.Tensor, advantages: torch.Tensor, lengths: torch.Tensor, total_length: float | None = None) -> torch.Tensor:
    """-sum(A logp n) / sum(n): the sequence-level policy gradient weighted by completion length.

    Under gradient accumulation pass `total_length` = the full batch's sum of n so the micro-batch
    losses add up to the full-batch loss.
    """
    n = lengths.float()
    return -(advantages * logp * n).sum() / (n.sum() if total_length is None else total_length)


def one_step_input(seqs: torch.Tensor, attn: torch.Tensor, completion: torch.Tensor, mask_id: int,
                   prompt_mask_p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """d1's one-step input: completion fully masked, each prompt token masked with probability p."""
    prompt = attn.bool() & ~completion
    noise = torch.rand(seqs.shape, generator=generator).to(seqs.device) < prompt_mask_p
    return seqs.masked_fill(completion | (prompt & noise), mask_id)


def token_logp(lm: LoadedModel, xt: torch.Tensor, seqs: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """(B, L) log-probs of `seqs` given the corrupted input `xt` (one forward)."""
    return -token_ce(lm.denoise_logits(xt, attn), seqs)


def grpo_loss(logp: torch.Tensor, logp_old: torch.Tensor, logp_ref: torch.Tensor, advantages: torch.Tensor,
              completion: torch.Tensor, clip: float = 0.2, beta: float = 0.04) -> torch.Tensor:
    """Clipped-ratio policy gradient with a k3 KL penalty, averaged over completion tokens then sequences."""
    ratio = torch.exp(logp - logp_old)
    a = advantages[:, None]
    pg = torch.minimum(ratio * a, ratio.clamp(1 - clip, 1 + clip) * a)
    kl = torch.exp(logp_ref - logp) - (logp_ref - logp) - 1
    per_token = -(pg - beta * kl) * completion
    return (per_token.sum(1) / completion.sum(1).clamp_min(1)).mean()
