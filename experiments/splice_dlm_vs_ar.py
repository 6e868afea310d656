"""ΔCE of SAE splicing vs layer, DLM vs its autoregressive twin (DLM-Scope's headline comparison).

Trains Top-K SAEs on every layer of dlmscope-tiny-dlm (masking policy `mask`, t ~ U[0.05, 0.5]) and
dlmscope-tiny-ar (clean text) at each k and SAE seed with `train_sae` (one activation pass per model and
seed feeds all of its SAEs), then splices each into its model on the same held-out sequences and masks:
DLM masked-token CE per fixed mask ratio t and on DLM-Scope's U[0.05, 0.5]; AR next-token CE. The clean
pass is shared by every SAE of a model, so all differences are paired. ΔCE intervals come from a crossed
bootstrap over SAE seeds and sequences (both sources of variance).

Mechanism check (DLM, k=32, SAE seed 0): is a loss reduction, if any, a property of the SAE's features or of
what any lossy map does to the residual? Besides the reconstruction x_hat we splice the residual rescaled to
x_hat's norm (norm shrink only), x_hat rescaled to x's norm (SAE direction only), and x projected onto its
top principal components with the SAE's FVU (a denoised residual with the same error energy), plus the SAE
spliced at masked positions only.

Writes experiments/results/splice_dlm_vs_ar.{json,md,html}. A finished training run is reused;
`--render` rebuilds tables and figure from the JSON alone.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _study import run_or_render  # noqa: E402
from dlmscope.io_utils import atomic_write_json, atomic_write_text  # noqa: E402

MODELS = ("dlmscope-tiny-dlm", "dlmscope-tiny-ar")
VARIANTS = ("sae", "norm_rescaled", "sae_at_x_norm", "pca_same_fvu", "sae_masked_only")
N_BOOT = 2000


def trained_saes(cfg) -> dict[Path, float]:
    """Train the run, or reuse a finished run of the same name: each SAE folder with its held-out FVU."""
    from dlmscope.training import train_sae

    run_dir = Path(cfg.out) / cfg.run_name()
    if (run_dir / "metrics.json").exists():
        final = json.loads((run_dir / "metrics.json").read_text())["final"]  # SAE key -> metrics, as run.metrics
        folders = {key: run_dir / "saes" / key.replace(".", "_") for key in final}
    else:
        run = train_sae(cfg)
        final, folders = run.metrics, run.saes
    return {Path(folders[key]): final[key]["fvu"] for key in sorted(final)}


def train_saes(model: str, seed: int, args) -> dict[Path, float]:
    """One model's SAEs (every layer, every k) for one seed, trained or read back from runs/."""
    from dlmscope.training import TrainSAEConfig

    return trained_saes(TrainSAEConfig(
        model=model, layers="0,1,2,3,4,5", k=args.k, total_tokens=args.tokens, batch_size=args.sae_batch_size,
        expansion=args.expansion, out=str(ROOT / "runs"), seed=seed,
        name=f"splice-{model}-{args.tokens}-b{args.sae_batch_size}-s{seed}", eval_every=10_000,
        checkpoint_every=10_000, threads=1, progress=False))


def _pca_projector(acts, fvu: float):
    """Mean and projector onto the fewest principal components whose residual variance is <= fvu."""
    import torch

    mean = acts.mean(0)
    _, s, vt = torch.linalg.svd(acts - mean, full_matrices=False)
    left = 1 - (s**2).cumsum(0) / (s**2).sum()
    r = int((left > fvu).sum()) + 1
    return mean, vt[:r].T @ vt[:r], r


def _replacement(sae, variant: str, pca=None):

    def fn(act, ctx):
        x = act.float()
        if variant == "pca_same_fvu":
            mean, proj, _ = pca
            return mean + (x - mean) @ proj
        recon = sae.reconstruct(x)
        if variant in ("sae", "sae_masked_only"):
            return recon
        nx, nr = x.norm(dim=-1, keepdim=True), recon.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        return x * (nr / nx.clamp_min(1e-6)) if variant == "norm_rescaled" else recon * (nx / nr)

    return fn


