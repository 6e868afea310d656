"""BatchTopK crosscoders over paired activations of C checkpoints (model diffing).

Input: the concatenation x = [x_1, ..., x_C] (N, C * d_in) of C checkpoints' activations at the same hook
on the same tokens (same corrupted batch). One encoder reads all of it, one decoder per checkpoint writes
that checkpoint back:

    f        = ReLU((x * s - b_dec) @ W_enc + b_enc)          s: per-checkpoint input scale, b_dec (C, d_in)
    x_hat_c  = (f @ W_dec[c] + b_dec[c]) / s_c                 W_dec (C, n_latents, d_in)

Sparsity (Minder, Dumas et al. 2025, arXiv 2504.02922): BatchTopK keeps the k * N largest values of
v_j = f_j * sum_c |W_dec[c, j]| over a batch of N tokens, so a latent's rank does not depend on how its
weight is split between encoder and decoder; decoder norms are free (they are what model diffing reads) and
not renormalised. At inference `encode` keeps f_j where v_j exceeds a threshold, an EMA (rate 0.01) of the
smallest kept v per training batch. AuxK on dead latents as in `dlmscope.sae.train` (same formula, summed
over checkpoints). Training happens in the scaled space where each checkpoint's activations have unit mean
squared norm.

Saved format (a folder; `save_crosscoder` / `load_crosscoder` round-trip exactly):
- `crosscoder.safetensors`: W_enc (C * d_in, n_latents), b_enc (n_latents), W_dec (C, n_latents, d_in),
  b_dec (C, d_in), input_scale (C), threshold () -- the scaled-space parameters, scale not folded in --
  and optionally density (n_latents), each latent's firing frequency on held-out tokens;
- `cfg.json`: {"format": "dlmscope-crosscoder", "format_version": 1, "d_in", "n_latents", "k",
  "n_checkpoints", "checkpoints" (names, in decoder order), "metadata" (hook_name, masking_policy, ...),
  "decoder_init" (shared | independent; absent in older files: shared), "weights_sha256"} -- the checksum is verified on load.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from .. import checks
from ..errors import DLMScopeError
from ..io_utils import atomic_save_safetensors, atomic_write_json, file_sha256
from .model import SAEOutput
from .train import Reduce, SAETrainer, TrainConfig, aux_loss, geometric_median

FORMAT = "dlmscope-crosscoder"
WEIGHTS = "crosscoder.safetensors"
TENSORS = ("W_enc", "b_enc", "W_dec", "b_dec", "input_scale", "threshold")


@dataclass
class CrossCoderConfig:
    """Shape and provenance of one crosscoder."""

    d_in: int
    """Width of each checkpoint's activations."""
    n_latents: int
    """Dictionary size (shared by all checkpoints)."""
    k: int
    """Active latents per token on average over a batch (BatchTopK)."""
    checkpoints: list[str]
    """Names of the checkpoints, in decoder order (at least two)."""
    metadata: dict = field(default_factory=dict)
    """hook_name, masking_policy, t_range, dataset_path, context_size, ..."""
    decoder_init: Literal["shared", "independent"] = "shared"
    """shared: each latent starts with the same direction in every checkpoint's decoder (identical checkpoints then
    give identical decoders: the exact base-vs-base check); independent: a separate random direction per checkpoint
    (identical checkpoints then give a spread of relative norms, the null a threshold-free test reads)."""

    def __post_init__(self) -> None:
        checks.choice("decoder_init", self.decoder_init, ("shared", "independent"))
        if len(self.checkpoints) < 2:
            raise DLMScopeError(f"a crosscoder needs at least two checkpoints; got {len(self.checkpoints)}: "
                                f"{list(self.checkpoints)}")
        if not 0 < self.k < self.n_latents:
            raise DLMScopeError(f"k={self.k} must satisfy 0 < k < n_latents ({self.n_latents})")
        if self.d_in < 1:
            raise DLMScopeError(f"d_in={self.d_in} must be positive")

    @property
    def n_checkpoints(self) -> int:
        return len(self.checkpoints)

    @property
    def hook_name(self) -> str | None:
        return self.metadata.get("hook_name")


