"""Steering success vs strength on both twins, and all-steps vs early-steps-only schedules.

Features are chosen the same way on both models, from each model's shipped layer-3 SAE on the same
held-out text: among latents firing on 0.5-20% of tokens, the ones whose activation mass is most
concentrated on their 20 top tokens (concept-like). Steering is DLM-Scope's A[f] += strength *
max(A), error kept, at all positions; the DLM schedule counts denoising steps, the AR one generated
tokens (first:0.1 = first 10% of either). Success: the feature's mean activation on the re-encoded
continuation and its concept-token rate; fluency: perplexity under the AR twin and NLL bound
(ELBO) under the DLM. Prompts x seeds, temperature 0.5, steered vs unsteered (strength 0).
Writes experiments/results/steering_dlm_vs_ar.{json,md,html}.
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
from dlmscope.io_utils import atomic_write_text  # noqa: E402

PROMPTS = ["The list type", "A dictionary is", "The import statement", "Exceptions are", "A function",
           "The module"]
MODELS = (("dlmscope-tiny-dlm", "tiny-dlm-L3-k32"), ("dlmscope-tiny-ar", "tiny-ar-L3-k32"))


def choose_features(lm, sae, rows, n: int) -> list[int]:
    """Concept-like latents: density in [0.5%, 20%], ranked by activation mass on their top-20 tokens."""
    import torch

    from dlmscope.hooks import run_with_cache

    a = sae.encode(run_with_cache(lm, rows.to(lm.device), [sae.cfg.hook_name])[sae.cfg.hook_name].float())
    a = a.reshape(-1, a.shape[-1]).cpu()
    tok = rows.flatten()
    density = (a > 0).float().mean(0)
    mass = torch.zeros(lm.vocab_size, a.shape[1]).index_add_(0, tok, a)
    conc = mass.topk(20, dim=0).values.sum(0) / mass.sum(0).clamp_min(1e-9)
    conc[(density < 0.005) | (density > 0.2)] = -1
    return [int(f) for f in conc.topk(n).indices]


def run(args) -> dict:
    from dlmscope.analysis.steering import SteeringSpec, compare, feature_token_profile
    from dlmscope.data import heldout_rows
    from dlmscope.models import load_model
    from dlmscope.sae import load_sae

    strengths = [float(s) for s in args.strengths.split(",")]
    early = [float(s) for s in args.early_strengths.split(",")]
    seeds = list(range(args.seeds))
    judges = {name: load_model(name, device=args.device) for name, _ in MODELS}
    res: dict = {"config": vars(args) | {"out": str(args.out), "prompts": PROMPTS}, "runs": []}
    for model, sae_name in MODELS:
        lm, sae = judges[model], load_sae(sae_name, device=args.device)
        rows = heldout_rows(lm.tokenizer, 128, 64)
        for f in choose_features(lm, sae, rows, args.features):
            concept = feature_token_profile(lm, sae, f, rows)
            for schedule, ss in (("all", strengths), (f"first:{args.early}", early)):
                for s in ss:
                    t0 = time.time()
                    r = compare(lm, sae, SteeringSpec(f, s, steps=schedule), PROMPTS, seeds, concept,
                                judges[MODELS[1][0]], judges[MODELS[0][0]], gen_length=32, steps=32,
                                temperature=args.temperature)
                    res["runs"].append({"model": model, "feature": f, "schedule": schedule, "strength": s,
                                        "concept_tokens": lm.tokenizer.convert_ids_to_tokens(concept[:8]),
                                        "unsteered": r["unsteered"], "steered": r["steered"],
                                        "sample": [r["prompts"][0] + r["unsteered_texts"][0],
                                                   r["prompts"][0] + r["steered_texts"][0]],
                                        "seconds": round(time.time() - t0, 1)})
                    print(model, f, schedule, s, f"{time.time() - t0:.0f}s", flush=True)
    return res


def render(res: dict, out: Path) -> str:
    runs = res["runs"]
    lines = ["| model | feature | schedule | strength | feature act. (unsteered -> steered) | concept rate | "
             "AR perplexity | DLM NLL/token |", "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        u, s = r["unsteered"], r["steered"]
        lines.append(f"| {r['model'].replace('dlmscope-', '')} | {r['feature']} | {r['schedule']} | {r['strength']:g} | "
                     f"{u['feature_activation']:.4f} -> {s['feature_activation']:.4f} | "
                     f"{u['concept_rate']:.3f} -> {s['concept_rate']:.3f} | {u['perplexity']:.0f} -> {s['perplexity']:.0f} | "
                     f"{u['dlm_nll']:.2f} -> {s['dlm_nll']:.2f} |")
    # averaged curves: success vs strength per model and schedule
    agg: dict = {}
    for r in runs:
        key = (r["model"], r["schedule"], r["strength"])
        agg.setdefault(key, []).append(r)
    summary = ["| model | schedule | strength | Δ feature act. | Δ concept rate | AR perplexity | DLM NLL/token |",
               "|---|---|---|---|---|---|---|"]
    for (model, sched, s), rs in sorted(agg.items()):
        mean = lambda f: sum(f(r) for r in rs) / len(rs)  # noqa: E731
        summary.append(f"| {model.replace('dlmscope-', '')} | {sched} | {s:g} | "
                       f"{mean(lambda r: r['steered']['feature_activation'] - r['unsteered']['feature_activation']):+.4f} | "
                       f"{mean(lambda r: r['steered']['concept_rate'] - r['unsteered']['concept_rate']):+.3f} | "
                       f"{mean(lambda r: r['steered']['perplexity']):.0f} | {mean(lambda r: r['steered']['dlm_nll']):.2f} |")
    c = res["config"]
    md = (f"{len(c['prompts'])} prompts x {c['seeds']} seeds, 32 new tokens (DLM: 32 steps, one block), temperature "
          f"{c['temperature']}; {c['features']} features per model; shipped layer-3 SAEs (k=32). Mean over features:\n\n"
          + "\n".join(summary) + "\n\nPer feature (unsteered -> steered):\n\n" + "\n".join(lines) + "\n\nSamples "
          "(first prompt, unsteered / steered):\n\n" + "\n".join(
              f"- {r['model'].replace('dlmscope-', '')} f{r['feature']} {r['schedule']} s={r['strength']:g}: "
              f"{json.dumps(r['sample'][0])} / {json.dumps(r['sample'][1])}"
              for r in runs if r["strength"] == max(x["strength"] for x in runs)) + "\n")
    atomic_write_text(out / "steering_dlm_vs_ar.md", md)
    try:
        from plotly.subplots import make_subplots
    except ImportError:
        return md
    import plotly.graph_objects as go

    fig = make_subplots(rows=1, cols=3, subplot_titles=("Δ feature activation", "Δ concept-token rate",
                                                        "AR-twin perplexity"))
    for model, _ in MODELS:
        for sched in sorted({r["schedule"] for r in runs}):
            pts = sorted((s, rs) for (m, sc, s), rs in agg.items() if m == model and sc == sched)
            xs = [s for s, _ in pts]
            for col, f in enumerate((lambda r: r["steered"]["feature_activation"] - r["unsteered"]["feature_activation"],
                                     lambda r: r["steered"]["concept_rate"] - r["unsteered"]["concept_rate"],
                                     lambda r: r["steered"]["perplexity"]), 1):
                fig.add_trace(go.Scatter(x=xs, y=[sum(map(f, rs)) / len(rs) for _, rs in pts], mode="lines+markers",
                                         name=f"{model.replace('dlmscope-tiny-', '')} {sched}",
                                         legendgroup=f"{model}{sched}", showlegend=col == 1), 1, col)
    fig.update_xaxes(title_text="strength")
    fig.update_layout(title="Steering success vs strength, DLM vs AR twin")
    atomic_write_text(out / "steering_dlm_vs_ar.html", fig.to_html(include_plotlyjs="cdn"))
    return md


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--strengths", default="0,1,2,4,8")
    p.add_argument("--early", type=float, default=0.1, help="early-only schedule: the first fraction of steps")
    p.add_argument("--early-strengths", default="2,4,8")
    p.add_argument("--features", type=int, default=3)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--temperature", type=float, default=0.5)
    run_or_render(p, "steering_dlm_vs_ar", run, render)


if __name__ == "__main__":
    main()
