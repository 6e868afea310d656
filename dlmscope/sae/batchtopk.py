"""BatchTopK SAEs (Bussmann, Leask, Nanda 2024): the k * N largest activations over a training batch.

Training keeps the k * N largest ReLU'd pre-activations over a batch of N tokens (k per token on
average); inference (`encode`) keeps every ReLU'd pre-activation above a threshold, an EMA (rate 0.01)
of the smallest activation kept in each training batch -- SAELens' rule, which is also how SAELens
saves a BatchTopK SAE: as "jumprelu" with that threshold for every latent (`metadata.k` and
`metadata.dlmscope_architecture` record ours).
"""

from __future__ import annotations

import torch

from ..errors import DLMScopeError
from .model import SAE, SAEConfig, SAEOutput, register_architecture


def jumprelu_fields(sae: SAE, threshold: torch.Tensor, meta: dict, weights: dict[str, torch.Tensor]) -> None:
    """What SAELens' "jumprelu" files hold beyond the base weights: a threshold per latent (and our k)."""
    meta.update(dlmscope_architecture=sae.cfg.architecture, k=sae.cfg.k)
    weights["threshold"] = torch.broadcast_to(threshold.detach().float(), (sae.cfg.n_latents,)).contiguous()


def file_threshold(weights: dict[str, torch.Tensor], where: str) -> torch.Tensor:
    """The `threshold` tensor of a SAELens "jumprelu*" file."""
    if "threshold" not in weights:
        raise DLMScopeError(f"{where!r} lacks 'threshold'")
    return weights["threshold"].float()


@register_architecture("batchtopk", saved_as="jumprelu")
class BatchTopKSAE(SAE):
    """BatchTopK in training, one threshold at inference."""

    sparse_training = False
    threshold: torch.Tensor

    def __init__(self, cfg: SAEConfig, seed: int = 0):
        super().__init__(cfg, seed)
        self.register_buffer("threshold", torch.zeros(()))

    def saelens_fields(self, cfg: dict, meta: dict, weights: dict[str, torch.Tensor]) -> None:
        jumprelu_fields(self, self.threshold, meta, weights)

    def load_saelens_fields(self, weights: dict[str, torch.Tensor], where: str) -> None:
        t = file_threshold(weights, where)
        if t.numel() != self.cfg.n_latents or not bool(torch.all(t == t[0])):
            raise DLMScopeError(f"{where!r}: a {self.cfg.architecture} SAE needs one threshold for every latent")
        self.threshold.copy_(t[0])

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense latent activations: every ReLU'd pre-activation above the inference threshold."""
        pre = self.pre_acts(x)
        return pre.relu() * (pre > self.threshold)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """decode(encode(x)) (plus a skip transcoder's linear path)."""
        return self.decode(self.encode(x)) + self._skip(x * self.input_scale) / self.output_scale

    def _select(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The k * N largest ReLU'd pre-activations of the batch, dense."""
        flat = pre.relu().flatten()
        keep = flat.topk(self.cfg.k * pre.shape[0], sorted=False)
        dense = torch.zeros_like(flat).scatter(0, keep.indices, keep.values).view_as(pre)
        return dense, dense, None

    @torch.no_grad()
    def after_step(self, out: SAEOutput, step: int, cfg) -> None:
        """The inference threshold: an EMA (rate 0.01) of the smallest activation kept per batch."""
        positive = out.values[out.values > 0]
        if positive.numel():
            t = positive.min().float()
            self.threshold.copy_(t if step == 0 else 0.99 * self.threshold + 0.01 * t)
