"""Steering the DLM vs its autoregressive twin: success and fluency per feature, three schedules, with intervals.

Rule fixed before any steering result was looked at: per twin, from its shipped layer-3 SAE (k=32) on the first
64 held-out rows, the FEATURES latents with density in [0.5%, 20%] whose activation mass is most concentrated on
their 20 top tokens (concept-like; `choose_features`). Steering is DLM-Scope's A[f] += strength * max(A), error
kept, at all positions. Schedules over the 32 denoising steps (DLM) or 32 generated tokens (AR): all, first
quarter (first:0.25) and last quarter (late: steps 24-31), so the two partial schedules steer equally often.
Per generated text (prompts x seeds, temperature 0.5): the feature's mean activation when the prompt +
continuation is re-encoded (the study's success metric), the concept-token rate under three definitions of a
feature's 20 concept tokens (`dlmscope.analysis.steering`: output side, where the model reads the activation
out; logit, the decoder direction's direct logit attribution; input side, the definition before both, which
reads a DLM on its output side and an AR model on its input side and is reported only to show what it did),
perplexity under the AR twin and the DLM's ELBO bound on NLL per token; steered minus unsteered on the same
prompt and seed. A feature's
effect is its mean over texts; intervals are 95% Student-t over features, and DLM vs AR is a Welch t-test
over features (the twins' features are chosen separately, so the samples are independent), its p-values also
Holm-adjusted over all the table's tests (the
activation and the two unbiased concept rates; the input-side rate is not tested).
Writes experiments/results/steering_dlm_vs_ar.{json,md} and the summary the README quotes. The committed run:
each twin with `--twin` at strength 4 and again with `--strengths 8` in another folder (seed 0), then `--combine
--merge`, with seed 1 (`--strengths 4,8 --first-seed 1`, combined in its own folder) appended by `--join`.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _study import run_or_render  # noqa: E402
from dlmscope.io_utils import atomic_write_json, atomic_write_text  # noqa: E402
from dlmscope.stats import holm, t_interval  # noqa: E402

PROMPTS = ["The list type", "A dictionary is", "The import statement", "Exceptions are", "A function",
           "The module", "To open a file", "The class", "The for loop", "A string", "The return value",
           "An iterator", "The default argument", "A tuple", "The keyword", "The standard library"]
MODELS = (("dlmscope-tiny-dlm", "tiny-dlm-L3-k32"), ("dlmscope-tiny-ar", "tiny-ar-L3-k32"))
CONCEPT_NAMES = ("output", "logit", "input")
METRICS = ("feature_activation", *(f"concept_rate_{c}" for c in CONCEPT_NAMES), "perplexity", "dlm_nll")
SUCCESS = METRICS[:1 + len(CONCEPT_NAMES)]
TESTED = ("feature_activation", "concept_rate_output", "concept_rate_logit")


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


def schedules(args) -> dict:
    late = list(range(args.steps - round(args.partial * args.steps), args.steps))
    return {"all": "all", f"first:{args.partial:g}": f"first:{args.partial:g}", "late": late}


def run(args) -> dict:
    """Both twins, or one (--twin, written to <out>/steering_<twin>.partial.json after every feature so a run
    cut short keeps the first features of the ranking); --combine merges the two partial files."""
    import json

    import torch

    from dlmscope.analysis.steering import (SteeringSpec, input_concept, logit_concept, output_concept,
                                            steered_generate, steering_metrics)
    from dlmscope.data import heldout_rows
    from dlmscope.models import load_model
    from dlmscope.sae import load_sae

    if args.combine:  # both twins' partial files of --out, plus those of runs at other strengths (--merge)
        merged: dict = {}
        for folder in [args.out, *args.merge]:
            for m, _ in MODELS:
                part = json.loads((folder / f"steering_{m}.partial.json").read_text())
                if not merged:
                    merged = part
                    continue
                for key in ("features", "unsteered", "dla_overlap"):
                    if merged[key].setdefault(m, part[key][m]) != part[key][m]:
                        raise SystemExit(f"{folder}: {m}'s {key} differ from the first run's; "
                                         "only strengths may differ")
                merged["runs"] += part["runs"]
        order = [m for m, _ in MODELS]
        merged["runs"].sort(key=lambda r: (order.index(r["model"]), r["strength"]))
        merged["config"]["strengths"] = ",".join(f"{x:g}" for x in sorted({r["strength"] for r in merged["runs"]}))
        merged = first_complete(merged)
        for path in args.join:
            merged = join_seeds(merged, json.loads(path.read_text()))
        return merged
    torch.set_num_threads(1)
    strengths = [float(s) for s in args.strengths.split(",")]
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    judges = {name: load_model(name) for name, _ in MODELS}
    ar_judge, dlm_judge = judges[MODELS[1][0]], judges[MODELS[0][0]]
    texts_prompts = [p for _ in seeds for p in PROMPTS]
    res: dict = {"config": {k: v for k, v in vars(args).items() if k not in ("out", "render", "twin", "combine")} | {"prompts": PROMPTS},
                 "schedules": {k: v for k, v in schedules(args).items()}, "features": {}, "dla_overlap": {},
                 "unsteered": {}, "runs": []}

    def per_text(lm, sae, f, conts, concept, judged: bool) -> list[dict]:
        out = []
        for p, c in zip(texts_prompts, conts):
            m = steering_metrics(lm, sae, f, [p], [c], concept, ar_judge if judged else None,
                                 dlm_judge if judged else None, n_draws=args.n_draws)
            out.append(m | {f"concept_rate_{k}": v for k, v in m.pop("concept_rate").items()})
        return out

    for model, sae_name in MODELS:
        if args.twin and model != args.twin:
            continue
        lm, sae = judges[model], load_sae(sae_name)
        rows = heldout_rows(lm.tokenizer, 128, 64)
        features = choose_features(lm, sae, rows, args.features)
        concepts = {f: {"output": output_concept(lm, sae, f, rows), "logit": logit_concept(lm, sae, f),
                        "input": input_concept(lm, sae, f, rows)} for f in features}
        res["features"][model] = {str(f): {k: lm.tokenizer.convert_ids_to_tokens(c[:8]) for k, c in concepts[f].items()}
                                  for f in features}
        # how much of each concept the decoder direction itself promotes: share of its tokens among the top-50 DLA
        top50 = {f: set(logit_concept(lm, sae, f, top=50)) for f in features}
        res["dla_overlap"][model] = {str(f): {k: len(set(c) & top50[f]) / len(c) for k, c in concepts[f].items()}
                                     for f in features}
        t0 = time.time()
        base = [c for seed in seeds for c in steered_generate(lm, sae, None, PROMPTS, 32, args.steps, seed,
                                                              args.temperature)]
        fluency = per_text(lm, sae, features[0], base, concepts[features[0]], True)
        res["unsteered"][model] = {"texts": base, "perplexity": [m["perplexity"] for m in fluency],
                                   "dlm_nll": [m["dlm_nll"] for m in fluency], "per_feature": {}}
        for f in features:
            m = per_text(lm, sae, f, base, concepts[f], False)
            res["unsteered"][model]["per_feature"][str(f)] = {k: [x[k] for x in m] for k in SUCCESS}
        for f in features:
            for sched, steps in schedules(args).items():
                for s in strengths:
                    spec = SteeringSpec(f, s, steps=steps)
                    conts = [c for seed in seeds for c in steered_generate(lm, sae, spec, PROMPTS, 32, args.steps,
                                                                           seed, args.temperature)]
                    m = per_text(lm, sae, f, conts, concepts[f], True)
                    res["runs"].append({"model": model, "feature": f, "schedule": sched, "strength": s,
                                        **{k: [x[k] for x in m] for k in METRICS}, "texts": conts})
            print(model, f, f"{time.time() - t0:.0f}s", flush=True)
            if args.twin:
                atomic_write_json(args.out / f"steering_{model}.partial.json", res)
    return res


def join_seeds(res: dict, other: dict) -> dict:
    """`res` with the texts of `other`, a combined run of further sampling seeds (same features, prompts,
    strengths and schedules), appended: as one run over all the seeds would have recorded them."""
    if other["features"] != res["features"] or other["dla_overlap"] != res["dla_overlap"]:
        raise SystemExit("--join: the runs chose different features; only the seeds may differ")
    first = res["config"].get("first_seed", 0)
    if other["config"].get("first_seed", 0) != first + res["config"]["seeds"]:
        raise SystemExit(f"--join: the joined run must start at seed {first + res['config']['seeds']}")
    extra = {(r["model"], r["feature"], r["schedule"], r["strength"]): r for r in other["runs"]}
    if set(extra) != {(r["model"], r["feature"], r["schedule"], r["strength"]) for r in res["runs"]}:
        raise SystemExit("--join: the runs differ in their features, schedules or strengths")
    for r in res["runs"]:
        for k in (*METRICS, "texts"):
            r[k] = r[k] + extra[(r["model"], r["feature"], r["schedule"], r["strength"])][k]
    for m, u in res["unsteered"].items():
        v = other["unsteered"][m]
        for k in ("texts", "perplexity", "dlm_nll"):
            u[k] = u[k] + v[k]
        u["per_feature"] = {f: {k: x + v["per_feature"][f][k] for k, x in per.items()} for f, per in u["per_feature"].items()}
    res["config"]["seeds"] += other["config"]["seeds"]
    return res


def first_complete(res: dict) -> dict:
    """Keep the first N features of each twin's ranking, N the most both twins finished every run of (a run cut
    short saves its features in ranking order), so the twins are compared on equally many top-ranked features."""
    cells = {(r["schedule"], r["strength"]) for r in res["runs"]}
    done = {m: {r["feature"] for r in res["runs"] if r["model"] == m} for m in res["features"]}
    n = min(next((i for i, f in enumerate(ranked) if int(f) not in done[m] or sum(
        r["model"] == m and r["feature"] == int(f) for r in res["runs"]) < len(cells)), len(ranked))
            for m, ranked in res["features"].items())
    keep = {m: [int(f) for f in list(ranked)[:n]] for m, ranked in res["features"].items()}
    res["ranking"] = {m: [int(f) for f in ranked] for m, ranked in res["features"].items()}
    res["runs"] = [r for r in res["runs"] if r["feature"] in keep[r["model"]]]
    for key in ("features", "dla_overlap"):
        res[key] = {m: {f: v for f, v in per.items() if int(f) in keep[m]} for m, per in res[key].items()}
    for m, u in res["unsteered"].items():
        u["per_feature"] = {f: v for f, v in u["per_feature"].items() if int(f) in keep[m]}
    res["config"]["features"] = n
    return res


# ------------------------------------------------------------------------------------------- statistics
def _mean(v) -> float:
    return sum(v) / len(v)


def effects(res: dict) -> dict:
    """{(model, schedule, strength): {metric: per-feature steered - unsteered means}}."""
    out: dict = {}
    for r in res["runs"]:
        u = res["unsteered"][r["model"]]
        base = {**u["per_feature"][str(r["feature"])], "perplexity": u["perplexity"], "dlm_nll": u["dlm_nll"]}
        e = out.setdefault((r["model"], r["schedule"], r["strength"]), {k: [] for k in METRICS})
        for k in METRICS:
            # A continuation with no tokens (strong steering can produce one) has no perplexity or NLL: such
            # texts drop out of the fluency means (counted by `unjudged`).
            pairs = [(a, b) for a, b in zip(r[k], base[k]) if math.isfinite(a) and math.isfinite(b)]
            if k == "perplexity":  # ratio of perplexities = exp(difference of per-text log perplexities)
                e[k].append(math.exp(_mean([math.log(a) - math.log(b) for a, b in pairs])))
            else:
                e[k].append(_mean([a - b for a, b in pairs]))
    return out


def unjudged(res: dict) -> dict:
    """{model/schedule/strength: number of steered texts without a perplexity (no continuation tokens)}."""
    out: dict = {}
    for r in res["runs"]:
        key = f"{r['model']}/{r['schedule']}/{r['strength']:g}"
        out[key] = out.get(key, 0) + sum(not math.isfinite(x) for x in r["perplexity"])
    return out


def _ci(v, fmt="+.4f") -> str:
    return f"{v[0]:{fmt}} [{v[1]:{fmt}}, {v[2]:{fmt}}]"


def effect_intervals(res: dict) -> dict:
    """{(model, schedule, strength): {metric: [mean, lo, hi]}} over features; perplexity as a ratio (the interval
    taken on log ratios)."""
    return {key: {k: [math.exp(x) for x in t_interval([math.log(y) for y in v])] if k == "perplexity" else t_interval(v)
                  for k, v in e.items()} for key, e in effects(res).items()}


def readme_table(res: dict) -> str:
    """Per twin and schedule: mean over features of steered - unsteered, 95% t-intervals over features."""
    lines = ["| model | schedule | strength | Δ feature activation | Δ concept rate, output | Δ concept rate, logit | "
             "Δ concept rate, input (old) | AR-perplexity ratio | Δ DLM NLL |", "|---|---|---|---|---|---|---|---|---|"]
    for (model, sched, s), e in effect_intervals(res).items():
        lines.append(f"| {model.replace('dlmscope-tiny-', '')} | {sched} | {s:g} | {_ci(e['feature_activation'])} | "
                     + " | ".join(_ci(e[f"concept_rate_{c}"], "+.3f") for c in CONCEPT_NAMES)
                     + f" | {_ci(e['perplexity'], '.2f')} | {_ci(e['dlm_nll'], '+.2f')} |")
    return "\n".join(lines)


def dlm_vs_ar(res: dict) -> list[dict]:
    """Welch t-test over features, DLM effect vs AR effect, per schedule, strength and success metric."""
    from scipy.stats import ttest_ind

    eff, rows = effects(res), []
    for (model, sched, s), e in eff.items():
        if model != MODELS[0][0] or (MODELS[1][0], sched, s) not in eff:
            continue
        a = eff[(MODELS[1][0], sched, s)]
        for k in TESTED:
            test = ttest_ind(e[k], a[k], equal_var=False)
            ci = test.confidence_interval(0.95)
            rows.append({"schedule": sched, "strength": s, "metric": k, "dlm": _mean(e[k]), "ar": _mean(a[k]),
                         "difference": [_mean(e[k]) - _mean(a[k]), float(ci.low), float(ci.high)],
                         "p": float(test.pvalue)})
    for r, p in zip(rows, holm([r["p"] for r in rows])):  # over all the tests of the table
        r["p_holm"] = p
    return rows


def readme_test_table(res: dict) -> str:
    """DLM effect minus AR effect with its Welch 95% interval and p-value."""
    def p(v: float) -> str:
        return "<0.001" if v < 0.001 else format(v, ".3f")

    lines = ["| schedule | strength | metric | DLM | AR | DLM - AR [95% CI] | p (Welch) | p (Holm) |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['schedule']} | {r['strength']:g} | {r['metric'].replace('_', ' ')} | {r['dlm']:+.4f} | {r['ar']:+.4f} | "
              f"{_ci(r['difference'])} | {p(r['p'])} | {p(r['p_holm'])} |" for r in dlm_vs_ar(res)]
    return "\n".join(lines)


def summary(res: dict, unsteered: dict) -> dict:
    """The numbers the README's prose quotes: effects with intervals (perplexity as a ratio), tests, baselines."""
    eff = {f"{model}/{sched}/{s:g}": e for (model, sched, s), e in effect_intervals(res).items()}
    tests = dlm_vs_ar(res)
    return {"effects": eff, "texts_without_perplexity": unjudged(res),
            "holm_survivors": {k: sum(t["p_holm"] < 0.05 for t in tests if t["metric"] == k) for k in TESTED},
            "tests_per_metric": {k: sum(t["metric"] == k for t in tests) for k in TESTED},
            "holm_survivors_by_strength": {f"{s:g}": {k: sum(t["p_holm"] < 0.05 for t in tests if t["metric"] == k
                                                             and t["strength"] == s) for k in TESTED}
                                           for s in sorted({t["strength"] for t in tests})},
            "tests": tests, "n_tests": len(tests),
            "dla_top50_share": dla_share(res),
            "unsteered": {m: {"perplexity": p, "dlm_nll": n} for m, (p, n) in unsteered.items()}}


