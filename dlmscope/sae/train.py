"""Training one Top-K SAE on a stream of activation batches (the data provider lives elsewhere).

All losses live in the scaled space where activations have unit mean squared norm. Per batch of N
tokens, with e = x - x_hat the residual (x_hat includes b_dec, so b_dec cancels in e):

    MSE  = (1/N) sum_i |x_i - x_hat_i|^2
    AuxK = min(n_dead / k_aux, 1) * (1/N) sum_i |e_i - e_hat_i|^2 / ((1/N) sum_i |e_i - mean(e)|^2)
    loss = MSE + aux_coef * AuxK

e_hat = sum over the min(k_aux, n_dead) largest ReLU'd pre-activations among dead latents of
act * W_dec[latent], decoded WITHOUT b_dec, so prediction and target agree about b_dec; e is detached
(the gradient flows through e_hat into the dead latents' encoder and decoder rows). The scale
min(n_dead / k_aux, 1) is SAELens'; normalising by the residual's variance is OpenAI's /
dictionary_learning's (SAELens leaves AuxK unnormalised, sparsify divides by the variance of x).
A latent is dead once it has not fired for `dead_tokens` tokens.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Generic, Literal, TypeVar

import torch
from torch import nn

from .. import checks
from ..errors import DLMScopeError
from ..options import Options, choices, unset
from .metrics import evaluate_sae, fire_counts
from .family import build_sae
from .model import SAE, SAEConfig
from .optim import OPTIMIZERS, averaged, default_lr, default_optimizer, make_optimizer

Reduce = Callable[[torch.Tensor], torch.Tensor]
ModelT = TypeVar("ModelT", bound=nn.Module)


class NonFiniteError(DLMScopeError):
    """A step produced NaN / inf (loss, gradients or weights): runs stop on it and keep their last good checkpoint."""


@dataclass
class OptimiserConfig(Options):
    """The optimiser and its schedule, the AuxK loss and b_dec's initialisation (any dictionary)."""

    lr: float | None = field(default=None, metadata=unset("adam 2e-4, signum_sf 2.5e-3, over sqrt(n_latents / 2^14)"))
    """Learning rate."""
    optimizer: str | None = field(default=None, metadata=choices(
        lambda: tuple(OPTIMIZERS), "signum_sf for Top-K SAEs, adam for the other architectures, crosscoders and diff's SAEs"))
    """signum_sf (sign descent, schedule-free averaging: the lower FVU, more dead latents) or adam (warm-up, decay)."""
    warmup_steps: int | None = field(default=None, metadata=unset("adam 50, signum_sf 10"))
    """Steps of linear learning-rate warm-up from lr / warmup_steps to lr."""
    decay_fraction: float = 0.2
    """The final fraction of steps over which the learning rate decays linearly to zero (adam only)."""
    aux_coef: float = 1 / 32
    """AuxK loss coefficient (0 turns AuxK off)."""
    k_aux: int | None = field(default=None, metadata=unset("d_in // 2"))
    """Dead latents per token in the AuxK prediction."""
    dead_tokens: int | None = field(default=None, metadata=unset("min(10M, total_tokens // 5)"))
    """Tokens without firing before a latent counts as dead (10M is the published window, scaled down so
    short runs can still see and revive dead latents)."""
    b_dec_init: Literal["geometric_median", "mean"] = "geometric_median"
    """Initial b_dec from the first batch: geometric_median (Weiszfeld iterations) or mean."""

    def check(self) -> None:
        if self.lr is not None:
            checks.number("lr", self.lr, 0.0, low_open=True)
        if self.warmup_steps is not None:
            checks.non_negative("warmup_steps", self.warmup_steps)
        checks.number("decay_fraction", self.decay_fraction, 0.0, 1.0)
        checks.number("aux_coef", self.aux_coef, 0.0)
        for name in ("k_aux", "dead_tokens"):
            if getattr(self, name) is not None:
                checks.positive(name, getattr(self, name))


