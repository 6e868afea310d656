"""Cross-entropy impact of splicing an SAE into the residual stream (DLM-Scope's ΔLM), DLMs and AR models.

Masks are drawn once per sequence and t bin and reused for every condition (clean, SAE spliced,
zero-ablated, mean-ablated), so differences are paired. For DLMs the loss is the masked-token CE
(mean over masked positions) and the 1/t-weighted ELBO term (sum of masked CE / t over the
sequence length); for causal models, next-token CE. ΔCE = spliced - clean (negative: splicing
helps); recovered = (ablated - spliced) / (ablated - clean) for the zero and the mean ablation. The
mean ablation uses the hook's mean activation on the same bin's corrupted inputs.
"""

from __future__ import annotations

from pathlib import Path
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .. import checks
from ..diffusion.loss import next_token_ce, token_ce
from ..diffusion.noise import corrupt
from ..errors import DLMScopeError
from ..hooks import hooked, run_with_cache
from ..models.base import LoadedModel
from ..stats import t_interval

T_BINS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
CONDITIONS = ("clean", "sae", "zero", "mean")
SPLICE_POSITIONS = ("all", "masked", "visible")


@dataclass
class SpliceConfig:
    """Which masks, positions and variants the splice evaluation uses."""

    t_bins: tuple[float, ...] = T_BINS
    """Fixed mask ratios; the DLM-Scope range U[0.05, 0.5] is always added as bin 'dlmscope'."""
    positions: str = "all"
    """Splice at all, masked or visible positions."""
    with_error: bool = False
    """Add the SAE's reconstruction error back (then the SAE path is exact: ΔCE = 0)."""
    n_seqs: int = 64
    """Held-out sequences per bin."""
    batch_size: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        for t in self.t_bins:
            checks.number("t_bins", t, 0.0, 1.0, low_open=True)
        checks.choice("positions", self.positions, SPLICE_POSITIONS)
        checks.positive("n_seqs", self.n_seqs)
        checks.positive("batch_size", self.batch_size)
        checks.seed("seed", self.seed)


def check_sae_matches(lm: LoadedModel, sae, other_model_ok: bool = False) -> str:
    """The SAE's hook, validated against the model; one-line errors for mismatches.

    `other_model_ok` allows a checkpoint other than the one the SAE was trained on (stability studies).
    """
    hook = sae.cfg.hook_name
    if hook is None:
        raise DLMScopeError("the SAE records no hook_name in its metadata; cannot tell where to splice it")
    lm.site(hook)
    lm.site(sae.cfg.hook_name_out)
    if sae.cfg.d_in != lm.d_model:
        raise DLMScopeError(f"SAE d_in={sae.cfg.d_in} does not match {lm.name} d_model={lm.d_model}")
    recorded = sae.cfg.model_name
    if not other_model_ok and recorded and recorded != lm.name and not str(lm.name).endswith(str(recorded)):
        raise DLMScopeError(f"SAE was trained on model {recorded!r}, not {lm.name!r} (hook {hook})")
    return hook


def check_sae_model(sae, model: str) -> None:
    """Before `model` (a built-in name or folder) loads: the SAE was trained on it (`check_sae_matches` repeats the
    check on the loaded model, with its hook and width)."""
    from ..models.zoo import BUILTIN

    name = model if model in BUILTIN else Path(model).expanduser().name
    recorded = sae.cfg.model_name
    if recorded and recorded != name and not name.endswith(str(recorded)):
        raise DLMScopeError(f"SAE was trained on model {recorded!r}, not {name!r} (hook {sae.cfg.hook_name})")


def draw_masks(lm: LoadedModel, x0: torch.Tensor, t: float | None, seed: int, bin_index: int, start: int):
    """(x0, xt, Corrupted | None) for one batch of one bin; deterministic in (seed, bin, batch start).

    t None draws DLM-Scope's t ~ U[0.05, 0.5] per sequence; causal models are not corrupted.
    """
    if lm.causal:
        return x0, x0, None
    gen = torch.Generator().manual_seed(seed * 100_003 + bin_index * 1009 + start)
    tt = torch.full((x0.shape[0],), t) if t is not None else 0.05 + 0.45 * torch.rand(x0.shape[0], generator=gen)
    c = corrupt(x0, lm.require_mask_id(), tt, eps=0.0, keep_first=True, generator=gen)
    return x0, c.xt, c


def _positions(c, which: str) -> torch.Tensor | None:
    """Where to splice: None (everywhere) or a (B, L) bool mask from the batch's masks."""
    return None if c is None or which == "all" else (c.mask if which == "masked" else ~c.mask)


def _bin_mean(lm: LoadedModel, hook: str, batches: list, positions: str) -> torch.Tensor:
    """The hook's mean activation over every batch of the bin, at the positions that will be spliced."""
    total, n = torch.zeros(lm.d_model, dtype=torch.float64, device=lm.device), 0
    for x0, xt, c in batches:
        act = run_with_cache(lm, xt, [hook], clean=x0)[hook].float()
        sel = _positions(c, positions)
        act = (act if sel is None else act[sel]).reshape(-1, act.shape[-1])
        total += act.sum(0).double()
        n += act.shape[0]
    return (total / max(n, 1)).float()


