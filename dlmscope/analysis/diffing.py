"""Model diffing across checkpoints (`dlmscope diff`): what did fine-tuning change?

Lens 1, a BatchTopK crosscoder (`dlmscope.sae.crosscoder`) on paired activations. Per latent j and
checkpoint c >= 1, against the first checkpoint (the base, c = 0):
- decoder norms |d_j^c|; relative norm r_j^c = |d_j^c| / (|d_j^0| + |d_j^c|) (Anthropic 2024): about 1/2
  for a shared latent, near 1 when only checkpoint c uses it, near 0 when only the base does; a latent
  is *specific* to c when r > `threshold` and to the base when r < 1 - `threshold` (default 0.9);
- cosine between d_j^0 and d_j^c.
Latent Scaling (Minder, Dumas et al. 2025, arXiv 2504.02922) checks whether a specific latent's concept
is really absent from the other checkpoint, or only looks absent because the sparsity objective moved it
(Complete Shrinkage: the other decoder shrank although the other model carries the direction weakly;
Latent Decoupling: other latents reconstruct it there). For latent j specific to checkpoint s, with
direction d = d_j^s, activations f_j(x), and per checkpoint c a target y^c(x):

    beta^c = argmin_b sum_x |b f_j(x) d - y^c(x)|^2 = sum_x f_j(x) <d, y^c(x)> / (|d|^2 sum_x f_j(x)^2)

with targets in the crosscoder's scaled space (x^c the scaled activation, b_dec^c its decoder bias,
x_hat^c = sum_i f_i d_i^c + b_dec^c the crosscoder's reconstruction): "activation" x^c - b_dec^c;
"reconstruction" x_hat^c (bias included); "error" x^c - (x_hat^c - f_j d_j^c), the error of the
reconstruction without latent j (the bias cancels). These are the targets of the authors' code
(science-of-finetuning diffing toolkit: `ft_reconstruction`/`base_reconstruction` = the full decode,
`ft_error`/`base_error` remove latent j with that checkpoint's own decoder row; our "activation" is its
`*_activation_no_bias`). Both of the last two keep latent j's own contribution, so in the checkpoint s the
latent belongs to both betas are about 1. The ratios of the other
checkpoint o to s, nu_error = beta_error^o / beta_error^s and nu_reconstruction = beta_reconstruction^o /
beta_reconstruction^s, are near 0 for a genuinely specific latent; a large nu_error flags Complete
Shrinkage (o's activations carry the direction but its reconstruction misses it), a large nu_reconstruction
Latent Decoupling (o's reconstruction carries it through other latents). A specific latent is *robust* when
both ratios are below `nu_max`.

Lens 2, a diff-SAE (optional): a Top-K SAE on the activation differences x^last - x^0 of the same tokens;
how large the differences are (relative to the activations) and which latents carry them.

Report: JSON (per crosscoder: counts, relative-norm histogram, specific latents with scaling ratios and
top examples from held-out text, each with the latent's contribution |f d^c| to every checkpoint),
a plotly page, and an explorer page (`dlmscope explore --diff REPORT.json`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..diffusion.noise import corrupt
from ..errors import DLMScopeError
from ..hooks import run_with_cache
from ..io_utils import atomic_write_json, atomic_write_text
from ..models.base import LoadedModel
from ..training import DiffConfig, DiffRun


# ------------------------------------------------------------------------------------------ the statistics

def decoder_stats(cc) -> dict[str, torch.Tensor]:
    """Per latent: decoder norms (n, C); per later checkpoint c >= 1: relative norm and cosine vs the base (n, C-1)."""
    w = cc.W_dec.detach().float()  # (C, n, d)
    norms = w.norm(dim=2).t()
    rel = norms[:, 1:] / (norms[:, :1] + norms[:, 1:]).clamp_min(1e-12)
    cos = torch.nn.functional.cosine_similarity(w[:1], w[1:], dim=2).t()
    return {"norms": norms, "relative_norm": rel, "cosine": cos}


def relative_norm_test(later: torch.Tensor, null: torch.Tensor, n_permutations: int = 2000, seed: int = 0) -> dict:
    """Threshold-free test of a pair's relative decoder norms (alive latents) against those of a null crosscoder
    (the base against itself, trained the same way with independent decoder starts): a two-sample Kolmogorov-Smirnov
    test of the whole distribution, and a one-sided permutation test of the spread, the mean |r - 0.5| (a changed
    checkpoint moves latents away from 0.5). Latents of one crosscoder are not independent draws, so read the
    p-values as a screen, not as exact; a null of shared starts (every r exactly 0.5) makes any spread significant."""
    from scipy.stats import ks_2samp

    later, null = later.double().flatten(), null.double().flatten()
    if later.numel() < 2 or null.numel() < 2:
        raise DLMScopeError(f"relative_norm_test needs at least 2 latents per side; got {later.numel()} and "
                            f"{null.numel()}")
    ks = ks_2samp(later.numpy(), null.numpy(), method="asymp")
    spread = lambda r: (r - 0.5).abs().mean()  # noqa: E731
    observed = float(spread(later) - spread(null))
    pooled, n = torch.cat([later, null]), later.numel()
    gen = torch.Generator().manual_seed(seed)
    hits = 0
    for _ in range(n_permutations):
        perm = pooled[torch.randperm(pooled.numel(), generator=gen)]
        hits += float(spread(perm[:n]) - spread(perm[n:])) >= observed
    return {"ks_statistic": float(ks.statistic), "ks_pvalue": float(ks.pvalue), "spread": float(spread(later)),
            "spread_null": float(spread(null)), "spread_pvalue": (hits + 1) / (n_permutations + 1),
            "n_permutations": n_permutations, "n": n, "n_null": int(null.numel())}


@torch.no_grad()
def latent_scaling(cc, x: torch.Tensor, latents: torch.Tensor, source: torch.Tensor,
                   batch_size: int = 4096) -> dict[str, torch.Tensor]:
    """Latent Scaling betas (module docstring) of `latents` (m,), each along its decoder direction in checkpoint
    `source` (m,), on raw paired activations x (N, C * d). Returns betas (m, C) for the targets "activation",
    "reconstruction" and "error" (NaN where a latent never fires on x)."""
    C = cc.cfg.n_checkpoints
    D = cc.W_dec[source, latents]  # (m, d)
    self_dot = torch.einsum("md,cmd->mc", D, cc.W_dec[:, latents])  # <d, d_j^c>
    bias_dot = (cc.b_dec @ D.t()).t().double().cpu()  # <d, b_dec^c> (m, C)
    num_x = torch.zeros(len(latents), C, dtype=torch.float64)
    num_rec = torch.zeros_like(num_x)
    f_sum = torch.zeros(len(latents), dtype=torch.float64)
    f_sq = torch.zeros_like(f_sum)
    for i in range(0, x.shape[0], batch_size):
        xb = x[i:i + batch_size].to(cc.device, torch.float32)
        f = cc.encode(xb)
        fj = f[:, latents]  # (N, m)
        xs = cc.split(xb) * cc.input_scale[:, None]  # (N, C, d), scaled space, bias not removed
        recon = cc.split(cc.decode_scaled(f, bias=False))  # (N, C, d): sum_i f_i d_i^c
        num_x += (fj[..., None] * torch.einsum("ncd,md->nmc", xs, D)).sum(0).double().cpu()
        num_rec += (fj[..., None] * torch.einsum("ncd,md->nmc", recon, D)).sum(0).double().cpu()
        f_sum += fj.sum(0).double().cpu()
        f_sq += fj.pow(2).sum(0).double().cpu()
    denom = (f_sq * D.pow(2).sum(1).double().cpu())[:, None]
    denom = torch.where(denom > 0, denom, torch.full_like(denom, float("nan")))
    bias = f_sum[:, None] * bias_dot  # sum_x f_j <d, b_dec^c>
    own = f_sq[:, None] * self_dot.double().cpu()  # sum_x f_j^2 <d, d_j^c>: latent j's own part
    return {"activation": (num_x - bias) / denom, "reconstruction": (num_rec + bias) / denom,
            "error": (num_x - bias - num_rec + own) / denom}


def scaling_ratios(betas: dict[str, torch.Tensor], source: torch.Tensor, other: torch.Tensor) -> dict[str, torch.Tensor]:
    """nu = beta(other checkpoint) / beta(source checkpoint) for the error and reconstruction targets, per latent."""
    idx = torch.arange(len(source))
    return {f"nu_{t}": betas[t][idx, other] / betas[t][idx, source] for t in ("error", "reconstruction")}


@dataclass
class PairedText:
    """Held-out rows with their corruption, the paired activations at one hook (S*L, C*d) and owners."""

    x0: torch.Tensor
    xt: torch.Tensor
    masked: torch.Tensor
    acts: torch.Tensor


@torch.no_grad()
def paired_text(lms: list[LoadedModel], hook: str, rows: torch.Tensor, seed: int = 0, t_range=(0.05, 0.5),
                batch_size: int = 16) -> PairedText:
    """Every checkpoint on the identical corrupted rows (DLM-Scope masking, first token kept)."""
    gen = torch.Generator().manual_seed(seed)
    xts, masks, acts = [], [], []
    for start in range(0, rows.shape[0], batch_size):
        x0 = rows[start:start + batch_size]
        t = t_range[0] + (t_range[1] - t_range[0]) * torch.rand(x0.shape[0], generator=gen)
        c = corrupt(x0, lms[0].require_mask_id(), t, eps=0.0, keep_first=True, generator=gen)
        xts.append(c.xt)
        masks.append(c.mask)
        acts.append(torch.cat([run_with_cache(lm, c.xt.to(lm.device), [hook])[hook].float().cpu().flatten(0, 1)
                               for lm in lms], dim=1))
    return PairedText(rows, torch.cat(xts), torch.cat(masks), torch.cat(acts))


def top_examples(cc, text: PairedText, latent: int, lm: LoadedModel, n: int, context: int = 8) -> list[dict]:
    """The n held-out positions where `latent` fires most, with surrounding text (masked tokens as [M]) and the
    latent's contribution |f_j d_j^c| to each checkpoint's reconstruction (raw space)."""
    f = cc.encode(text.acts)[:, latent]
    L = text.x0.shape[1]
    norms = (cc.W_dec[:, latent].norm(dim=1) / cc.input_scale).tolist()
    out = []
    for flat in f.topk(min(n, int((f > 0).sum()))).indices.tolist():
        r, p = divmod(flat, L)
        lo, hi = max(0, p - context), min(L, p + context + 1)
        toks = [("[M]" if m else lm.to_text([int(t)], skip_special=False))
                for t, m in zip(text.x0[r, lo:hi], text.masked[r, lo:hi])]
        out.append({"row": r, "position": p, "activation": float(f[flat]),
                    "contribution": [float(f[flat]) * v for v in norms],
                    "token": lm.to_text([int(text.x0[r, p])], skip_special=False),
                    "masked": bool(text.masked[r, p]), "context": "".join(toks),
                    "clean_context": lm.to_text(text.x0[r, lo:hi], skip_special=False)})
    return out


@torch.no_grad()
def alive_relative_norms(cc, acts: torch.Tensor) -> torch.Tensor:
    """Relative norms toward the first later checkpoint of the latents that fire on `acts` (what the null test reads)."""
    from ..sae.metrics import evaluate_sae

    return decoder_stats(cc)["relative_norm"][:, 0][evaluate_sae(cc, acts)["density"] > 0]


@torch.no_grad()
def crosscoder_report(cc, text: PairedText, lm: LoadedModel, *, threshold: float = 0.9, nu_max: float = 0.3,
                      n_examples: int = 6, max_listed: int = 50, null: torch.Tensor | None = None) -> dict:
    """Relative norms, specific latents (per later checkpoint, both directions), their Latent Scaling ratios and
    top examples, on the held-out paired activations in `text`; with `null` (a base-vs-base crosscoder's
    `alive_relative_norms`) also `relative_norm_test` of each later checkpoint's alive relative norms against it."""
    from ..sae.metrics import evaluate_sae

    stats = decoder_stats(cc)
    ev = evaluate_sae(cc, text.acts)
    alive = ev["density"] > 0
    names = cc.cfg.checkpoints
    report = {"checkpoints": names, "hook": cc.cfg.hook_name, "n_latents": cc.cfg.n_latents, "k": cc.cfg.k,
              "fvu": ev["fvu"], "l0": ev["l0"], "n_alive": int(alive.sum()), "threshold": threshold, "nu_max": nu_max,
              "n_tokens": int(text.acts.shape[0]), "per_checkpoint": []}
    for c in range(1, len(names)):
        rel, cos = stats["relative_norm"][:, c - 1], stats["cosine"][:, c - 1]
        groups = {"later": alive & (rel > threshold), "base": alive & (rel < 1 - threshold)}
        entry = {"checkpoint": names[c], "relative_norm": rel[alive].tolist(),
                 "shared": int((alive & (rel >= 1 - threshold) & (rel <= threshold)).sum()),
                 "cosine_shared_median": float(cos[alive & (rel - 0.5).abs().le(0.1)].median())
                 if bool((alive & (rel - 0.5).abs().le(0.1)).any()) else None}
        if null is not None:
            entry["null_test"] = relative_norm_test(rel[alive], null)
        for side, mask in groups.items():
            ids = mask.nonzero().flatten()
            source = torch.full_like(ids, c if side == "later" else 0)
            other = torch.full_like(ids, 0 if side == "later" else c)
            ratios = scaling_ratios(latent_scaling(cc, text.acts, ids, source), source, other) if len(ids) else \
                {"nu_error": torch.zeros(0), "nu_reconstruction": torch.zeros(0)}
            robust = (ratios["nu_error"].abs() < nu_max) & (ratios["nu_reconstruction"].abs() < nu_max)
            order = ev["density"][ids].argsort(descending=True)[:max_listed].tolist()
            entry[f"specific_{side}"] = {
                "count": len(ids), "robust": int(robust.sum()),
                "fraction_of_alive": len(ids) / max(1, int(alive.sum())),
                "nu_error": [float(v) for v in ratios["nu_error"]],
                "nu_reconstruction": [float(v) for v in ratios["nu_reconstruction"]],
                "latents": [{"latent": int(ids[i]), "relative_norm": float(rel[ids[i]]), "cosine": float(cos[ids[i]]),
                             "density": float(ev["density"][ids[i]]), "nu_error": float(ratios["nu_error"][i]),
                             "nu_reconstruction": float(ratios["nu_reconstruction"][i]), "robust": bool(robust[i]),
                             "examples": top_examples(cc, text, int(ids[i]), lm, n_examples)} for i in order]}
        report["per_checkpoint"].append(entry)
    return report