@dataclass
class JumpReLUConfig(Options):
    """JumpReLU's L0 penalty and threshold gradient (read by JumpReLU SAEs only)."""

    l0_coef: float = 1e-3
    """JumpReLU: initial L0 penalty coefficient lambda (in the unit-mean-squared-norm space)."""
    l0_warmup: float = 0.1
    """JumpReLU: fraction of steps over which lambda warms up linearly from 0."""
    target_l0: int | None = field(default=None, metadata=unset("the SAE's k"))
    """JumpReLU: L0 that lambda is steered towards (0 keeps lambda fixed)."""
    bandwidth: float = 0.05
    """JumpReLU: width of the rectangle kernel of the straight-through threshold gradient."""

    def check(self) -> None:
        checks.number("l0_coef", self.l0_coef, 0.0)
        checks.number("l0_warmup", self.l0_warmup, 0.0, 1.0)
        checks.number("bandwidth", self.bandwidth, 0.0, low_open=True)
        if self.target_l0 is not None:
            checks.non_negative("target_l0", self.target_l0)


@dataclass
class TrainConfig(JumpReLUConfig, OptimiserConfig):
    """Optimisation of one SAE: the optimiser and JumpReLU parts plus its token budget."""

    total_tokens: int = 1_000_000
    """Tokens the SAE trains on (steps = total_tokens // batch_size)."""
    batch_size: int = 1024
    """Activation vectors per optimiser step."""
    autocast_bf16: bool = False
    """bfloat16 autocast for the encoder matmul and top-k (GPU; parameters and Adam stay float32)."""
    seed: int = 0
    """Seed of the SAE's initial weights."""

    def check(self) -> None:
        if self.batch_size < 1 or self.total_tokens < self.batch_size:
            raise DLMScopeError(f"total_tokens={self.total_tokens} must hold at least one batch of {self.batch_size}")

    @classmethod
    def of(cls, cfg, **overrides) -> TrainConfig:
        """The TrainConfig of a run config composed of these parts (every field it shares, then `overrides`)."""
        shared = {f.name: getattr(cfg, f.name) for f in fields(cls) if hasattr(cfg, f.name)}
        return cls(**{**shared, **overrides})

    @property
    def steps(self) -> int:
        return self.total_tokens // self.batch_size


class _SumOfSquares(torch.autograd.Function):
    """sum(d^2): one dot product forward, one pass 2 g d back (`F.mse_loss(.., reduction="sum")` zero-fills its
    gradient before writing it, a wasted pass of about 1.6 ms at 4,096 x 256 on CPU)."""

    @staticmethod
    def forward(ctx, d: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(d)
        flat = d.reshape(-1)
        return torch.dot(flat, flat)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (d,) = ctx.saved_tensors
        return d * (2 * grad)


def sum_of_squares(d: torch.Tensor) -> torch.Tensor:
    """sum(d^2) over all entries, differentiable (`_SumOfSquares`)."""
    return _SumOfSquares.apply(d)


def mean_variance(t: torch.Tensor, reduce: Reduce | None = None) -> torch.Tensor:
    """(1/N) sum_i |t_i - mean(t)|^2 over the N rows of `t` (N, d), over the global batch with `reduce` (an
    all-reduce mean): E|t|^2 - |E t|^2, two reads of t where (t - mean).pow(2) takes four passes, falling back to two
    passes where that difference cancels (the mean dwarfs the spread; every process sees the same reduced values,
    so all take it)."""
    t = t.detach()
    mean = t.mean(0) if reduce is None else reduce(t.mean(0))
    flat = t.reshape(-1)
    mean_sq = torch.dot(flat, flat) / t.shape[0]
    mean_sq = mean_sq if reduce is None else reduce(mean_sq)
    variance = mean_sq - mean.pow(2).sum()
    if variance < 1e-3 * mean_sq:
        variance = (t - mean).pow(2).sum(-1).mean()
        variance = variance if reduce is None else reduce(variance)
    return variance


def aux_loss(miss: torch.Tensor, aux_recon: torch.Tensor, n_dead: int, k_aux: int,
             reduce: Reduce | None) -> torch.Tensor:
    """AuxK (module docstring) from `miss` = x_hat - x, the residual e negated (the MSE's own difference, so no pass
    forms e): the dead latents' prediction e_hat of the detached e, error |e_hat - e|^2 = |e_hat + miss|^2, normalised
    by e's variance over the global batch (`reduce` averages across processes), scaled by min(n_dead / k_aux, 1)."""
    miss = miss.detach()
    error = sum_of_squares(aux_recon + miss) / miss.shape[0]
    return error / mean_variance(miss, reduce).clamp_min(1e-12) * min(n_dead / k_aux, 1.0)


def geometric_median(x: torch.Tensor, iters: int = 10, tol: float = 1e-6) -> torch.Tensor:
    """Weiszfeld iterations from the mean."""
    y = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - y).norm(dim=1).clamp_min(1e-8)
        new = (w[:, None] * x).sum(0) / w.sum()
        done = float((new - y).norm()) < tol * max(1.0, float(y.norm()))
        y = new
        if done:
            break
    return y


