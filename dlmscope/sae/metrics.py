"""SAE quality metrics. Formulas are stated because the anchors disagree on them.

FVU (fraction of variance unexplained) = sum_i |x_i - x_hat_i|^2 / sum_i |x_i - mean(x)|^2 over a
batch of N tokens, the mean taken over tokens per dimension (textbook; SAELens' "explained
variance" instead averages a per-token ratio). Explained variance = 1 - FVU.
"""

from __future__ import annotations

import torch


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    x, x_hat = x.float(), x_hat.float()
    return float(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum().clamp_min(1e-12))


def cosine(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(x.float(), x_hat.float(), dim=-1).mean())


def l0(latents: torch.Tensor) -> float:
    return float((latents > 0).float().sum(-1).mean())


def density(latents: torch.Tensor) -> torch.Tensor:
    """Firing frequency of each latent over the tokens of `latents` (N, n_latents)."""
    return (latents > 0).float().mean(0)


def log10_density_histogram(dens: torch.Tensor, bins: int = 40, floor: float = -8.0) -> dict:
    """Histogram of log10 feature density; dead latents sit in the lowest bin (at `floor`)."""
    logd = torch.log10(dens.float().clamp_min(10 ** floor))
    counts = torch.histc(logd, bins=bins, min=floor, max=0.0)
    edges = torch.linspace(floor, 0.0, bins + 1)
    return {"edges": edges.tolist(), "counts": counts.long().tolist()}


@torch.no_grad()
def evaluate_sae(sae, x: torch.Tensor, batch_size: int = 4096) -> dict:
    """L0, FVU, explained variance, cosine, dead fraction (on this set) and density of a raw-space SAE."""
    recons, lats = [], []
    for i in range(0, x.shape[0], batch_size):
        xb = x[i:i + batch_size].to(sae.device, sae.W_dec.dtype)
        lat = sae.encode(xb)
        lats.append((lat > 0).float().sum(0))
        recons.append(sae.decode(lat).float())
    x_hat = torch.cat(recons)
    fired = torch.stack(lats).sum(0)
    xf = x.float().to(x_hat.device)
    dens = fired / x.shape[0]
    value = fvu(xf, x_hat)
    return {"fvu": value, "explained_variance": 1 - value, "cosine": cosine(xf, x_hat),
            "l0": float(fired.sum() / x.shape[0]), "dead_fraction": float((fired == 0).float().mean()),
            "density": dens.cpu()}
