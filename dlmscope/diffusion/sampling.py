"""Token sampling: how a denoising step draws its predicted tokens x0 from the logits."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def gumbel_argmax(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """argmax of exp(logits) / (-log u)^temperature in float64 (LLaDA's Gumbel-max sampling)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.to(torch.float64)
    u = torch.rand(logits.shape, generator=generator, dtype=torch.float64).to(logits.device)
    return (logits.exp() / (-torch.log(u)) ** temperature).argmax(-1)


@dataclass(frozen=True)
class TokenSampling:
    """How the predicted tokens x0 are drawn: temperature, then Dream's top-p and top-k filters.

    Without filters x0 is LLaDA's float64 Gumbel-max draw; with them, a Gumbel-max draw from Dream's
    filtered distribution (the same distribution as Dream's categorical draw, other random numbers).
    """

    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None

    @property
    def filtered(self) -> bool:
        return (self.top_p is not None and self.top_p < 1) or bool(self.top_k)

    def distribution_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Dream's `sample_tokens` logits: / temperature (if > 0), top-p, then top-k; removed entries at finfo.min."""
        z = logits.float()
        if self.temperature > 0:
            z = z / self.temperature
        floor = torch.finfo(z.dtype).min
        if self.top_p is not None and self.top_p < 1:
            sorted_z, order = torch.sort(z, dim=-1, descending=True)
            cum = torch.cumsum(F.softmax(sorted_z, dim=-1), dim=-1)
            drop = torch.zeros_like(cum, dtype=torch.bool)
            drop[..., 1:] = cum[..., :-1] > self.top_p  # keep the token that crosses top_p
            z = z.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), floor)
        if self.top_k:
            kth = torch.topk(z, min(self.top_k, z.shape[-1]), dim=-1).values[..., -1:]
            z = z.masked_fill(z < kth, floor)
        return z

    def draw(self, logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        if not self.filtered:
            return gumbel_argmax(logits, self.temperature, generator)
        z = self.distribution_logits(logits)
        if self.temperature == 0:
            return z.argmax(-1)
        u = torch.rand(z.shape, generator=generator, dtype=torch.float64).to(z.device)
        return (z.double() - torch.log(-torch.log(u))).argmax(-1)
