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
"""

from __future__ import annotations

import torch

from ..diffusion.loss import token_ce
from ..diffusion.noise import Corrupted, corrupt_exact
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
    total = 0.0
    for c in draws:
        ce = token_ce(lm.denoise_logits(c.xt[rows], attn[rows]), seqs[rows]) * c.mask[rows]
        total = total + ce.sum(1) / c.p_mask[rows].to(ce.device)
    return -total / len(draws)


def rspo_loss(d: torch.Tensor, advantages: torch.Tensor, lam: float, center: torch.Tensor | None = None) -> torch.Tensor:
    """-mean[stopgrad(A - lambda d_hat) d_hat], d_hat = d - center (default: d's own mean).

    Under gradient accumulation pass `center` = the full batch's mean log-ratio (no grad): when the
    advantages sum to zero over the batch this gives exactly the full-batch gradient.
    """
    d_hat = d - (d.mean() if center is None else center)
    return -((advantages - lam * d_hat).detach() * d_hat).mean()


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
