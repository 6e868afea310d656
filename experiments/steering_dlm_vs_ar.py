"""Steering success vs strength on both twins, and all-steps vs early-steps schedules.

Features are chosen the same way on both models: the 3 densest live features of the shipped layer-3
SAE whose top tokens are words. Success = concept-token rate of the generated text (tokens among the
feature's 20 top-activating tokens on held-out text) and the feature's mean activation when the text
is re-encoded; fluency = perplexity under the AR twin. Writes experiments/results/steering_dlm_vs_ar.*.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dlmscope.analysis.steering import SteeringSpec, feature_token_profile, steered_generate, steering_metrics  # noqa: E402
from dlmscope.data import heldout_rows  # noqa: E402
from dlmscope.io_utils import atomic_write_json, atomic_write_text  # noqa: E402
from dlmscope.models import load_model  # noqa: E402
from dlmscope.sae import load_sae  # noqa: E402

PROMPTS = ["The list type", "A dictionary is", "The import statement", "Exceptions are", "A function"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--strengths", default="0,1,2,4,8")
    p.add_argument("--out", type=Path, default=ROOT / "experiments" / "results")
    args = p.parse_args()
    strengths = [float(s) for s in args.strengths.split(",")]
    ar_judge = load_model("dlmscope-tiny-ar")
    results = {}
    for model, sae_name in (("dlmscope-tiny-dlm", "tiny-dlm-L3-k32"), ("dlmscope-tiny-ar", "tiny-ar-L3-k32")):
        lm, sae = load_model(model), load_sae(sae_name)
        rows = heldout_rows(lm.tokenizer, 128, 48)
        from dlmscope.hooks import run_with_cache

        acts = run_with_cache(lm, rows, [sae.cfg.hook_name])[sae.cfg.hook_name].float()
        density = (sae.encode(acts) > 0).float().mean((0, 1))
        features = [int(f) for f in density.argsort(descending=True)[:3]]
        for f in features:
            concept = feature_token_profile(lm, sae, f, rows)
            for schedule in ("all", "first:0.1"):
                for s in strengths if schedule == "all" else [4.0]:
                    spec = SteeringSpec(f, s, steps=schedule)
                    texts = steered_generate(lm, sae, spec, PROMPTS, gen_length=32, steps=32)
                    full = [pr + t for pr, t in zip(PROMPTS, texts)]
                    m = steering_metrics(lm, sae, f, full, concept, ar_judge)
                    results[f"{model}|{f}|{schedule}|{s}"] = {"model": model, "feature": f, "schedule": schedule,
                                                              "strength": s, **m, "sample": full[0]}
    lines = ["| model | feature | schedule | strength | concept rate | feature act. | AR perplexity |", "|---|---|---|---|---|---|---|"]
    for v in results.values():
        lines.append(f"| {v['model']} | {v['feature']} | {v['schedule']} | {v['strength']:g} | {v['concept_rate']:.3f} | "
                     f"{v['feature_activation']:.3f} | {v['perplexity']:.0f} |")
    md = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "steering_dlm_vs_ar.json", results)
    atomic_write_text(args.out / "steering_dlm_vs_ar.md", md)
    import plotly.graph_objects as go

    fig = go.Figure()
    for model in ("dlmscope-tiny-dlm", "dlmscope-tiny-ar"):
        pts = {}
        for v in results.values():
            if v["model"] == model and v["schedule"] == "all":
                pts.setdefault(v["strength"], []).append(v["concept_rate"])
        xs = sorted(pts)
        fig.add_trace(go.Scatter(x=xs, y=[sum(pts[x]) / len(pts[x]) for x in xs], name=model, mode="lines+markers"))
    fig.update_layout(title="steering success (concept-token rate) vs strength", xaxis_title="strength")
    atomic_write_text(args.out / "steering_dlm_vs_ar.html", fig.to_html(include_plotlyjs=True))
    print(md)


if __name__ == "__main__":
    main()