def train_and_eval(args) -> dict:
    import torch

    from dlmscope.analysis.splice import draw_masks
    from dlmscope.data import heldout_rows
    from dlmscope.diffusion.loss import next_token_ce, token_ce
    from dlmscope.hooks import hooked, run_with_cache
    from dlmscope.models import load_model
    from dlmscope.sae import load_sae

    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    t_bins = [float(t) for t in args.t_bins.split(",")]
    if args.train_only:  # train one model's SAEs (e.g. in a parallel process) and stop
        for seed in seeds:
            train_saes(args.train_only, seed, args)
        sys.exit(0)
    if args.combine:  # merge the per-twin files of parallel --twin runs
        parts = [json.loads(f.read_text()) for f in sorted(args.out.glob("splice_*.partial.json"))]
        merged = parts[0]
        for part in parts[1:]:
            merged["config"].update({k: v for k, v in part["config"].items() if k.startswith("train_s_")})
            merged["clean_ce"].update(part["clean_ce"])
            merged["saes"] += part["saes"]
            merged["mechanism"] += part["mechanism"]
        merged["config"]["seeds"] = ",".join(str(x) for x in sorted({e["seed"] for e in merged["saes"]}))
        return merged
    skip = ("out", "render", "train_only", "twin", "combine")
    results: dict = {"config": {k: v for k, v in vars(args).items() if k not in skip},
                     "saes": [], "clean_ce": {}, "mechanism": []}
    mech_layers = {int(x) for x in args.mechanism_layers.split(",")}
    for model in MODELS:
        if args.twin and model != args.twin:
            continue
        t0 = time.time()
        saes = {seed: train_saes(model, seed, args) for seed in seeds}
        results["config"][f"train_s_{model}"] = round(time.time() - t0, 1)
        lm = load_model(model)
        rows = heldout_rows(lm.tokenizer, 128)
        x_eval, x_pca = rows[: args.n_seqs], rows[args.n_seqs: 2 * args.n_seqs]
        bins = [(f"{t:.1f}", t) for t in t_bins] + [("dlmscope", None)] if lm.is_diffusion else [("clean", None)]
        loaded = {(seed, folder.name): (load_sae(folder), fvu) for seed, d in saes.items() for folder, fvu in d.items()}
        entries = {(seed, key): {"model": model, "seed": seed, "layer": lm.layer_of(s.cfg.hook_name), "k": s.cfg.k,
                                 "fvu": fvu, "delta_ce": {}} for (seed, key), (s, fvu) in loaded.items()}
        pcas = {}
        if lm.is_diffusion:
            hooks = sorted({s.cfg.hook_name for s, _ in loaded.values()})
            _, xt, _ = draw_masks(lm, x_pca, None, args.seed + 1, 0, 0)
            acts = run_with_cache(lm, xt, hooks)
            for (seed, key), (s, fvu) in loaded.items():
                if seed == 0 and s.cfg.k == 32 and lm.layer_of(s.cfg.hook_name) in mech_layers:
                    pcas[key] = _pca_projector(acts[s.cfg.hook_name].float().reshape(-1, lm.d_model), fvu)
        clean_all = {}
        for b_idx, (label, t) in enumerate(bins):
            x0, xt, c = draw_masks(lm, x_eval, t, args.seed, b_idx, 0)

            def seq_ce(fns=None, positions=None):
                with hooked(lm, fns or {}, positions=positions):
                    logits = lm.forward(xt) if lm.causal else lm.denoise_logits(xt)
                if lm.causal:
                    return next_token_ce(logits, x0).mean(1)
                return (token_ce(logits, x0) * c.mask).sum(1) / c.mask.sum(1).clamp_min(1)

            with torch.no_grad():
                clean = seq_ce()
                clean_all[label] = round(float(clean.mean()), 5)
                for (seed, key), (s, _) in loaded.items():
                    d = seq_ce({s.cfg.hook_name: _replacement(s, "sae")}) - clean
                    entries[(seed, key)]["delta_ce"][label] = [round(float(v), 5) for v in d]
                    if key in pcas and seed == 0:
                        for variant in VARIANTS[1:]:
                            pos = c.mask if variant == "sae_masked_only" else None
                            dv = seq_ce({s.cfg.hook_name: _replacement(s, variant, pcas[key])}, pos) - clean
                            results["mechanism"].append({"layer": entries[(seed, key)]["layer"], "k": s.cfg.k,
                                                         "bin": label, "variant": variant,
                                                         "pca_rank": pcas[key][2],
                                                         "delta_ce": [round(float(v), 5) for v in dv]})
            print(model, label, f"{time.time() - t0:.0f}s", flush=True)
        results["clean_ce"][model] = clean_all
        results["saes"] += list(entries.values())
    if args.twin:
        atomic_write_json(args.out / f"splice_{args.twin}_s{args.seeds.replace(',', '-')}.partial.json", results)
    return results


