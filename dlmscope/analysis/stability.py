"""Feature stability across checkpoints (e.g. base -> RL post-trained).

Three views, all on identical inputs and masks:
- transfer: the base checkpoint's SAE applied to each checkpoint's activations (FVU, L0, dead
  fraction) and spliced into it (ΔCE on DLM-Scope's t range);
- feature level: per-feature Pearson correlation of latent activations between the base and each
  checkpoint, and the fraction of features (firing on >= 10 tokens) whose top-10 example positions
  overlap by half or more;
- dictionary level: SAEs trained on each checkpoint matched one-to-one by optimal assignment of
  decoder cosine similarity (Hungarian algorithm), with the distribution of matched similarities.
"""

from __future__ import annotations

import torch

from ..checks import positive
from ..errors import DLMScopeError
from ..hooks import run_with_cache
from ..models.base import LoadedModel
from ..sae.metrics import evaluate_sae
from .splice import SpliceConfig, check_sae_matches, splice_eval


def check_compatible(a: LoadedModel, b: LoadedModel) -> None:
    """Checkpoints compared must share architecture and tokenizer."""
    if (a.family, a.d_model, a.n_layers, a.vocab_size) != (b.family, b.d_model, b.n_layers, b.vocab_size):
        raise DLMScopeError(f"checkpoints differ in architecture: {a.name} ({a.family}, {a.n_layers}x{a.d_model}, vocab "
                            f"{a.vocab_size}) vs {b.name} ({b.family}, {b.n_layers}x{b.d_model}, vocab {b.vocab_size})")
    if a.tokenizer is not None and b.tokenizer is not None and a.tokenizer.get_vocab() != b.tokenizer.get_vocab():
        raise DLMScopeError(f"checkpoints {a.name} and {b.name} use different tokenizers")


