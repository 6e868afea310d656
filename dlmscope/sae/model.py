"""Top-K and BatchTopK sparse autoencoders.

Encoder: pre = (x * s - b_dec) @ W_enc + b_enc, latents = ReLU of the k largest pre-activations
(BatchTopK: the k * batch largest over the whole batch while training; a learned threshold at
inference). Decoder: x_hat = (latents @ W_dec + b_dec) / s. The input scale s makes training see
activations of unit mean squared norm (DLM-Scope); `fold_input_scale` bakes it into the weights
before saving, so a saved SAE maps raw activations to raw reconstructions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DLMScopeError

ARCHITECTURES = ("topk", "batchtopk")


@dataclass
class SAEConfig:
    """Shape and provenance of one SAE."""

    d_in: int
    n_latents: int
    k: int
    architecture: str = "topk"
    metadata: dict = field(default_factory=dict)
    """model_name, hook_name, masking_policy, t_range, dataset_path, context_size, ..."""

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise DLMScopeError(f"unknown SAE architecture {self.architecture!r}; allowed: {', '.join(ARCHITECTURES)}")
        if not 0 < self.k < self.n_latents:
            raise DLMScopeError(f"k={self.k} must satisfy 0 < k < n_latents ({self.n_latents})")
        if self.d_in < 1:
            raise DLMScopeError(f"d_in={self.d_in} must be positive")

    @property
    def hook_name(self) -> str | None:
        return self.metadata.get("hook_name")

    @property
    def model_name(self) -> str | None:
        return self.metadata.get("model_name")


@dataclass
class SAEOutput:
    recon: torch.Tensor  # in the (scaled) training space
    values: torch.Tensor  # (N, k) top-k activations (BatchTopK: dense (N, n_latents))
    indices: torch.Tensor | None  # (N, k) latent ids, None for BatchTopK's dense path
    pre: torch.Tensor  # (N, n_latents) pre-activations
    x: torch.Tensor  # the scaled input


class TopKSAE(nn.Module):
    def __init__(self, cfg: SAEConfig, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        gen = torch.Generator().manual_seed(seed)
        w_dec = torch.randn(cfg.n_latents, cfg.d_in, generator=gen)
        w_dec = w_dec / w_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w_dec)
        self.W_enc = nn.Parameter(w_dec.t().clone())  # encoder starts as the decoder transpose
        self.b_enc = nn.Parameter(torch.zeros(cfg.n_latents))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))
        self.register_buffer("input_scale", torch.ones(()))
        self.register_buffer("threshold", torch.zeros(()))  # BatchTopK inference threshold

    @property
    def device(self) -> torch.device:
        return self.W_dec.device

    def check_input(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.cfg.d_in:
            raise DLMScopeError(f"activations have d_in={x.shape[-1]} but the SAE expects d_in={self.cfg.d_in}"
                                f" (hook {self.cfg.hook_name})")

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.input_scale - self.b_dec) @ self.W_enc + self.b_enc

    def encode_topk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, indices) of the k largest pre-activations after ReLU (Top-K rule, also for BatchTopK)."""
        self.check_input(x)
        values, indices = torch.topk(self.pre_acts(x), self.cfg.k, dim=-1, sorted=False)
        return F.relu(values), indices

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense latent activations (.., n_latents)."""
        if self.cfg.architecture == "batchtopk":
            self.check_input(x)
            pre = F.relu(self.pre_acts(x))
            return pre * (pre > self.threshold)
        values, indices = self.encode_topk(x)
        return torch.zeros(*x.shape[:-1], self.cfg.n_latents, dtype=values.dtype, device=x.device).scatter_(
            -1, indices, values)

    def decode(self, acts: torch.Tensor) -> torch.Tensor:
        """Raw-space reconstruction from dense latents."""
        return (acts @ self.W_dec + self.b_dec) / self.input_scale

    def decode_sparse(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Raw-space reconstruction from (values, indices) without building dense latents."""
        flat_v, flat_i = values.reshape(-1, values.shape[-1]), indices.reshape(-1, indices.shape[-1])
        out = F.embedding_bag(flat_i, self.W_dec, per_sample_weights=flat_v.to(self.W_dec.dtype), mode="sum")
        return ((out + self.b_dec) / self.input_scale).view(*values.shape[:-1], self.cfg.d_in)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.architecture == "batchtopk":
            return self.decode(self.encode(x))
        return self.decode_sparse(*self.encode_topk(x))

    def forward_train(self, x: torch.Tensor) -> SAEOutput:
        """Training forward in the scaled space (BatchTopK selects over the whole batch)."""
        self.check_input(x)
        xs = x * self.input_scale
        pre = (xs - self.b_dec) @ self.W_enc + self.b_enc
        if self.cfg.architecture == "batchtopk":
            flat = F.relu(pre).flatten()
            keep = torch.topk(flat, self.cfg.k * pre.shape[0], sorted=False)
            dense = torch.zeros_like(flat).scatter_(0, keep.indices, keep.values).view_as(pre)
            recon = dense @ self.W_dec + self.b_dec
            return SAEOutput(recon, dense, None, pre, xs)
        values, indices = torch.topk(pre, self.cfg.k, dim=-1, sorted=False)
        values = F.relu(values)
        recon = F.embedding_bag(indices, self.W_dec, per_sample_weights=values, mode="sum") + self.b_dec
        return SAEOutput(recon, values, indices, pre, xs)

    @torch.no_grad()
    def fold_input_scale(self) -> None:
        """Bake the input scale into the weights: same latents, raw-space inputs and outputs."""
        s = self.input_scale.clone()
        self.W_enc.mul_(s)
        self.W_dec.div_(s)
        self.b_dec.div_(s)
        self.input_scale.fill_(1.0)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Project out the gradient component along each decoder row (keeps rows on the unit sphere)."""
        if self.W_dec.grad is None:
            return
        w = self.W_dec / self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)
        self.W_dec.grad.sub_((self.W_dec.grad * w).sum(1, keepdim=True) * w)
