"""Matryoshka BatchTopK SAEs (Bussmann, Nabeshima, Karvonen, Nanda 2025): nested dictionaries in one.

With prefix sizes m_1 < ... < m_n = n_latents and f the BatchTopK latents, the loss sums the
reconstruction error of every prefix, each decoding only the first m_i latents:

    loss = sum_i (1/N) sum_tokens |x - (f[:, :m_i] W_dec[:m_i] + b_dec)|^2   (+ AuxK)

so early latents must reconstruct on their own and cannot hand general directions to later ones
(less feature absorption). Inference, thresholds and the SAELens file ("jumprelu" with one threshold)
are BatchTopK's; `metadata.prefix_sizes` records the nesting.
"""

from __future__ import annotations

import torch

from ..errors import DLMScopeError
from .batchtopk import BatchTopKSAE
from .model import SAEConfig, SAEOutput, register_architecture


@register_architecture("matryoshka", saved_as="jumprelu")
class MatryoshkaSAE(BatchTopKSAE):
    """BatchTopK with nested prefix losses; the trainer's MSE is the last (full) prefix's term."""

    @classmethod
    def check_config(cls, cfg: SAEConfig) -> None:
        """Prefix sizes strictly increase and end at n_latents (default n/16, n/4, n)."""
        sizes = list(cfg.prefix_sizes) or [cfg.n_latents // 16, cfg.n_latents // 4]
        sizes = sizes if sizes[-1] == cfg.n_latents else sizes + [cfg.n_latents]
        if any(b <= a for a, b in zip([0] + sizes, sizes)) or sizes[-1] > cfg.n_latents:
            raise DLMScopeError(f"matryoshka prefix sizes {list(cfg.prefix_sizes)} must strictly increase "
                                f"within 1..{cfg.n_latents} (the width)")
        cfg.prefix_sizes = tuple(int(m) for m in sizes)

    def saelens_fields(self, cfg: dict, meta: dict, weights: dict[str, torch.Tensor]) -> None:
        super().saelens_fields(cfg, meta, weights)
        meta["prefix_sizes"] = list(self.cfg.prefix_sizes)

    def prefix_reconstructions(self, out: SAEOutput) -> list[torch.Tensor]:
        """Scaled-space reconstructions from each prefix of latents, the full one last."""
        recons, partial, start = [], self.b_dec.expand_as(out.x), 0
        for m in self.cfg.prefix_sizes:
            partial = partial + out.values[:, start:m] @ self.W_dec[start:m]
            recons.append(partial)
            start = m
        return recons

    def extra_loss(self, out: SAEOutput, step: int, cfg) -> tuple[torch.Tensor, dict]:
        """The prefix losses other than the full dictionary's (the trainer adds that one as its MSE)."""
        losses = [(out.x - r).pow(2).sum(-1).mean() for r in self.prefix_reconstructions(out)[:-1]]
        total = torch.stack(losses).sum() if losses else out.x.new_zeros(())
        return total, {f"mse_prefix_{m}": float(v.detach()) for m, v in zip(self.cfg.prefix_sizes, losses)}
