"""SAE quality metrics. Formulas are stated because the anchors disagree on them.

FVU (fraction of variance unexplained), textbook, over a set of N tokens:

    FVU = sum_i |x_i - x_hat_i|^2 / sum_i |x_i - mean(x)|^2,   mean(x) = (1/N) sum_i x_i (per dimension)

i.e. total squared error over the total variance about the mean token. Explained variance = 1 - FVU.
SAELens' older "explained variance" (still logged as `explained_variance_legacy`) is instead the mean
over tokens of the per-token ratio 1 - |x_i - x_hat_i|^2 / |x_i - mean(x)|^2, which tokens close to
the mean dominate; sparsify's `fvu` is the textbook ratio per batch.
"""

from __future__ import annotations

import torch


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Textbook fraction of variance unexplained of x_hat for x, both (N, d)."""
    x, x_hat = x.detach().double(), x_hat.detach().double()
    return float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-30))


def explained_variance(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """1 - FVU."""
    return 1.0 - fvu(x, x_hat)


def cosine(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Mean over tokens of cos(x_i, x_hat_i)."""
    return float(torch.nn.functional.cosine_similarity(x.detach().float(), x_hat.detach().float(), dim=-1).mean())


def l0(latents: torch.Tensor) -> float:
    """Mean number of active latents per token of dense latents (.., n_latents)."""
    return float((latents > 0).float().sum(-1).mean())


def density(latents: torch.Tensor) -> torch.Tensor:
    """Firing frequency of each latent over the tokens of dense `latents` (.., n_latents)."""
    return (latents > 0).reshape(-1, latents.shape[-1]).float().mean(0)


def fire_counts(values: torch.Tensor, indices: torch.Tensor, n_latents: int) -> torch.Tensor:
    """Per latent, how many of the rows of a top-k selection (values, indices), each (.., k), hold it with a positive
    activation: a count per latent, cheaper than boolean-mask indexing of dense latents."""
    return torch.zeros(n_latents, device=indices.device).index_add_(0, indices.flatten(),
                                                                    (values > 0).flatten().float())


def dead_fraction(dens: torch.Tensor) -> float:
    """Fraction of latents that never fired (density 0) on the measured set."""
    return float((dens == 0).float().mean())


def log10_density_histogram(dens: torch.Tensor, bins: int = 40, floor: float = -8.0) -> dict:
    """Histogram of log10 feature density over [floor, 0]; dead latents sit in the lowest bin."""
    logd = torch.log10(dens.float().clamp_min(10 ** floor))
    counts = torch.histc(logd, bins=bins, min=floor, max=0.0)
    edges = torch.linspace(floor, 0.0, bins + 1)
    return {"edges": edges.tolist(), "counts": counts.long().tolist()}


@torch.no_grad()
def evaluate_sae(sae, x: torch.Tensor, batch_size: int = 4096, target: torch.Tensor | None = None) -> dict:
    """FVU, explained variance, cosine, L0, dead fraction and per-latent density of an SAE on raw activations (N, d_in).

    Streams over batches; FVU is the textbook ratio over the whole set (float64 sums). `target` is what a
    transcoder predicts (default: x itself).
    """
    x = x.reshape(-1, x.shape[-1])
    y = x if target is None else target.reshape(-1, target.shape[-1])
    mean = y.double().mean(0).to(sae.device)
    fired = torch.zeros(sae.cfg.n_latents, dtype=torch.float64, device=sae.device)
    err = var = cos = 0.0
    for i in range(0, x.shape[0], batch_size):
        xb = x[i:i + batch_size].to(sae.device, sae.W_dec.dtype)
        yb = y[i:i + batch_size].to(sae.device, sae.W_dec.dtype)
        lat = sae.encode(xb)
        y_hat = sae.reconstruct(xb)
        fired += (lat > 0).sum(0)
        err += float((yb.double() - y_hat.double()).pow(2).sum())
        var += float((yb.double() - mean).pow(2).sum())
        cos += float(torch.nn.functional.cosine_similarity(yb, y_hat, dim=-1).double().sum())
    n = x.shape[0]
    dens = (fired / n).float()
    value = err / max(var, 1e-30)
    return {"fvu": value, "explained_variance": 1 - value, "cosine": cos / n, "l0": float(fired.sum()) / n,
            "dead_fraction": dead_fraction(dens), "density": dens.cpu()}