def splice_hooks(sae, condition: str = "sae", mean_act: torch.Tensor | None = None, with_error: bool = False) -> dict:
    """{hook name: hook fn} replacing what the SAE reconstructs (the output hook of a transcoder, which is fed
    the input hook's activation of the same forward) by its reconstruction, zeros or the mean activation."""
    seen: dict[str, torch.Tensor] = {}
    source, dest = sae.cfg.hook_name, sae.cfg.hook_name_out

    def remember(act: torch.Tensor, ctx) -> None:
        seen["x"] = act

    def fn(act: torch.Tensor, ctx) -> torch.Tensor:
        if condition == "zero":
            return torch.zeros_like(act)
        if condition == "mean":
            assert mean_act is not None  # the "mean" condition comes with its bin's mean
            return mean_act.to(act).expand_as(act)
        recon = sae.reconstruct(seen.pop("x", act).float()).to(act.dtype)
        return recon + (act - recon) if with_error else recon

    return {dest: fn} if dest == source else {source: remember, dest: fn}


@torch.no_grad()
def splice_eval(lm: LoadedModel, sae, rows: torch.Tensor, cfg: SpliceConfig = SpliceConfig(),
                other_model_ok: bool = False) -> dict:
    """Per t bin and condition: CE and ELBO with intervals, ΔCE and recovered score."""
    hook = check_sae_matches(lm, sae, other_model_ok)
    if lm.causal and cfg.positions != "all":
        raise DLMScopeError("autoregressive models have no masked positions; use positions='all'")
    rows = rows[: cfg.n_seqs]
    if rows.shape[0] == 0:
        raise DLMScopeError("no sequences to evaluate")
    bins: list[tuple[str, float | None]] = [("clean", None)] if lm.causal else \
        [(f"{t:.1f}", t) for t in cfg.t_bins] + [("dlmscope", None)]
    results = {}
    for b_idx, (label, t) in enumerate(bins):
        per: dict[str, dict[str, list[torch.Tensor]]] = {c: {"ce": [], "elbo": []} for c in CONDITIONS}
        batches = [draw_masks(lm, rows[s:s + cfg.batch_size].to(lm.device), t, cfg.seed, b_idx, s)
                   for s in range(0, rows.shape[0], cfg.batch_size)]
        mean_act = _bin_mean(lm, sae.cfg.hook_name_out, batches, cfg.positions)
        for x0, xt, c in batches:
            pos = _positions(c, cfg.positions)
            for cond in CONDITIONS:
                if cond == "clean":
                    logits = lm.forward(xt) if lm.causal else lm.denoise_logits(xt, clean=x0)
                else:
                    with hooked(lm, splice_hooks(sae, cond, mean_act, cfg.with_error), positions=pos):
                        logits = lm.forward(xt) if lm.causal else lm.denoise_logits(xt, clean=x0)
                if lm.causal:
                    ce = next_token_ce(logits, x0).mean(1)
                    per[cond]["ce"].append(ce)
                    per[cond]["elbo"].append(ce)
                else:
                    tok = token_ce(logits, x0) * c.mask
                    n = c.mask.sum(1).clamp_min(1)
                    per[cond]["ce"].append(tok.sum(1) / n)
                    per[cond]["elbo"].append(tok.sum(1) / c.p_mask.to(tok.device) / x0.shape[1])
        cat = {c: {m: torch.cat(v).cpu() for m, v in d.items()} for c, d in per.items()}
        entry: dict[str, Any] = {c: {m: t_interval(cat[c][m].double()) for m in ("ce", "elbo")} for c in CONDITIONS}
        entry["delta_ce"] = t_interval(cat["sae"]["ce"] - cat["clean"]["ce"])
        entry["delta_elbo"] = t_interval(cat["sae"]["elbo"] - cat["clean"]["elbo"])
        clean, spliced = float(cat["clean"]["ce"].mean()), float(cat["sae"]["ce"].mean())
        entry["recovered"] = {}
        for abl in ("zero", "mean"):
            a = float(cat[abl]["ce"].mean())
            entry["recovered"][abl] = (a - spliced) / (a - clean) if abs(a - clean) > 1e-12 else float("nan")
        results[label] = entry
    return {"model": lm.name, "hook": hook, "k": sae.cfg.k, "n_latents": sae.cfg.n_latents,
            "diffusion": lm.is_diffusion, "config": asdict(cfg), "bins": results}


def splice_table(result: dict) -> str:
    """Markdown table of one splice result."""
    lines = [f"{result['model']} {result['hook']} k={result['k']}", "",
             "| t bin | clean CE | spliced CE | ΔCE [95% CI] | ΔELBO | zero-abl CE | mean-abl CE | recovered (zero / mean) |",
             "|---|---|---|---|---|---|---|---|"]
    for label, e in result["bins"].items():
        d = e["delta_ce"]
        lines.append(f"| {label} | {e['clean']['ce'][0]:.3f} | {e['sae']['ce'][0]:.3f} | {d[0]:+.3f} "
                     f"[{d[1]:+.3f}, {d[2]:+.3f}] | {e['delta_elbo'][0]:+.3f} | {e['zero']['ce'][0]:.3f} | "
                     f"{e['mean']['ce'][0]:.3f} | {e['recovered']['zero']:.3f} / {e['recovered']['mean']:.3f} |")
    return "\n".join(lines)