@torch.no_grad()
def diff_sae_report(sae, text: PairedText, n_checkpoints: int) -> dict:
    """How large last-minus-base differences are and how well the diff-SAE explains them."""
    from ..sae.metrics import evaluate_sae

    d = text.acts.shape[1] // n_checkpoints
    base, last = text.acts[:, :d], text.acts[:, -d:]
    delta = last - base
    ev = evaluate_sae(sae, delta)
    ratio = float(delta.pow(2).sum() / base.pow(2).sum().clamp_min(1e-30))
    return {"relative_difference_norm_sq": ratio, "fvu": ev["fvu"], "l0": ev["l0"],
            "n_alive": int((ev["density"] > 0).sum()), "n_latents": sae.cfg.n_latents}


def write_report_html(report: dict, path) -> Path:
    """Relative-norm histograms and Latent Scaling ratios of every crosscoder in `report`."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("relative decoder norm |d_later| / (|d_base| + |d_later|)",
                                                        "Latent Scaling of specific latents"))
    for key, r in report["crosscoders"].items():
        for e in r["per_checkpoint"]:
            fig.add_trace(go.Histogram(x=e["relative_norm"], nbinsx=50, name=f"{key} {e['checkpoint']}", opacity=0.6),
                          row=1, col=1)
            for side in ("later", "base"):
                s = e[f"specific_{side}"]
                fig.add_trace(go.Scatter(x=s["nu_reconstruction"], y=s["nu_error"], mode="markers",
                                         name=f"{key} specific to {e['checkpoint'] if side == 'later' else 'base'}"),
                              row=1, col=2)
    fig.update_xaxes(title_text="relative norm", row=1, col=1)
    fig.update_xaxes(title_text="nu_reconstruction", row=1, col=2)
    fig.update_yaxes(title_text="nu_error", row=1, col=2)
    fig.update_layout(title=f"dlmscope diff: {' vs '.join(report['checkpoints'])}", barmode="overlay", height=500)
    return atomic_write_text(path, fig.to_html(include_plotlyjs=True))


def diff(cfg: DiffConfig) -> dict:
    """Train the crosscoders (and diff-SAEs), then write `diff.json` and `diff.html` into the run folder."""
    from ..data import pack
    from ..models import load_model
    from ..sae import load_sae
    from ..sae.crosscoder import load_crosscoder
    from ..training import split_texts

    if not cfg.activation_cache:  # checkpoints of different families fail before any of them loads
        from ..models.verify import peek_family

        families = {c: peek_family(c) for c in cfg.checkpoint_list()}
        if len(set(families.values())) > 1:
            raise DLMScopeError(f"checkpoints differ in family: {', '.join(f'{c} ({f})' for c, f in families.items())}"
                                "; model diffing compares checkpoints of one architecture")
    run = DiffRun(cfg)
    result = run.run()
    if result.interrupted:
        return {"interrupted": True, "signal": result.signal, "folder": str(result.folder)}
    lms = [load_model(c, device=run.dist.device, dtype=cfg.dtype) for c in cfg.checkpoint_list()]
    _, heldout = split_texts(cfg.dataset, cfg.column)
    rows = pack(lms[0].tokenizer, heldout, cfg.context_length).input_ids[:cfg.n_seqs]
    report: dict[str, Any] = {"checkpoints": cfg.checkpoint_list(), "config": asdict(cfg), "crosscoders": {},
                              "diff_saes": {}}
    texts: dict[str, PairedText] = {}
    nulls: dict[str, torch.Tensor] = {}
    for key, folder in sorted(result.saes.items(), key=lambda kv: not kv[0].endswith("-null")):  # nulls first
        hook = run.routes[key]
        if hook not in texts:
            texts[hook] = paired_text(lms, hook, rows, seed=cfg.seed + 2, t_range=(cfg.t_min, cfg.t_max))
        if key.endswith("-null"):
            d = texts[hook].acts.shape[1] // len(lms)
            base = texts[hook].acts[:, :d]
            nulls[key.removesuffix("-null")] = rel = alive_relative_norms(load_crosscoder(folder),
                                                                          torch.cat([base, base], 1))
            report.setdefault("null_crosscoders", {})[key] = {
                "folder": str(folder), "n_alive": int(rel.numel()), "relative_norm_min_max": [
                    float(rel.min()), float(rel.max())] if rel.numel() else None}
        elif key.endswith("-diffsae"):
            report["diff_saes"][key] = diff_sae_report(load_sae(str(folder)), texts[hook], len(lms))
        else:
            report["crosscoders"][key] = {"folder": str(folder), **crosscoder_report(
                load_crosscoder(folder), texts[hook], lms[0], threshold=cfg.specific_threshold, nu_max=cfg.nu_max,
                n_examples=cfg.n_examples, null=nulls.get(key))}
    atomic_write_json(run.folder / "diff.json", report)
    write_report_html(report, run.folder / "diff.html")
    report["folder"] = str(run.folder)
    return report