class CrossCoder(nn.Module):
    """A BatchTopK crosscoder; raw inputs and outputs are concatenations (.., C * d_in)."""

    input_scale: torch.Tensor  # buffers, declared for type checkers
    threshold: torch.Tensor

    def __init__(self, cfg: CrossCoderConfig, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        C, n, d = cfg.n_checkpoints, cfg.n_latents, cfg.d_in
        gen = torch.Generator().manual_seed(seed)
        # Unit directions scaled by 1/sqrt(C) so the concatenated decoder row has unit norm; the encoder starts as
        # the decoder's transpose. "shared": the same direction in every checkpoint; "independent": one per checkpoint.
        # (With shared starts, identical checkpoints get identical gradients and identical Adam updates, so their
        # decoders stay equal; independent starts converge only as far as training takes them.)
        draws = 1 if cfg.decoder_init == "shared" else C
        w_dec = (torch.nn.functional.normalize(torch.randn(draws, n, d, generator=gen), dim=2) / math.sqrt(C))
        w_dec = w_dec.expand(C, n, d)
        self.W_dec = nn.Parameter(w_dec.clone())
        self.W_enc = nn.Parameter(w_dec.permute(0, 2, 1).reshape(C * d, n).clone())
        self.b_enc = nn.Parameter(torch.zeros(n))
        self.b_dec = nn.Parameter(torch.zeros(C, d))
        self.register_buffer("input_scale", torch.ones(C))
        self.register_buffer("threshold", torch.zeros(()))

    @property
    def device(self) -> torch.device:
        return self.W_dec.device

    def check_input(self, x: torch.Tensor) -> None:
        want = self.cfg.n_checkpoints * self.cfg.d_in
        if x.shape[-1] != want:
            raise DLMScopeError(f"paired activations have width {x.shape[-1]} but the crosscoder expects "
                                f"{self.cfg.n_checkpoints} checkpoints x d_in {self.cfg.d_in} = {want}")

    def _scale(self) -> torch.Tensor:
        return self.input_scale.repeat_interleave(self.cfg.d_in)

    def decoder_norms(self) -> torch.Tensor:
        """(n_latents, C): |W_dec[c, j]| per latent and checkpoint."""
        return self.W_dec.norm(dim=2).t()

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder pre-activations (.., n_latents) of raw paired activations."""
        self.check_input(x)
        return (x * self._scale() - self.b_dec.flatten()) @ self.W_enc + self.b_enc

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense latent activations f (.., n_latents), kept where f * (sum of decoder norms) > threshold."""
        f = self.pre_acts(x).relu()
        return f * (f * self.decoder_norms().sum(1) > self.threshold)

    def encode_topk(self, x: torch.Tensor) -> torch.Tensor:
        """Dense latents keeping each token's k largest norm-weighted activations (used at initialisation)."""
        f = self.pre_acts(x).relu()
        keep = (f * self.decoder_norms().sum(1)).topk(self.cfg.k, dim=-1).indices
        return torch.zeros_like(f).scatter(-1, keep, f.gather(-1, keep))

    def decode_scaled(self, f: torch.Tensor, bias: bool = True) -> torch.Tensor:
        """Scaled-space reconstruction (.., C * d_in) from dense latents."""
        out = torch.einsum("...n,cnd->...cd", f, self.W_dec)
        if bias:
            out = out + self.b_dec
        return out.flatten(-2)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """Raw-space reconstruction (.., C * d_in) from dense latents."""
        return self.decode_scaled(f) / self._scale()

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """(.., C * d_in) -> (.., C, d_in)."""
        return x.unflatten(-1, (self.cfg.n_checkpoints, self.cfg.d_in))

    def forward(self, x: torch.Tensor, dead_mask: torch.Tensor | None = None, k_aux: int = 0) -> SAEOutput:
        """Training forward on raw (N, C * d_in) activations, in the scaled space; `values` are the dense
        norm-weighted activations v (what BatchTopK ranks and the threshold is learnt on)."""
        self.check_input(x)
        xs = x * self._scale()
        pre = (xs - self.b_dec.flatten()) @ self.W_enc + self.b_enc
        f = pre.relu()
        norms = self.decoder_norms().sum(1)
        v = f * norms
        keep = v.flatten().topk(self.cfg.k * x.shape[0], sorted=False).indices
        mask = torch.zeros_like(v).flatten().scatter(0, keep, 1.0).view_as(v)
        f_kept = f * mask
        out = SAEOutput(xs, self.decode_scaled(f_kept), (f_kept * norms).detach(), None, self.cfg.n_latents)
        if dead_mask is not None and k_aux > 0 and bool(dead_mask.any()):
            dead_ids = dead_mask.nonzero().squeeze(1)
            k_aux = min(k_aux, dead_ids.numel())
            aux_v, local = (v.index_select(1, dead_ids)).topk(k_aux, dim=-1, sorted=False)
            ids = dead_ids[local]
            aux_f = torch.zeros_like(f).scatter(1, ids, f.gather(1, ids) * (aux_v > 0))
            out.aux_recon = self.decode_scaled(aux_f, bias=False)
        return out


def _no_target(target: torch.Tensor | None) -> None:
    """The trainer's signature has a transcoder's `target`; a crosscoder reconstructs its own input."""
    if target is not None:
        raise DLMScopeError("a crosscoder reconstructs its input: it takes no target (transcoders do)")


class CrossCoderTrainer(SAETrainer[CrossCoder]):
    """Adam on one CrossCoder; `step(x)` takes raw paired activations (N, C * d_in).

    Shares SAETrainer's schedule, dead-latent bookkeeping, evaluation and state_dict; differs in the model,
    the per-checkpoint input scale and b_dec, and in leaving decoder norms free.
    """

    def __init__(self, cfg: CrossCoderConfig, train: TrainConfig, device: str | torch.device = "cpu",
                 resample_every: int = 0):
        self.cfg = train
        self.resample_every = checks.non_negative("resample_every", resample_every)
        self.sae = CrossCoder(cfg, seed=train.seed).to(device)
        self._start("crosscoder", cfg.n_latents, cfg.d_in, device)

    @torch.no_grad()
    def initialise(self, x: torch.Tensor, reduce: Reduce | None = None, target: torch.Tensor | None = None) -> None:
        """Per-checkpoint input scale (unit mean squared norm), b_dec (geometric median per checkpoint) and a
        least-squares encoder scale, from the first batch."""
        _no_target(target)
        cc = self.sae
        xs = cc.split(x.float())
        mean_sq = (xs ** 2).sum(-1).mean(0)
        if reduce is not None:
            mean_sq = reduce(mean_sq)
        cc.input_scale.copy_(1.0 / mean_sq.sqrt().clamp_min(1e-8))
        xs = xs * cc.input_scale[:, None]
        b = torch.stack([geometric_median(xs[:, c]) if self.cfg.b_dec_init == "geometric_median" else xs[:, c].mean(0)
                         for c in range(cc.cfg.n_checkpoints)])
        if reduce is not None:
            b = reduce(b)
        cc.b_dec.copy_(b)
        xc = (xs - b).flatten(1)
        r = cc.decode_scaled(cc.encode_topk(x.float()), bias=False)
        dots = torch.stack([(xc * r).sum(), (r * r).sum()])
        if reduce is not None:
            dots = reduce(dots)
        if dots[1] > 0 and dots[0] > 0:
            cc.W_enc.mul_(dots[0] / dots[1])
        self.initialised = True

    def step(self, x: torch.Tensor, reduce: Reduce | None = None, target: torch.Tensor | None = None) -> dict:
        """One optimiser step on raw paired activations (N, C * d_in)."""
        _no_target(target)
        cc = self.sae
        x = x.to(cc.device, torch.float32)
        if not self.initialised:
            self.initialise(x, reduce)
        dead = self.since_fired >= self.dead_tokens
        n_dead = int(dead.sum())
        out = cc(x, dead if n_dead and self.cfg.aux_coef > 0 else None, self.k_aux)
        miss = out.recon - out.x  # the residual, negated, as `aux_loss` reads it
        mse = miss.pow(2).sum(-1).mean()
        aux = torch.zeros((), device=x.device)
        if out.aux_recon is not None:
            aux = aux_loss(miss, out.aux_recon, n_dead, self.k_aux, reduce)
        loss = mse + self.cfg.aux_coef * aux
        lr = self.backward(loss, reduce)
        self.opt.step()
        self.check_finite(loss)
        with torch.no_grad():
            positive = out.values[out.values > 0]
            if positive.numel():
                t = positive.min()
                cc.threshold.copy_(t if self.step_count == 0 else 0.99 * cc.threshold + 0.01 * t)
            fired = (out.values > 0).any(0)
            if reduce is not None:
                fired = reduce(fired.float()) > 0
            self.since_fired += x.shape[0]
            self.since_fired[fired] = 0
            fvu = float(miss.detach().pow(2).sum() / (out.x - out.x.mean(0)).pow(2).sum().clamp_min(1e-12))
            l0 = float((out.values > 0).sum()) / x.shape[0]
        self.step_count += 1
        self.tokens += x.shape[0]
        resampled = 0
        if self.resample_every and self.step_count % self.resample_every == 0 and \
                self.step_count <= self.cfg.steps // 2:
            resampled = self.resample(x, -miss.detach())  # the residual x - x_hat
        return {"loss": float(loss.detach()), "mse": float(mse.detach()), "aux": float(aux.detach()), "fvu": fvu,
                "l0": l0, "dead_fraction": n_dead / cc.cfg.n_latents, "lr": lr, "resampled": resampled}

    @torch.no_grad()
    def resample(self, x: torch.Tensor, err: torch.Tensor) -> int:
        """Re-initialise the dead latents from tokens of this batch drawn by squared reconstruction error (Anthropic's
        resampling, 2023): decoder rows = the drawn token's error in each checkpoint (so a direction only one
        checkpoint carries starts specific to it), scaled to the alive latents' mean decoder norm; encoder column =
        the same direction at 0.2 x the alive latents' mean encoder norm; b_enc 0; their optimiser state zeroed."""
        cc = self.sae
        dead = (self.since_fired >= self.dead_tokens).nonzero().flatten()
        alive = (self.since_fired < self.dead_tokens).nonzero().flatten()
        if not len(dead) or not len(alive):
            return 0
        weight = err.pow(2).sum(-1)
        gen = torch.Generator(device=weight.device).manual_seed(self.cfg.seed * 1_000_003 + self.step_count)
        rows = torch.multinomial(weight.clamp_min(1e-12), len(dead), replacement=True, generator=gen)
        v = torch.nn.functional.normalize(err[rows], dim=-1)  # (m, C * d)
        dec_norm = cc.W_dec[:, alive].pow(2).sum((0, 2)).sqrt().mean()
        enc_norm = cc.W_enc[:, alive].norm(dim=0).mean()
        cc.W_dec[:, dead] = (v * dec_norm).unflatten(-1, (cc.cfg.n_checkpoints, cc.cfg.d_in)).transpose(0, 1)
        cc.W_enc[:, dead] = (v * 0.2 * enc_norm).t()
        cc.b_enc[dead] = 0.0
        for p, dim in ((cc.W_dec, 1), (cc.W_enc, 1), (cc.b_enc, 0)):
            for value in self.opt.state.get(p, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == p.shape:
                    value.index_fill_(dim, dead, 0.0)
        self.since_fired[dead] = 0
        return len(dead)


# ------------------------------------------------------------------------------------------------ files

def save_crosscoder(cc: CrossCoder, folder: str | Path, density: torch.Tensor | None = None) -> Path:
    """Write `cc` in the format of the module docstring (weights first, then cfg.json with their checksum)."""
    folder = Path(folder)
    cfg = cc.cfg
    tensors = {n: getattr(cc, n).detach().float() for n in TENSORS}
    if density is not None:
        tensors["density"] = density.detach().float()
    checks.finite_tensors(f"refusing to save the crosscoder {str(folder)!r}", tensors)
    digest = atomic_save_safetensors(folder / WEIGHTS, tensors)
    body = {"format": FORMAT, "format_version": 1, "d_in": cfg.d_in, "n_latents": cfg.n_latents, "k": cfg.k,
            "n_checkpoints": cfg.n_checkpoints, "checkpoints": list(cfg.checkpoints), "metadata": cfg.metadata,
            "decoder_init": cfg.decoder_init, "weights_sha256": digest}
    atomic_write_json(folder / "cfg.json", body)
    return folder


def load_crosscoder(folder: str | Path, device: str = "cpu") -> CrossCoder:
    """Read a crosscoder folder written by `save_crosscoder`; checks format, shapes, checksum and finiteness."""
    from safetensors.torch import load_file

    folder = Path(folder)
    path = folder / "cfg.json"
    if not path.is_file() or not (folder / WEIGHTS).is_file():
        raise DLMScopeError(f"{str(folder)!r} is not a crosscoder folder (needs cfg.json and {WEIGHTS})")
    try:
        body = json.loads(path.read_text())
        if body.get("format") != FORMAT:
            raise DLMScopeError(f"{str(path)!r} has format {body.get('format')!r}; expected {FORMAT!r}")
        cfg = CrossCoderConfig(int(body["d_in"]), int(body["n_latents"]), int(body["k"]), list(body["checkpoints"]),
                               dict(body.get("metadata") or {}), body.get("decoder_init", "shared"))
    except (ValueError, KeyError, TypeError) as e:
        raise DLMScopeError(f"crosscoder config {str(path)!r} is malformed: {e}") from None
    if file_sha256(folder / WEIGHTS) != body.get("weights_sha256"):
        raise DLMScopeError(f"{str(folder / WEIGHTS)!r} does not match the checksum in cfg.json (corrupt or replaced)")
    tensors = load_file(str(folder / WEIGHTS))
    cc = CrossCoder(cfg)
    for name in TENSORS:
        t = tensors.get(name)
        want = getattr(cc, name).shape
        if t is None or t.shape != want:
            raise DLMScopeError(f"{str(folder / WEIGHTS)!r}: tensor {name} has shape "
                                f"{None if t is None else tuple(t.shape)}; expected {tuple(want)}")
        if not torch.isfinite(t).all():
            raise DLMScopeError(f"{str(folder / WEIGHTS)!r}: tensor {name} has non-finite values")
    with torch.no_grad():
        for name in TENSORS:
            getattr(cc, name).copy_(tensors[name])
    return cc.to(device)
