"""Losses for masked diffusion LMs (masked CE, the ELBO, LLaDA's likelihood) and autoregressive LMs.

Functions take logits already aligned so position i predicts token i (`LoadedModel.denoise_logits`),
which is how Dream's shift stays out of every loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import DLMScopeError
from ..models.base import LoadedModel
from .noise import Corrupted, corrupt_exact_blocks


def token_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-position cross-entropy (B, L) in float32."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)


def masked_ce(logits: torch.Tensor, x0: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean CE over masked positions (the plain "masked-token CE")."""
    n = mask.sum()
    if n == 0:
        raise DLMScopeError("no masked positions: masked CE is undefined")
    return (token_ce(logits, x0) * mask).sum() / n


def elbo_loss(logits: torch.Tensor, x0: torch.Tensor, c: Corrupted) -> torch.Tensor:
    """LLaDA's training loss: sum over masked positions of CE / p_mask, divided by B * L."""
    weighted = token_ce(logits, x0) * c.mask / c.p_mask.to(logits.device)[:, None]
    return weighted.sum() / x0.numel()


def next_token_ce(logits: torch.Tensor, input_ids: torch.Tensor,
                  attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Autoregressive per-position loss (B, L-1): logits at i predict token i+1."""
    ce = token_ce(logits[:, :-1], input_ids[:, 1:])
    if attention_mask is not None:
        ce = ce * attention_mask[:, 1:]
    return ce


def diffusion_lm_loss(lm: LoadedModel, x0: torch.Tensor, c: Corrupted,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """ELBO training loss of a DLM on a corrupted batch (block models: each block given clean earlier blocks)."""
    return elbo_loss(lm.denoise_logits(c.xt, attention_mask, clean=x0), x0, c)


@torch.no_grad()
def log_likelihood(lm: LoadedModel, prompt: torch.Tensor, answer: torch.Tensor, *, n_draws: int = 64,
                   batch_size: int = 16, generator: torch.Generator | None = None) -> float:
    """Monte-Carlo lower bound on log p(answer | prompt) (LLaDA's estimator).

    Each draw masks exactly k ~ U{1..n} answer tokens; its NLL estimate is CE(masked) * n / k.
    Block-diffusion models factorise over their blocks: each block of the answer gets its own draw
    (k_b of its n_b tokens, weight n_b / k_b) and is read given the clean earlier blocks.
    For autoregressive models the exact log-likelihood is returned; they need a non-empty prompt
    (BOS at least), as nothing predicts the first token.
    """
    x0 = torch.cat([prompt, answer]).to(lm.device)[None]
    n_prompt = prompt.numel()
    if answer.numel() == 0:
        raise DLMScopeError("log_likelihood needs a non-empty answer")
    if lm.causal:
        if n_prompt == 0:
            raise DLMScopeError("an autoregressive log_likelihood needs a non-empty prompt (at least BOS) to "
                                "score the first answer token")
        ce = next_token_ce(lm.forward(x0), x0)[0, n_prompt - 1:]
        return -float(ce.sum())
    mask_id = lm.require_mask_id()
    eligible = torch.zeros_like(x0, dtype=torch.bool)
    eligible[:, n_prompt:] = True
    total = 0.0
    for start in range(0, n_draws, batch_size):
        b = min(batch_size, n_draws - start)
        xb = x0.expand(b, -1)
        xt, mask, weight = corrupt_exact_blocks(xb, mask_id, eligible.expand(b, -1), lm.block_size or xb.shape[1],
                                                generator=generator)
        ce = token_ce(lm.denoise_logits(xt, clean=xb), xb) * mask
        total += float((ce * weight.to(ce.device)).sum())
    return -total / n_draws