# ------------------------------------------------------------------------------------------- statistics
def crossed_bootstrap(matrix: list[list[float]], seed: int = 0) -> list[float]:
    """Mean and 95% percentile interval of a (seeds x sequences) matrix of paired ΔCE, resampling seeds
    and sequences independently (a crossed bootstrap); one row falls back to sequences only."""
    import torch

    m = torch.tensor(matrix, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    si = torch.randint(0, m.shape[0], (N_BOOT, m.shape[0]), generator=g)
    qi = torch.randint(0, m.shape[1], (N_BOOT, m.shape[1]), generator=g)
    rows = m[si]  # (N_BOOT, seeds, sequences)
    boots = torch.gather(rows, 2, qi[:, None, :].expand(-1, m.shape[0], -1)).mean((1, 2))
    lo, hi = torch.quantile(boots, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return [float(m.mean()), lo, hi]


def summary(results: dict) -> dict:
    """{(model, layer, k, bin): [mean, lo, hi, seed means]} over the SAE seeds."""
    groups: dict = {}
    for e in results["saes"]:
        for label, d in e["delta_ce"].items():
            groups.setdefault((e["model"], e["layer"], e["k"], label), []).append(d)
    return {key: crossed_bootstrap(rows) + [[sum(r) / len(r) for r in rows]] for key, rows in groups.items()}


def _ci(v) -> str:
    return f"{v[0]:+.3f} [{v[1]:+.3f}, {v[2]:+.3f}]"


def readme_table(results: dict) -> str:
    """ΔCE per layer and k, DLM (t ~ U[0.05, 0.5]) vs AR, mean over SAE seeds with 95% intervals."""
    s = summary(results)
    ks = sorted({e["k"] for e in results["saes"]})
    layers = sorted({e["layer"] for e in results["saes"]})
    lines = ["| layer | " + " | ".join(f"DLM k={k}" for k in ks) + " | " + " | ".join(f"AR k={k}" for k in ks) + " |",
             "|---|" + "---|" * (2 * len(ks))]
    for layer in layers:
        cells = [_ci(s[(MODELS[0], layer, k, "dlmscope")]) for k in ks] + [_ci(s[(MODELS[1], layer, k, "clean")])
                                                                            for k in ks]
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def readme_bins_table(results: dict) -> str:
    """DLM ΔCE per fixed mask ratio (k=32), mean over SAE seeds with 95% intervals."""
    s = summary(results)
    bins = [b for b in results["clean_ce"][MODELS[0]] if b != "dlmscope"]
    layers = sorted({e["layer"] for e in results["saes"]})
    lines = ["| layer | " + " | ".join(f"t={b}" for b in bins) + " |", "|---|" + "---|" * len(bins)]
    lines += [f"| {layer} | " + " | ".join(_ci(s[(MODELS[0], layer, 32, b)]) for b in bins) + " |" for layer in layers]
    return "\n".join(lines)


def mechanism_summary(results: dict) -> dict:
    out = {}
    for m in results["mechanism"]:
        out[(m["layer"], m["bin"], m["variant"])] = crossed_bootstrap([m["delta_ce"]])
    return out


def readme_mechanism_table(results: dict, bins=("0.1", "0.9", "dlmscope")) -> str:
    """Splicing variants (k=32, first seed): ΔCE with 95% intervals over sequences, at three mask ratios."""
    s, mech = summary(results), mechanism_summary(results)
    seed0 = min(e["seed"] for e in results["saes"])
    sae = {(e["layer"], b): crossed_bootstrap([d]) for e in results["saes"] if e["seed"] == seed0 and e["k"] == 32
           and e["model"] == MODELS[0] for b, d in e["delta_ce"].items()}
    del s
    layers = sorted({m["layer"] for m in results["mechanism"]})
    lines = ["| layer | t | SAE x_hat | x at x_hat's norm | x_hat at x's norm | PCA, same FVU | SAE at masked only |",
             "|---|---|---|---|---|---|---|"]
    for layer in layers:
        for b in bins:
            lines.append(f"| {layer} | {b} | {_ci(sae[(layer, b)])} | " + " | ".join(
                _ci(mech[(layer, b, v)]) for v in VARIANTS[1:]) + " |")
    return "\n".join(lines)


def verdict(results: dict) -> str:
    s = summary(results)
    below = sorted(f"L{layer} k={k} t={b}" for (model, layer, k, b), v in s.items()
                   if model == MODELS[0] and v[2] < 0)
    mech = mechanism_summary(results)
    mech_below = sorted(f"L{layer} t={b} {v}" for (layer, b, v), ci in mech.items() if ci[2] < 0)
    n = sum(1 for key in s if key[0] == MODELS[0])
    text = (f"Configurations where splicing significantly lowers the DLM's masked CE (95% upper bound < 0): "
            f"{len(below)} of {n} (layer x k x mask-ratio bin){': ' + ', '.join(below) if below else ''}. ")
    text += (f"Among the mechanism variants: {len(mech_below)}{': ' + ', '.join(mech_below) if mech_below else ''}.")
    return text


def pca_over_sae(results: dict, mech: dict) -> list[float]:
    """Per mechanism cell (layer, bin): ΔCE of the same-FVU PCA projection over that of the SAE (k=32, first seed)."""
    seed0 = min(e["seed"] for e in results["saes"])
    sae = {(e["layer"], b): sum(d) / len(d) for e in results["saes"] if e["seed"] == seed0 and e["k"] == 32
           and e["model"] == MODELS[0] for b, d in e["delta_ce"].items()}
    return [ci[0] / sae[(layer, b)] for (layer, b, v), ci in mech.items() if v == "pca_same_fvu"]


def headline(results: dict, s: dict) -> dict:
    """The numbers the README's prose quotes (written next to the .md as splice_dlm_vs_ar_summary.json);
    `s` is `summary(results)`."""
    mech = mechanism_summary(results)
    dlm = {key: v[:3] for key, v in s.items() if key[0] == MODELS[0]}
    ks, layers = sorted({key[2] for key in dlm}), sorted({key[1] for key in dlm})
    fvu: dict = {}
    for e in results["saes"]:
        if e["model"] == MODELS[0]:
            fvu.setdefault((e["layer"], e["k"]), []).append(e["fvu"])
    name = "L{1} k={2} t={3}".format
    return {
        "dlm_configurations": len(dlm),
        "dlm_upper_below_zero": [name(*key) for key, v in dlm.items() if v[2] < 0],
        "dlm_interval_reaching_zero": [name(*key) for key, v in dlm.items() if v[1] <= 0],
        "dlm_closest_to_zero": [{"layer": key[1], "k": key[2], "t": float(key[3]) if key[3][0].isdigit() else key[3],
                                 "delta_ce": v} for key, v in sorted(dlm.items(), key=lambda kv: kv[1][0])[:3]],
        "ar_over_dlm_range": [f(s[(MODELS[1], layer, k, "clean")][0] / s[(MODELS[0], layer, k, "dlmscope")][0]
                                for layer in layers for k in ks) for f in (min, max)],
        "dlm_mean_fvu_k32_range": [f(sum(fvu[(layer, 32)]) / len(fvu[(layer, 32)]) for layer in layers)
                                   for f in (min, max)] if 32 in ks else [],
        "mechanism_cells": len(mech),
        "pca_over_sae_range": [f(pca_over_sae(results, mech)) for f in (min, max)],
        "mechanism_upper_below_zero": [f"L{layer} t={b} {v}" for (layer, b, v), ci in mech.items() if ci[2] < 0],
    }


def render(results: dict, out: Path) -> str:
    if len(results["clean_ce"]) < len(MODELS):
        return "one twin only: merge the partial files with --combine"
    s = summary(results)
    atomic_write_json(out / "splice_dlm_vs_ar_summary.json", headline(results, s))
    c = results["config"]
    ks = sorted({e["k"] for e in results["saes"]})
    layers = sorted({e["layer"] for e in results["saes"]})
    fvu = ["| model | layer | " + " | ".join(f"FVU k={k}" for k in ks) + " |", "|---|---|" + "---|" * len(ks)]
    for model in MODELS:
        for layer in layers:
            cells = []
            for k in ks:
                v = [e["fvu"] for e in results["saes"] if e["model"] == model and e["layer"] == layer and e["k"] == k]
                cells.append(f"{sum(v) / len(v):.3f} ({min(v):.3f}-{max(v):.3f})")
            fvu.append(f"| {model.replace('dlmscope-', '')} | {layer} | " + " | ".join(cells) + " |")
    bins = list(results["clean_ce"][MODELS[0]])
    full = ["| layer | k | " + " | ".join(f"t={b}" for b in bins) + " |", "|---|---|" + "---|" * len(bins)]
    full += [f"| {layer} | {k} | " + " | ".join(_ci(s[(MODELS[0], layer, k, b)]) for b in bins) + " |"
             for layer in layers for k in ks]
    seeds = ", ".join(f"{m.replace('dlmscope-tiny-', '')} " + ",".join(str(x) for x in sorted(
        {e["seed"] for e in results["saes"] if e["model"] == m})) for m in MODELS)
    md = (f"SAEs: Top-K, {c['expansion']}x expansion, {c['tokens']:,} training tokens each (batch {c['sae_batch_size']}), "
          f"k in {c['k']}, SAE seeds {seeds}; {c['n_seqs']} held-out sequences of 128 tokens, one mask draw per "
          "sequence and bin shared by every SAE. ΔCE = spliced - clean (nats), mean over seeds and sequences, 95% "
          "interval from a crossed bootstrap over seeds and sequences. DLM: masked-token CE (dlmscope = t ~ U[0.05, 0.5] "
          f"per sequence); AR: next-token CE. Clean CE: {json.dumps(results['clean_ce'])}.\n\n"
          "DLM (dlmscope bin) vs AR:\n\n" + readme_table(results)
          + "\n\nDLM per mask ratio, every k:\n\n" + "\n".join(full)
          + "\n\nHeld-out FVU at the end of training (mean over seeds, min-max):\n\n" + "\n".join(fvu)
          + "\n\nMechanism (DLM, k=32, SAE seed 0; intervals over sequences):\n\n"
          + readme_mechanism_table(results, tuple(bins)) + "\n\n" + verdict(results) + "\n")
    atomic_write_text(out / "splice_dlm_vs_ar.md", md)
    try:
        import plotly.graph_objects as go
    except ImportError:
        return md
    fig = go.Figure()
    for model in MODELS:
        label = "dlmscope" if model == MODELS[0] else "clean"
        for k in ks:
            pts = [s[(model, layer, k, label)] for layer in layers]
            fig.add_trace(go.Scatter(
                x=layers, y=[p[0] for p in pts], mode="lines+markers",
                name=f"{'DLM' if model == MODELS[0] else 'AR'} k={k}",
                error_y=dict(type="data", symmetric=False, array=[p[2] - p[0] for p in pts],
                             arrayminus=[p[0] - p[1] for p in pts])))
    fig.add_hline(y=0, line_dash="dot")
    fig.update_layout(title="ΔCE vs layer, DLM vs AR (mean over SAE seeds, 95% crossed-bootstrap intervals)",
                      xaxis_title="layer", yaxis_title="ΔCE = spliced - clean (nats)")
    atomic_write_text(out / "splice_dlm_vs_ar.html", fig.to_html(include_plotlyjs="cdn"))
    return md


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tokens", type=int, default=150_000, help="training tokens per SAE")
    p.add_argument("--k", default="16,32,64")
    p.add_argument("--seeds", default="0,1,2", help="SAE seeds")
    p.add_argument("--sae-batch-size", type=int, default=1024)
    p.add_argument("--expansion", type=int, default=8)
    p.add_argument("--n-seqs", type=int, default=32, help="held-out sequences (the next as many fit the PCA)")
    p.add_argument("--t-bins", default="0.1,0.3,0.5,0.7,0.9")
    p.add_argument("--seed", type=int, default=0, help="seed of the mask draws")
    p.add_argument("--mechanism-layers", default="0,1,2", help="layers of the mechanism check")
    p.add_argument("--twin", choices=MODELS, help="evaluate one twin only (parallel processes)")
    p.add_argument("--combine", action="store_true", help="merge the partial files of --twin runs in --out")
    p.add_argument("--train-only", choices=MODELS, help="only train this model's SAEs (parallel processes)")
    run_or_render(p, "splice_dlm_vs_ar", train_and_eval, render)


if __name__ == "__main__":
    main()