@torch.no_grad()
def _latents(lm: LoadedModel, sae, hook: str, xt: torch.Tensor, keep: torch.Tensor,
             clean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    acts = run_with_cache(lm, xt.to(lm.device), [hook], clean=clean)[hook].float()[keep.to(lm.device)]
    return acts, sae.encode(acts)


def matched_similarity(saes: list) -> list[dict]:
    """Decoder-cosine optimal matching of each SAE against the first one."""
    from scipy.optimize import linear_sum_assignment

    base = torch.nn.functional.normalize(saes[0].W_dec.detach().float(), dim=1)
    out = []
    for other in saes[1:]:
        w = torch.nn.functional.normalize(other.W_dec.detach().float(), dim=1)
        if w.shape != base.shape:
            raise DLMScopeError(f"SAE shapes differ: {tuple(base.shape)} vs {tuple(w.shape)}")
        sim = base @ w.t()
        rows, cols = linear_sum_assignment(sim.numpy(), maximize=True)
        matched = sim[rows, cols]
        q = torch.quantile(matched, torch.tensor([0.1, 0.5, 0.9]))
        out.append({"mean": float(matched.mean()), "p10": float(q[0]), "median": float(q[1]), "p90": float(q[2]),
                    "fraction_above_0.9": float((matched > 0.9).float().mean()), "matched": matched.tolist()})
    return out


@torch.no_grad()
def stability_report(sae, checkpoints: list[LoadedModel], rows: torch.Tensor, *, saes_per_checkpoint: list | None = None,
                     control_sae=None, n_seqs: int = 32, seed: int = 0) -> dict:
    """Compare `checkpoints[1:]` with `checkpoints[0]` (on which `sae` was trained).

    Decoder matching between per-checkpoint SAEs only means something next to its floor: `control_sae`, a
    second SAE on the first checkpoint trained with another seed, gives how far two SAEs of one model differ.
    """
    positive("n_seqs", n_seqs)
    if len(checkpoints) < 2:
        raise DLMScopeError("give at least two checkpoints: the SAE's own and one later checkpoint")
    if control_sae is not None and not saes_per_checkpoint:
        raise DLMScopeError("a control SAE needs per-checkpoint SAEs to compare against; give saes_per_checkpoint too")
    base = checkpoints[0]
    hook = check_sae_matches(base, sae)
    for lm in checkpoints[1:]:
        check_compatible(base, lm)
    rows = rows[:n_seqs]
    from ..diffusion.noise import corrupt

    gen = torch.Generator().manual_seed(seed)
    t = 0.05 + 0.45 * torch.rand(rows.shape[0], generator=gen)
    if base.is_diffusion:
        c = corrupt(rows, base.require_mask_id(), t, eps=0.0, keep_first=True, generator=gen)
        xt, masked = c.xt, c.mask
    else:
        xt, masked = rows, torch.zeros_like(rows, dtype=torch.bool)
    # Evaluate on the positions the SAE was trained on (its masking policy).
    policy = sae.cfg.metadata.get("masking_policy", "all")
    keep = {"mask": masked, "unmask": ~masked}.get(policy, torch.ones_like(masked))
    base_acts, base_lat = _latents(base, sae, hook, xt, keep, rows)
    report = {"hook": hook, "policy": policy, "checkpoints": [lm.name for lm in checkpoints], "transfer": [],
              "features": []}
    top_base = base_lat.topk(10, dim=0).indices  # (10, n_latents): each feature's top-10 example positions
    alive = (base_lat > 0).sum(0) >= 10
    for lm in checkpoints:
        acts, lat = _latents(lm, sae, hook, xt, keep, rows)
        m = evaluate_sae(sae, acts)
        splice = splice_eval(lm, sae, rows, SpliceConfig(t_bins=(), n_seqs=n_seqs, seed=seed), other_model_ok=True)
        label = "dlmscope" if lm.is_diffusion else "clean"
        report["transfer"].append({"checkpoint": lm.name, "fvu": m["fvu"], "l0": m["l0"], "dead_fraction": m["dead_fraction"],
                                   "delta_ce": splice["bins"][label]["delta_ce"][0]})
        a, b = base_lat - base_lat.mean(0), lat - lat.mean(0)
        corr = (a * b).sum(0) / (a.norm(dim=0) * b.norm(dim=0)).clamp_min(1e-12)
        top = lat.topk(10, dim=0).indices
        overlap = torch.tensor([len(set(top_base[:, f].tolist()) & set(top[:, f].tolist())) / 10
                                for f in torch.nonzero(alive).flatten().tolist()])
        report["features"].append({"checkpoint": lm.name, "mean_correlation": float(corr[alive].mean()),
                                   "median_correlation": float(corr[alive].median()),
                                   "top_example_overlap_ge_half": float((overlap >= 0.5).float().mean()),
                                   "n_alive_features": int(alive.sum())})
    if saes_per_checkpoint:
        report["matching"] = matched_similarity(saes_per_checkpoint)
        if control_sae is not None:
            report["matching_control"] = matched_similarity([saes_per_checkpoint[0], control_sae])[0]
    return report


def stability_table(report: dict) -> str:
    lines = ["| checkpoint | FVU | L0 | dead | ΔCE | mean feature corr | top-example overlap >= 50% |",
             "|---|---|---|---|---|---|---|"]
    for t, f in zip(report["transfer"], report["features"]):
        lines.append(f"| {t['checkpoint']} | {t['fvu']:.4f} | {t['l0']:.1f} | {t['dead_fraction']:.3f} | {t['delta_ce']:+.4f} "
                     f"| {f['mean_correlation']:.4f} | {f['top_example_overlap_ge_half']:.3f} |")
    matches = [(report["checkpoints"][i], m) for i, m in enumerate(report.get("matching", []), 1)]
    if "matching_control" in report:
        matches.append((f"{report['checkpoints'][0]} (other seed: control)", report["matching_control"]))
    if matches:
        lines += ["", f"Decoder matching against the SAE of {report['checkpoints'][0]} (Hungarian, cosine):", "",
                  "| SAE of | mean | median | p10 | fraction > 0.9 |", "|---|---|---|---|---|"]
        lines += [f"| {name} | {m['mean']:.3f} | {m['median']:.3f} | {m['p10']:.3f} | {m['fraction_above_0.9']:.3f} |"
                  for name, m in matches]
    return "\n".join(lines)


def write_report_html(report: dict, path) -> None:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from ..io_utils import atomic_write_text

    names = [t["checkpoint"] for t in report["transfer"]]
    fig = make_subplots(rows=1, cols=3, subplot_titles=("SAE FVU per checkpoint", "mean feature correlation",
                                                        "matched decoder cosine"))
    fig.add_trace(go.Bar(x=names, y=[t["fvu"] for t in report["transfer"]], name="FVU"), row=1, col=1)
    fig.add_trace(go.Bar(x=names, y=[f["mean_correlation"] for f in report["features"]], name="corr"), row=1, col=2)
    for i, m in enumerate(report.get("matching", []), 1):
        fig.add_trace(go.Histogram(x=m["matched"], name=report["checkpoints"][i], nbinsx=40, opacity=0.6), row=1, col=3)
    if "matching_control" in report:
        fig.add_trace(go.Histogram(x=report["matching_control"]["matched"], name="control (other seed)", nbinsx=40,
                                   opacity=0.6), row=1, col=3)
    fig.update_layout(title=f"feature stability at {report['hook']}", height=450, barmode="overlay")
    atomic_write_text(path, fig.to_html(include_plotlyjs=True))