def dla_share(res: dict) -> dict:
    """Per twin and concept definition: mean over features of the share of its 20 concept tokens among the top 50
    tokens its decoder direction promotes (direct logit attribution). A definition that reads a model where it
    does not predict shares little with what the feature writes (the logit concept is the DLA's own top 20)."""
    return {m: {c: _mean([v[c] for v in per.values()]) for c in ("output", "input")}
            for m, per in res["dla_overlap"].items()}


def render(res: dict, out: Path) -> str:
    if len(res["unsteered"]) < len(MODELS):
        return "one twin only: merge the partial files with --combine"
    c = res["config"]
    unsteered = {m: (math.exp(_mean([math.log(x) for x in u["perplexity"]])), _mean(u["dlm_nll"]))
                 for m, u in res["unsteered"].items()}
    per_feature = ["| model | feature | output-side top tokens | schedule | Δ feature act. | Δ concept rate, output | "
                   "Δ concept rate, logit |", "|---|---|---|---|---|---|---|"]
    for r in res["runs"]:
        u = res["unsteered"][r["model"]]["per_feature"][str(r["feature"])]
        tokens = " ".join(res["features"][r["model"]][str(r["feature"])]["output"][:4]).replace("|", "/")
        per_feature.append(f"| {r['model'].replace('dlmscope-tiny-', '')} | {r['feature']} | {tokens} | "
                           f"{r['schedule']} s={r['strength']:g} | "
                           f"{_mean(r['feature_activation']) - _mean(u['feature_activation']):+.4f} | "
                           + " | ".join(f"{_mean(r[k]) - _mean(u[k]):+.3f}" for k in TESTED[1:]) + " |")
    share = "; ".join(f"{m.replace('dlmscope-tiny-', '')} " + ", ".join(f"{c} {v:.3f}" for c, v in per.items())
                      for m, per in dla_share(res).items())
    md = (f"{len(c['prompts'])} prompts x {c['seeds']} seeds, 32 new tokens ({c['steps']} steps, one block), temperature "
          f"{c['temperature']}; {c['features']} features per twin (rule in the script's docstring), shipped layer-3 SAEs "
          f"(k=32); schedules {res['schedules']}. Unsteered AR-twin perplexity / DLM NLL per token: "
          + ", ".join(f"{m.replace('dlmscope-tiny-', '')} {p:.1f} / {n:.2f}" for m, (p, n) in unsteered.items())
          + ".\n\nShare of each concept definition's 20 tokens among the decoder direction's top-50 logit tokens (mean "
            f"over features): {share}"
          + ".\n\nMean over features of steered - unsteered (95% intervals over features; perplexity as a ratio):\n\n"
          + readme_table(res) + "\n\nDLM vs AR (Welch t-test over features, Holm over the table):\n\n"
          + readme_test_table(res)
          + "\n\nPer feature:\n\n" + "\n".join(per_feature) + "\n")
    atomic_write_text(out / "steering_dlm_vs_ar.md", md)
    atomic_write_json(out / "steering_dlm_vs_ar_summary.json", summary(res, unsteered))
    return md


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--strengths", default="4")
    p.add_argument("--partial", type=float, default=0.25, help="fraction of steps of the first / late schedules")
    p.add_argument("--features", type=int, default=20)
    p.add_argument("--seeds", type=int, default=1, help="sampling seeds (the committed run: 1; the earlier v1: 3)")
    p.add_argument("--first-seed", type=int, default=0,
                   help="first sampling seed (a run of further seeds is appended to the first with --combine --join)")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--n-draws", type=int, default=2, help="mask draws of the DLM's NLL bound per text")
    p.add_argument("--temperature", type=float, default=0.5)
    p.add_argument("--twin", choices=[m for m, _ in MODELS], help="run one twin only (parallel processes)")
    p.add_argument("--combine", action="store_true", help="merge the two twins' partial files")
    p.add_argument("--merge", type=Path, nargs="*", default=[],
                   help="with --combine: folders of runs at other strengths (same features, seeds and prompts)")
    p.add_argument("--join", type=Path, nargs="*", default=[],
                   help="with --combine: combined result files of runs of the next seeds (--first-seed) to append")
    run_or_render(p, "steering_dlm_vs_ar", run, render)


if __name__ == "__main__":
    main()
