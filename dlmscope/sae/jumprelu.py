"""JumpReLU SAEs (Rajamanoharan et al. 2024): per-latent thresholds trained through an L0 penalty.

    f_j = z_j * H(z_j - theta_j),   z = (x - b_dec) W_enc + b_enc,   theta_j > 0
    loss = |x - x_hat|^2 + lambda * sum_j H(z_j - theta_j)

H has no useful derivative, so both JumpReLU and H get straight-through estimates with the rectangle
kernel K(u) = 1{-1/2 < u < 1/2} of bandwidth eps (only theta receives them; x, W_enc and b_enc get the
exact gradient of z * H(z - theta), i.e. H):

    d JumpReLU / d theta = -(theta / eps) K((z - theta) / eps),   d H / d theta = -(1 / eps) K((z - theta) / eps)

lambda warms up linearly from 0 over the first `l0_warmup` fraction of steps. With `target_l0` > 0
(the default: the SAE's k) lambda is then steered multiplicatively, lambda *= exp(0.01 (L0 / target - 1))
per step, so runs can be compared at matched sparsity; `target_l0 = 0` keeps lambda = `l0_coef`.
Thresholds start at the one value that gives L0 = k on the first batch. Saved in SAELens' "jumprelu"
format (threshold per latent), which applies ReLU then the same gate.
"""

from __future__ import annotations

import math

import torch

from ..errors import DLMScopeError
from .batchtopk import file_threshold, jumprelu_fields
from .model import SAE, SAEConfig, SAEOutput, register_architecture


def rectangle(u: torch.Tensor) -> torch.Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, theta, eps: float):
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return z * (z > theta)

    @staticmethod
    def backward(ctx, g):
        z, theta = ctx.saved_tensors
        grad_theta = (-(theta / ctx.eps) * rectangle((z - theta) / ctx.eps) * g).reshape(-1, z.shape[-1]).sum(0)
        return (z > theta) * g, grad_theta, None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, theta, eps: float):
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, g):
        z, theta = ctx.saved_tensors
        grad_theta = (-(1.0 / ctx.eps) * rectangle((z - theta) / ctx.eps) * g).reshape(-1, z.shape[-1]).sum(0)
        return torch.zeros_like(z), grad_theta, None


def jumprelu(z: torch.Tensor, theta: torch.Tensor, eps: float) -> torch.Tensor:
    """z * H(z - theta) with the straight-through threshold gradient."""
    return _JumpReLU.apply(z, theta, eps)


def step(z: torch.Tensor, theta: torch.Tensor, eps: float) -> torch.Tensor:
    """H(z - theta) with the straight-through threshold gradient (zero gradient to z)."""
    return _Step.apply(z, theta, eps)


@register_architecture("jumprelu", saved_as="jumprelu", reads_saelens=True)
class JumpReLUSAE(SAE):
    """A JumpReLU SAE; `cfg.k` is the target L0 (and the width of `encode_topk` views)."""

    sparse_training = False
    l0_coef: torch.Tensor

    def __init__(self, cfg: SAEConfig, seed: int = 0):
        super().__init__(cfg, seed)
        self.threshold = torch.nn.Parameter(torch.full((cfg.n_latents,), 1e-3))
        self.register_buffer("l0_coef", torch.zeros(()))  # the current lambda (trained state)
        self.bandwidth = 1e-3

    @classmethod
    def default_k(cls, d_sae: int) -> int | None:
        """A foreign JumpReLU SAE records no k: it only sizes per-token top-k views here."""
        return min(32, d_sae - 1)

    def saelens_fields(self, cfg: dict, meta: dict, weights: dict[str, torch.Tensor]) -> None:
        jumprelu_fields(self, self.threshold, meta, weights)

    def load_saelens_fields(self, weights: dict[str, torch.Tensor], where: str) -> None:
        t = file_threshold(weights, where)
        if t.shape != self.threshold.shape:
            raise DLMScopeError(f"{where!r}: threshold has shape {tuple(t.shape)}, expected {tuple(self.threshold.shape)}")
        self.threshold.copy_(t)

    def configure_training(self, cfg) -> None:
        self.bandwidth = cfg.bandwidth

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.pre_acts(x)
        return pre.relu() * (pre > self.threshold)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """decode(encode(x)): every latent above its threshold, not only the k largest."""
        return self.decode(self.encode(x))

    def encode_topk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The k largest JumpReLU activations per token (zeros where fewer than k fire)."""
        return self.encode(x).topk(self.cfg.k, dim=-1, sorted=False)

    def forward(self, x: torch.Tensor, dead_mask: torch.Tensor | None = None, k_aux: int = 0,
                target: torch.Tensor | None = None) -> SAEOutput:
        """Training forward in the scaled space; no AuxK (the L0 penalty governs dead latents)."""
        self.check_input(x)
        xs = x * self.input_scale
        pre = (xs - self.b_dec) @ self.W_enc + self.b_enc
        f = jumprelu(pre, self.threshold, self.bandwidth)
        return SAEOutput(xs, f @ self.W_dec + self.b_dec, f, None, self.cfg.n_latents, pre=pre)

    def _target(self, cfg) -> int:
        return self.cfg.k if cfg.target_l0 is None else cfg.target_l0

    def extra_loss(self, out: SAEOutput, step_: int, cfg) -> tuple[torch.Tensor, dict]:
        """lambda * mean over tokens of the L0 (straight-through in theta), lambda warmed up."""
        assert out.pre is not None  # this class's forward always records it
        l0 = step(out.pre, self.threshold, self.bandwidth).sum(-1).mean()
        warm = min(1.0, (step_ + 1) / max(1.0, cfg.l0_warmup * cfg.steps))
        if self._target(cfg) == 0 or step_ == 0:
            self.l0_coef.fill_(cfg.l0_coef)
        lam = float(self.l0_coef) * warm
        return lam * l0, {"l0_coef": lam}

    @torch.no_grad()
    def after_step(self, out: SAEOutput, step_: int, cfg) -> None:
        """Keep thresholds positive; steer lambda towards the target L0."""
        self.threshold.clamp_(min=1e-6)
        target = self._target(cfg)
        if target > 0:
            l0 = float((out.values > 0).sum()) / out.values.shape[0]
            self.l0_coef.mul_(math.exp(0.01 * (l0 / target - 1)))

    @torch.no_grad()
    def init_from_batch(self, x: torch.Tensor) -> None:
        """One threshold for every latent, chosen so the first batch has L0 = k."""
        pre = self.pre_acts(x).flatten()
        self.threshold.fill_(float(pre.topk(self.cfg.k * x.shape[0]).values[-1].clamp_min(1e-6)))
