"""Training one Top-K SAE on a stream of activation batches (the data provider lives elsewhere).

Loss = MSE + aux_coef * min(n_dead / k_aux, 1) * AuxK, in the scaled space where activations
have unit mean squared norm:
- MSE = mean over tokens of |x - x_hat|^2.
- AuxK (for dead latents): e = x - x_hat (the residual; b_dec cancels in it), e_hat = the
  decode of the k_aux largest pre-activations among dead latents, WITHOUT b_dec, so prediction
  and target agree about b_dec. AuxK = mean |e - e_hat|^2 / mean |e - mean(e)|^2.
A latent is dead once it has not fired for `dead_tokens` tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import DLMScopeError
from .metrics import fvu
from .model import SAEConfig, TopKSAE


@dataclass
class TrainConfig:
    """Optimisation of one SAE."""

    total_tokens: int = 1_000_000
    """Tokens the SAE trains on."""
    batch_size: int = 4096
    """Activation vectors per optimiser step."""
    lr: float | None = None
    """Learning rate; default 2e-4 / sqrt(n_latents / 2^14)."""
    warmup_steps: int = 50
    """Linear warm-up steps."""
    decay_fraction: float = 0.2
    """The final fraction of steps over which the learning rate decays linearly to zero."""
    aux_coef: float = 1 / 32
    """AuxK loss coefficient."""
    k_aux: int | None = None
    """Dead latents used by AuxK; default d_in // 2."""
    dead_tokens: int | None = None
    """Tokens without firing before a latent counts as dead; default min(10M, total_tokens // 5)."""
    b_dec_init: str = "geometric_median"
    """geometric_median or mean of the first batch."""
    autocast_bf16: bool = False
    """bfloat16 autocast for the SAE forward (GPU)."""
    seed: int = 0
    """Seed of the SAE's initial weights."""

    def __post_init__(self) -> None:
        if self.b_dec_init not in ("geometric_median", "mean"):
            raise DLMScopeError(f"b_dec_init={self.b_dec_init!r}; allowed: geometric_median, mean")
        if self.total_tokens < self.batch_size:
            raise DLMScopeError(f"total_tokens={self.total_tokens} is less than one batch ({self.batch_size})")

    @property
    def steps(self) -> int:
        return self.total_tokens // self.batch_size


def geometric_median(x: torch.Tensor, iters: int = 20) -> torch.Tensor:
    """Weiszfeld iterations from the mean."""
    y = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - y).norm(dim=1).clamp_min(1e-8)
        y = (w[:, None] * x).sum(0) / w.sum()
    return y