class SAETrainer(Generic[ModelT]):
    """Adam on one SAE of any architecture; `step(x)` takes raw activations (N, d_in) (and a target for transcoders).

    Per step: forward (with AuxK when latents are dead), backward, gradient component parallel to
    each decoder row removed, Adam step, decoder rows renormalised, dead counters updated.
    `state_dict()` is a deep snapshot (weights, input scale, Adam moments, step/schedule, dead
    counters, BatchTopK threshold); loading it and stepping on the same batches continues bit for bit.
    The trainer draws no random numbers after construction, so there is no RNG state to carry.
    Generic in its model so a subclass may train another dictionary (`CrossCoderTrainer`): the schedule,
    backward, evaluation and state_dict need only an `nn.Module`; the methods typed `self: SAETrainer[SAE]`
    are the SAE's own.
    """

    sae: ModelT

    def __init__(self: SAETrainer[SAE], sae_cfg: SAEConfig, cfg: TrainConfig, device: str | torch.device = "cpu"):
        self.cfg = cfg
        self.sae = build_sae(sae_cfg, seed=cfg.seed).to(device)
        self.sae.configure_training(cfg)
        self._start(sae_cfg.architecture, sae_cfg.n_latents, sae_cfg.d_in, device)

    def _start(self, architecture: str, n_latents: int, d_in: int, device: str | torch.device) -> None:
        """What `cfg` leaves unset, resolved for this dictionary (optimiser, lr, k_aux, dead window), the optimiser
        over `self.sae`, and fresh counters (shared with the crosscoder trainer)."""
        cfg = self.cfg
        self.optimizer = cfg.optimizer or default_optimizer(architecture)
        self.lr = cfg.lr if cfg.lr is not None else default_lr(self.optimizer, n_latents)
        self.k_aux = cfg.k_aux or max(1, d_in // 2)
        self.dead_tokens = cfg.dead_tokens or max(cfg.batch_size, min(10_000_000, cfg.total_tokens // 5))
        self.opt = make_optimizer(self.optimizer, self.sae.parameters(), self.lr, device)
        self.step_count = 0
        self.tokens = 0
        self.since_fired = torch.zeros(n_latents, dtype=torch.long, device=device)
        self.initialised = False

    @property
    def warmup_steps(self) -> int:
        """The configured warm-up, else the optimiser's default."""
        return OPTIMIZERS[self.optimizer].warmup_steps if self.cfg.warmup_steps is None else self.cfg.warmup_steps

    def lr_at(self, step: int) -> float:
        """Linear warm-up, constant, then linear decay to zero over the final `decay_fraction` of steps."""
        steps = max(1, self.cfg.steps)
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        decay_start = int(steps * (1 - self.cfg.decay_fraction)) if OPTIMIZERS[self.optimizer].decays else steps
        if step >= decay_start:
            return self.lr * max(0.0, (steps - step) / max(1, steps - decay_start))
        return self.lr

    @torch.no_grad()
    def initialise(self: SAETrainer[SAE], x: torch.Tensor, reduce: Reduce | None = None,
                   target: torch.Tensor | None = None) -> None:
        """Input (and a transcoder's output) scale to unit mean squared norm and b_dec from the first batch;
        `reduce` averages over processes."""
        x = x.float()
        y = x if target is None else target.float()

        def unit_scale(a: torch.Tensor) -> float:
            mean_sq = (a ** 2).sum(-1).mean()
            if reduce is not None:
                mean_sq = reduce(mean_sq)
            if not bool(mean_sq.isfinite()):
                raise NonFiniteError(f"the first batch's mean squared norm is {float(mean_sq)}, so no input scale")
            if float(mean_sq) == 0.0:  # e.g. a diff-SAE's differences of identical checkpoints: no scale to take,
                return 1.0  # so none (1 / clamp(0) used to scale every later input by 1e8)
            return float(1.0 / mean_sq.sqrt())

        self.sae.input_scale.fill_(unit_scale(x))
        self.sae.output_scale.fill_(unit_scale(y))
        ys = y * self.sae.output_scale
        b = geometric_median(ys) if self.cfg.b_dec_init == "geometric_median" else ys.mean(0)
        if reduce is not None:
            b = reduce(b)
        self.sae.b_dec.copy_(b)
        # Scale the transposed-decoder encoder so the first reconstruction has the least-squares right size:
        # at scale 1 the k projections overshoot (about 2x here), and undoing that costs Adam many steps.
        sae, yc = self.sae, ys - b
        r = sae.decode(sae.encode_topk(x)) * sae.output_scale - sae.b_dec
        dots = torch.stack([(yc * r).sum(), (r * r).sum()])
        if reduce is not None:
            dots = reduce(dots)
        if dots[1] > 0 and dots[0] > 0:
            sae.W_enc.mul_(dots[0] / dots[1])
        sae.init_from_batch(x)
        self.initialised = True

    def step(self: SAETrainer[SAE], x: torch.Tensor, reduce: Reduce | None = None,
             target: torch.Tensor | None = None) -> dict:
        """One optimiser step on raw activations (N, d_in). `reduce` (an all-reduce mean) makes it data-parallel;
        `target` is what a transcoder predicts (its output hook's activations)."""
        sae = self.sae
        x = x.to(sae.device, torch.float32)
        target = None if target is None else target.to(sae.device, torch.float32)
        if not self.initialised:
            self.initialise(x, reduce, target)
        dead = self.since_fired >= self.dead_tokens
        n_dead = int(dead.sum())
        use_aux = n_dead > 0 and self.cfg.aux_coef > 0
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.cfg.autocast_bf16):
            out = sae(x, dead if use_aux else None, self.k_aux, target)
        miss = out.recon.float() - out.x  # the residual, negated: both losses read this one difference
        mse = sum_of_squares(miss) / x.shape[0]
        aux = torch.zeros((), device=x.device)
        if out.aux_recon is not None:
            aux = aux_loss(miss, out.aux_recon.float(), n_dead, self.k_aux, reduce)
        extra, extra_logs = sae.extra_loss(out, self.step_count, self.cfg)
        loss = mse + self.cfg.aux_coef * aux + extra
        lr = self.backward(loss, reduce)
        sae.remove_parallel_grad()
        self.opt.step()
        sae.normalize_decoder()
        self.check_finite(loss)
        with torch.no_grad():
            if out.indices is not None:
                fired = fire_counts(out.values, out.indices, dead.shape[0]) > 0
            else:
                fired = (out.values > 0).any(0)
            sae.after_step(out, self.step_count, self.cfg)
            if reduce is not None:
                fired = reduce(fired.float()) > 0
            self.since_fired += x.shape[0] if reduce is None else self.cfg.batch_size  # data parallel: the global batch
            self.since_fired[fired] = 0
            fvu = float(mse.detach() / mean_variance(out.x).clamp_min(1e-12))  # this process's batch
            l0 = float((out.values > 0).sum()) / x.shape[0]
        self.step_count += 1
        self.tokens += x.shape[0]
        return {"loss": float(loss.detach()), "mse": float(mse.detach()), "aux": float(aux.detach()), "fvu": fvu,
                "l0": l0, "dead_fraction": n_dead / sae.cfg.n_latents, "lr": lr, **extra_logs}

    def backward(self, loss: torch.Tensor, reduce: Reduce | None) -> float:
        """Set this step's learning rate, backpropagate `loss` and average the gradients over processes
        (`reduce`); returns the learning rate. The caller then takes the optimiser step."""
        lr = self.lr_at(self.step_count)
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if reduce is not None:
            for p in self.sae.parameters():
                if p.grad is not None:
                    p.grad = reduce(p.grad)
        return lr

    def check_finite(self, loss: torch.Tensor) -> None:
        """After an update: NaN / inf in the loss or any weight stops training (one sync for all tensors); under
        torchrun every process sees the same averaged gradients, so all stop at the same step. The sum of every
        tensor is NaN or inf where one holds NaN or inf, and a sum is one read, where `isfinite` writes a mask as big
        as the weights (7.5 ms of a 70 ms CPU step at d_in 256, 4,096 latents); only a non-finite sum (or one of
        finite values that overflows) pays for the element-wise check that names the tensor."""
        params = {**dict(self.sae.named_parameters()), **dict(self.sae.named_buffers())}
        params = {n: p for n, p in params.items() if p.is_floating_point()}
        sums = torch.stack([loss.detach().float().sum(), *(p.detach().float().sum() for p in params.values())])
        if bool(sums.isfinite().all()):
            return
        flags = [loss.detach().isfinite().all(), *(p.detach().isfinite().all() for p in params.values())]
        if bool(torch.stack(flags).all()):  # finite values whose sum overflowed
            return
        what = "loss" if not bool(loss.detach().isfinite()) else f"weight {checks.non_finite(params)}"
        raise NonFiniteError(f"non-finite {what} after step {self.step_count + 1}")

    def evaluate(self, x_heldout: torch.Tensor, batch_size: int = 4096, target: torch.Tensor | None = None) -> dict:
        """Held-out metrics of the current SAE (see `metrics.evaluate_sae`), with the weights `averaged()` gives."""
        was_training = self.sae.training
        self.sae.eval()
        try:
            with self.averaged():
                return evaluate_sae(self.sae, x_heldout, batch_size, target)
        finally:
            self.sae.train(was_training)

    def averaged(self):
        """Context in which `sae` holds the weights to evaluate and save (signum_sf: the schedule-free average)."""
        return averaged(self.opt)

    def state_dict(self) -> dict:
        """A snapshot (copies, not views of live tensors), so later steps cannot change it."""
        return copy.deepcopy({"sae": self.sae.state_dict(), "opt": self.opt.state_dict(), "step": self.step_count,
                              "tokens": self.tokens, "since_fired": self.since_fired,
                              "initialised": self.initialised,
                              "schedule": {"lr": self.lr, "steps": self.cfg.steps,
                                           "warmup_steps": self.warmup_steps,
                                           "decay_fraction": self.cfg.decay_fraction},
                              "k_aux": self.k_aux, "dead_tokens": self.dead_tokens})

    def load_state_dict(self, state: dict) -> None:
        self.sae.load_state_dict(state["sae"])
        self.opt.load_state_dict(state["opt"])
        self.step_count, self.tokens = state["step"], state["tokens"]
        self.since_fired.copy_(state["since_fired"])
        self.initialised = state["initialised"]
        if "schedule" in state:
            self.lr = state["schedule"]["lr"]
            self.k_aux, self.dead_tokens = state["k_aux"], state["dead_tokens"]
