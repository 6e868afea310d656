"""Optimisers for SAE training, chosen by name (`--optimizer`).

- `adam`: torch's Adam (fused where available), lr 2e-4 / sqrt(n_latents / 2^14), warm-up and a linear
  decay over the last `decay_fraction` of steps (OpenAI's recipe).
- `signum_sf`: sign descent under schedule-free averaging (Defazio et al. 2024, "The Road Less
  Scheduled"), the combination sparsify trains with by default; our own implementation. Three iterates
  per parameter: z takes the sign steps, z <- z - lr * sign(grad); x is the running average of z with
  weights lr_t^2 (so warm-up steps count less), x <- x + c_t (z - x), c_t = lr_t^2 / sum lr^2; the
  gradient is taken at y = beta x + (1 - beta) z (beta 0.95), which is what the parameter holds during
  training; x is not stored but recovered from y and z.
  The average x is the model to evaluate and save (`averaged`). No decay: averaging replaces it.
  lr 2.5e-3 / sqrt(n_latents / 2^14), half sparsify's, and 10 warm-up steps. At sparsify's lr 12% of the latents
  were dead over a 300k-token run at batch 1,024 (20% in its last quarter; `bench_sae_steps.py`) and AuxK over them
  slowed the steps; at half the lr 3% were, and the held-out FVU was lower in 3 of the 4 cells of
  `bench_optimizers.py`'s sweep; the fourth (batch 4,096, 73 steps in all) needed the shorter warm-up.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch


class SignScheduleFree(torch.optim.Optimizer):
    """Sign descent with schedule-free averaging; `averaged()` swaps the average x into the parameters.

    State per parameter: z and the weight sum. The average is recovered from the parameter (y) as
    x = (y - (1 - beta) z) / beta, so edits the trainer makes to y between steps (decoder rows renormalised
    to unit norm) carry into the average too; a separately stored x would drift away from them.
    """

    def __init__(self, params, lr: float, beta: float = 0.95):
        super().__init__(params, {"lr": lr, "beta": beta})

    @torch.no_grad()
    def step(self, closure=None):
        """The docstring's three updates in one closed form on y, in place: substituting
        x = (y - (1 - beta) z) / beta into y' = beta x' + (1 - beta) z' gives
        y' = y + c (z - y) - (1 - beta (1 - c)) lr sign(g), with z before its step z' = z - lr sign(g).
        The gradient is replaced by its sign (in its own layout: W_enc's is a transposed view, and a sign copied
        into the parameter's layout made the step twice as slow in a training run)."""
        for group in self.param_groups:
            lr, beta = group["lr"], group["beta"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["z"] = p.detach().clone()
                    st["weight_sum"] = 0.0  # a float: Optimizer.load_state_dict casts tensors to the parameter dtype
                if lr == 0:
                    continue
                z, sign = st["z"], p.grad.sign_()
                st["weight_sum"] += lr * lr
                c = lr * lr / st["weight_sum"]
                p.lerp_(z, c).sub_(sign, alpha=(1 - beta * (1 - c)) * lr)
                z.sub_(sign, alpha=lr)

    @staticmethod
    def _average(p: torch.Tensor, z: torch.Tensor, beta: float) -> torch.Tensor:
        return p.detach().sub(z, alpha=1 - beta).div_(beta)

    @contextmanager
    def averaged(self):
        """Parameters hold the average x inside the block and the training point y again after it."""
        if getattr(self, "_swapped", False):  # nested: already averaged
            yield
            return
        kept = []
        for g in self.param_groups:
            for p in g["params"]:
                if self.state[p]:
                    x = self._average(p, self.state[p]["z"], g["beta"])
                    kept.append((p, p.data))
                    p.data = x
        self._swapped = True
        try:
            yield
        finally:
            for p, y in kept:
                p.data = y
            self._swapped = False


@dataclass(frozen=True)
class OptimizerSpec:
    base_lr: float
    """lr at 2^14 latents; scaled by 1 / sqrt(n_latents / 2^14)."""
    decays: bool
    """Whether the lr decays linearly over the last decay_fraction of steps."""
    warmup_steps: int
    """Default steps of linear warm-up (`OptimiserConfig.warmup_steps` unset)."""


OPTIMIZERS = {"adam": OptimizerSpec(2e-4, True, 50), "signum_sf": OptimizerSpec(2.5e-3, False, 10)}


def default_optimizer(architecture: str) -> str:
    """signum_sf for Top-K SAEs, where `benchmarks/bench_sae_grid.py` measured it against sparsify's default and
    Adam; adam for the other architectures and crosscoders, which it did not measure."""
    return "signum_sf" if architecture == "topk" else "adam"


def default_lr(name: str, n_latents: int) -> float:
    return OPTIMIZERS[name].base_lr / math.sqrt(n_latents / 2**14)


def make_optimizer(name: str, params, lr: float, device: str | torch.device) -> torch.optim.Optimizer:
    if name == "signum_sf":
        return SignScheduleFree(params, lr)
    fused = {"fused": True} if torch.device(device).type in ("cpu", "cuda") else {}
    return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), **fused)


@contextmanager
def averaged(opt: torch.optim.Optimizer):
    """The weights to evaluate and save: the schedule-free average where there is one, else as they are."""
    if isinstance(opt, SignScheduleFree):
        with opt.averaged():
            yield
    else:
        yield
