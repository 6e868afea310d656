"""The forward masking process of masked diffusion LMs (LLaDA's, which DLM-Scope also uses)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import DLMScopeError

EPS = 1e-3
"""LLaDA's floor on the mask probability: p_mask = (1 - eps) t + eps."""


@dataclass
class Corrupted:
    """A masked batch: x_t, which positions were masked, and the per-sequence t and mask probability."""

    xt: torch.Tensor  # (B, L) long
    mask: torch.Tensor  # (B, L) bool
    t: torch.Tensor  # (B,) float
    p_mask: torch.Tensor  # (B,) float: probability each eligible token was masked


def check_t_range(t_range: tuple[float, float]) -> tuple[float, float]:
    lo, hi = float(t_range[0]), float(t_range[1])
    if not 0.0 <= lo <= hi <= 1.0:
        raise DLMScopeError(f"t range {t_range!r} is invalid; need 0 <= low <= high <= 1")
    return lo, hi


def sample_t(batch: int, t_range: tuple[float, float] = (0.0, 1.0), *, per_batch: bool = False,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """t ~ U[low, high], one per sequence or (`per_batch`) one shared by the whole batch."""
    lo, hi = check_t_range(t_range)
    u = torch.rand(1 if per_batch else batch, generator=generator)
    return (lo + (hi - lo) * u).expand(batch).clone()


def corrupt(x0: torch.Tensor, mask_id: int, t: torch.Tensor | float, *, eps: float = EPS, keep_first: bool = False,
            protect: torch.Tensor | None = None, generator: torch.Generator | None = None) -> Corrupted:
    """Mask each token independently with probability p_mask = (1 - eps) t + eps.

    `keep_first` never masks position 0 (DLM-Scope's protocol); `protect` (B, L) bool marks
    tokens never masked (an SFT prompt, padding).
    """
    B, L = x0.shape
    t = torch.as_tensor(t, dtype=torch.float32).expand(B).clone() if not isinstance(t, torch.Tensor) or t.dim() == 0 \
        else t.float()
    p_mask = (1.0 - eps) * t + eps
    u = torch.rand(B, L, generator=generator).to(x0.device)
    mask = u < p_mask.to(x0.device)[:, None]
    if keep_first:
        mask[:, 0] = False
    if protect is not None:
        mask &= ~protect.to(x0.device).bool()
    return Corrupted(torch.where(mask, torch.full_like(x0, mask_id), x0), mask, t, p_mask)


def corrupt_exact(x0: torch.Tensor, mask_id: int, eligible: torch.Tensor, *,
                  generator: torch.Generator | None = None) -> Corrupted:
    """Mask exactly k ~ U{1..n} of each row's `eligible` tokens (LLaDA's likelihood estimator).

    `p_mask` is k / n, the weight that makes the masked CE an unbiased NLL estimate.
    """
    B, L = x0.shape
    n = eligible.sum(1)
    if bool((n == 0).any()):
        raise DLMScopeError("corrupt_exact needs at least one eligible token per row")
    k = (torch.rand(B, generator=generator) * n.cpu()).long() + 1
    score = torch.rand(B, L, generator=generator).to(x0.device).masked_fill(~eligible, 2.0)
    rank = score.argsort(1).argsort(1)
    mask = rank < k.to(x0.device)[:, None]
    p = k.float() / n.float().cpu()
    return Corrupted(torch.where(mask, torch.full_like(x0, mask_id), x0), mask, p.clone(), p)


def corrupt_exact_blocks(x0: torch.Tensor, mask_id: int, eligible: torch.Tensor, block_size: int, *,
                         generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`corrupt_exact` in every block of `block_size` positions (from 0) that has eligible tokens.

    Returns (xt, mask, weight): weight (B, L) is n_b / k_b of each position's block, so
    sum(CE * mask * weight) estimates the NLL of a block-factorised model. One block covering the
    whole row draws exactly as `corrupt_exact` (LLaDA's estimator).
    """
    B, L = x0.shape
    xt, mask, weight = x0.clone(), torch.zeros_like(eligible, dtype=torch.bool), torch.zeros(B, L)
    for lo in range(0, L, block_size):
        part = torch.zeros_like(eligible)
        part[:, lo:lo + block_size] = eligible[:, lo:lo + block_size]
        if not bool(part.any()):
            continue
        c = corrupt_exact(x0, mask_id, part, generator=generator)
        xt = torch.where(c.mask, c.xt, xt)
        mask |= c.mask
        weight[:, lo:lo + block_size] = 1.0 / c.p_mask[:, None]
    return xt, mask, weight