class SAETrainer:
    """Adam on one TopKSAE; `step(x)` takes raw activations (N, d_in)."""

    def __init__(self, sae_cfg: SAEConfig, cfg: TrainConfig, device: str | torch.device = "cpu"):
        self.cfg = cfg
        self.sae = TopKSAE(sae_cfg, seed=cfg.seed).to(device)
        self.lr = cfg.lr if cfg.lr is not None else 2e-4 / math.sqrt(sae_cfg.n_latents / 2**14)
        self.k_aux = cfg.k_aux or max(1, sae_cfg.d_in // 2)
        self.dead_tokens = cfg.dead_tokens or max(cfg.batch_size, min(10_000_000, cfg.total_tokens // 5))
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=self.lr, betas=(0.9, 0.999))
        self.step_count = 0
        self.tokens = 0
        self.since_fired = torch.zeros(sae_cfg.n_latents, dtype=torch.long, device=device)
        self.initialised = False

    def lr_at(self, step: int) -> float:
        steps = max(1, self.cfg.steps)
        if step < self.cfg.warmup_steps:
            return self.lr * (step + 1) / self.cfg.warmup_steps
        decay_start = int(steps * (1 - self.cfg.decay_fraction))
        if step >= decay_start:
            return self.lr * max(0.0, (steps - step) / max(1, steps - decay_start))
        return self.lr

    @torch.no_grad()
    def initialise(self, x: torch.Tensor, reduce=None) -> None:
        """Input scale and b_dec from the first batch (`reduce` averages across processes)."""
        x = x.float()
        mean_sq = (x ** 2).sum(-1).mean()
        if reduce is not None:
            mean_sq = reduce(mean_sq)
        scale = 1.0 / mean_sq.sqrt().clamp_min(1e-8)
        self.sae.input_scale.fill_(float(scale))
        xs = x * scale
        b = geometric_median(xs) if self.cfg.b_dec_init == "geometric_median" else xs.mean(0)
        if reduce is not None:
            b = reduce(b)
        self.sae.b_dec.copy_(b)
        self.initialised = True

    def step(self, x: torch.Tensor, reduce=None) -> dict:
        """One optimiser step. `reduce` (e.g. an all-reduce mean) makes it data-parallel."""
        x = x.to(self.sae.device, torch.float32)
        if not self.initialised:
            self.initialise(x, reduce)
        sae = self.sae
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.cfg.autocast_bf16):
            out = sae.forward_train(x)
            err = out.x - out.recon
            mse = (err.float() ** 2).sum(-1).mean()
            dead = self.since_fired >= self.dead_tokens
            n_dead = int(dead.sum())
            aux = torch.zeros((), device=x.device)
            if n_dead > 0:
                k_aux = min(self.k_aux, n_dead)
                pre_dead = out.pre.masked_fill(~dead, float("-inf"))
                vals, idx = torch.topk(pre_dead, k_aux, dim=-1, sorted=False)
                e_hat = F.embedding_bag(idx, sae.W_dec, per_sample_weights=F.relu(vals).to(sae.W_dec.dtype), mode="sum")
                e = err.detach().float()
                aux = ((e - e_hat.float()) ** 2).sum(-1).mean() / ((e - e.mean(0)) ** 2).sum(-1).mean().clamp_min(1e-8)
                aux = aux * min(n_dead / self.k_aux, 1.0)
            loss = mse + self.cfg.aux_coef * aux
        for g in self.opt.param_groups:
            g["lr"] = self.lr_at(self.step_count)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if reduce is not None:
            for p in sae.parameters():
                p.grad = reduce(p.grad)
        sae.remove_parallel_grad()
        self.opt.step()
        sae.normalize_decoder()
        with torch.no_grad():
            if out.indices is not None:
                fired = torch.zeros_like(self.since_fired, dtype=torch.bool)
                fired[out.indices[out.values > 0]] = True
            else:
                fired = (out.values > 0).any(0)
            if reduce is not None:
                fired = reduce(fired.float()) > 0
            if out.indices is None:  # BatchTopK: EMA of the smallest kept activation is the inference threshold
                positive = out.values[out.values > 0]
                if positive.numel():
                    t = float(positive.min())
                    if self.step_count == 0:
                        sae.threshold.fill_(t)
                    else:
                        sae.threshold.mul_(0.99).add_(0.01 * t)
        n = x.shape[0]
        self.since_fired += n
        self.since_fired[fired] = 0
        self.step_count += 1
        self.tokens += n
        l0 = float((out.values > 0).float().sum() / n)
        return {"loss": float(loss.detach()), "mse": float(mse.detach()), "aux": float(aux.detach()),
                "fvu": fvu(out.x, out.recon.detach()),
                "l0": l0, "dead_fraction": n_dead / sae.cfg.n_latents, "lr": self.lr_at(self.step_count - 1)}

    def state_dict(self) -> dict:
        """A snapshot (copies, not views of live tensors), so later steps cannot change it."""
        import copy

        return copy.deepcopy({"sae": self.sae.state_dict(), "opt": self.opt.state_dict(), "step": self.step_count,
                              "tokens": self.tokens, "since_fired": self.since_fired, "initialised": self.initialised})

    def load_state_dict(self, state: dict) -> None:
        self.sae.load_state_dict(state["sae"])
        self.opt.load_state_dict(state["opt"])
        self.step_count, self.tokens = state["step"], state["tokens"]
        self.since_fired.copy_(state["since_fired"])
        self.initialised = state["initialised"]
