"""Policy-gradient losses for masked diffusion LMs, whose sequence log-likelihood is intractable.

RSPO (Relative Score Policy Optimization): d = an ELBO estimate of log pi(y|x) - log pi_ref(y|x)
from the SAME random masks for policy and reference; d_hat = d - mean_batch(d); A = group
advantage. L = -mean[stopgrad(A - lambda * d_hat) * d_hat]. Its gradient is exactly that of
mean[0.5 * lambda * (d_hat - A / lambda)^2]: a regression of the centred log-ratio onto the
reward-implied target A / lambda.

diffu-GRPO (d1): per-token log-probs from one forward with the completion fully masked and the
prompt masked at p = 0.15 (fresh mask per call); clipped importance ratio and the k3 KL estimate.
"""

from __future__ import annotations

import torch

from ..diffusion.loss import token_ce
from ..models.base import LoadedModel


def group_advantages(rewards: torch.Tensor, group_size: int, normalise: bool = False) -> torch.Tensor:
    """Reward minus its group's mean (optionally divided by the group's std); zero for constant groups."""
    r = rewards.view(-1, group_size).float()
    a = r - r.mean(1, keepdim=True)
    if normalise:
        a = a / (r.std(1, keepdim=True) + 1e-6)
    return a.flatten()


def completion_masks(completion: torch.Tensor, n_draws: int, generator: torch.Generator | None = None):
    """n_draws masks over completion positions: t ~ U(0, 1], each completion token masked w.p. t.

    Returns (masks (n, B, L) bool, t (n, B)); at least one token is masked per row and draw.
    """
    n, (B, L) = n_draws, completion.shape
    t = torch.rand(n, B, generator=generator).clamp_min(1e-3)
    u = torch.rand(n, B, L, generator=generator)
    masks = (u < t[..., None]) & completion[None]
    empty = ~masks.any(-1) & completion.any(-1)[None]
    if empty.any():  # force one masked completion token where a draw masked none
        first = completion.float().argmax(-1).expand(n, B)
        masks[empty, first[empty]] = True
    return masks, t


def elbo_logp(lm: LoadedModel, seqs: torch.Tensor, attn: torch.Tensor, masks: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """ELBO estimate of log p(completion | prompt) per sequence, averaged over the given mask draws."""
    total = 0.0
    for m, tt in zip(masks, t):
        m = m.to(seqs.device)
        xt = seqs.masked_fill(m, lm.mask_id)
        ce = token_ce(lm.denoise_logits(xt, attn), seqs) * m
        total = total + ce.sum(1) / tt.to(seqs.device)
    return -total / masks.shape[0]


def rspo_loss(d: torch.Tensor, advantages: torch.Tensor, lam: float) -> torch.Tensor:
    """-mean[stopgrad(A - lambda d_hat) d_hat] with d_hat the batch-centred log-ratio."""
    d_hat = d - d.mean()
    return -((advantages - lam * d_hat).detach() * d_hat).mean()


def one_step_logp(lm: LoadedModel, seqs: torch.Tensor, attn: torch.Tensor, completion: torch.Tensor,
                  prompt_mask_p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-token log-probs of the completion with it fully masked and the prompt masked at p (d1)."""
    prompt = attn.bool() & ~completion
    noise = torch.rand(seqs.shape, generator=generator).to(seqs.device) < prompt_mask_p
    xt = seqs.masked_fill(completion | (prompt & noise), lm.mask_id)
    return -token_ce(lm.denoise_logits(xt, attn), seqs)


def grpo_loss(logp: torch.Tensor, logp_old: torch.Tensor, logp_ref: torch.Tensor, advantages: torch.Tensor,
              completion: torch.Tensor, clip: float = 0.2, beta: float = 0.04) -> torch.Tensor:
    """Clipped-ratio policy gradient with a k3 KL penalty, averaged over completion tokens."""
    ratio = torch.exp(logp - logp_old)
    a = advantages[:, None]
    pg = torch.minimum(ratio * a, ratio.clamp(1 - clip, 1 + clip) * a)
    kl = torch.exp(logp_ref - logp) - (logp_ref - logp) - 1
    per_token = -(pg - beta * kl) * completion
    return (per_token.sum(1) / completion.sum(1).clamp_min(1)).mean()
