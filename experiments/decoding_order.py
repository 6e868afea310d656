"""Decoding orders and fast decoders compared through SAE features, Sudoku and held-out likelihood.

Rows: each remasking order with its upstream schedule (LLaDA's `linear` for low_confidence and
random, Dream's `dream` for origin, maskgit_plus, topk_margin and entropy), the SAE-informed
`sae_stability` (linear), and Fast-dLLM's parallel decoders (threshold 0.9, prefix cache, threshold
+ dual cache) as extra rows. On dlmscope-tiny-dlm: feature dynamics with the shipped layer-1 and
layer-3 SAEs (8 prompts, 32 tokens); Sudoku 4x4 exact solve (test puzzles, 16 tokens, one block) at
several step budgets; held-out NLL per token with the answer revealed in each order; forward passes.
Continuous numbers carry a 95% Student-t interval over prompts / rows and every row its paired difference to
low_confidence at the same budget (paired t-test); exact solve, a 0/1 outcome per puzzle, carries a Wilson
interval, its paired difference Newcombe's interval and an exact McNemar test. The ~70 comparisons of the
tables are one family: bold marks Holm-adjusted p < 0.05. Countdown is left out (the tiny DLM solves <= 2%).
Writes experiments/results/decoding_order.{json,md,html} and decoding_order_summary.json (every number the
tables print, which the README's table is rendered from).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _study import run_or_render  # noqa: E402
from dlmscope.io_utils import atomic_write_json, atomic_write_text  # noqa: E402
from dlmscope.stats import holm  # noqa: E402

THRESHOLD = 0.9
ROWS = {  # name: (strategy, sampler options)
    "origin": ("origin", {"schedule": "dream"}),
    "random": ("random", {"schedule": "linear"}),
    "low_confidence": ("low_confidence", {"schedule": "linear"}),
    "maskgit_plus": ("maskgit_plus", {"schedule": "dream"}),
    "topk_margin": ("topk_margin", {"schedule": "dream"}),
    "entropy": ("entropy", {"schedule": "dream"}),
    "sae_stability": ("sae_stability", {"schedule": "linear"}),
    "low_confidence + threshold 0.9": ("low_confidence", {"threshold": THRESHOLD}),
    "low_confidence + prefix cache": ("low_confidence", {"schedule": "linear", "cache": "prefix"}),
    "low_confidence + threshold 0.9 + dual cache": ("low_confidence", {"threshold": THRESHOLD, "cache": "dual"}),
    "sae_stability + threshold 0.9": ("sae_stability", {"threshold": THRESHOLD}),
}
BASE = "low_confidence"
PROMPTS = ["The list type", "A dictionary is", "The import statement", "Exceptions are", "A function",
           "The module", "Sudoku: 3204402310402400\nSolution: ", "Countdown: 7 10 9 -> 61\nEquation: "]


def interval(values) -> list[float]:
    """[mean, low, high]: Student-t 95% interval, NaNs dropped."""
    from dlmscope.stats import t_interval

    v = [float(x) for x in values if x == x]
    return t_interval(v) if v else [float("nan")] * 3


def paired(a, b) -> dict:
    """Paired difference a - b: t-interval and one-sample t-test p-value over items."""
    from scipy.stats import ttest_1samp

    d = [x - y for x, y in zip(a, b) if x == x and y == y]
    return {"diff": interval(d), "p": float(ttest_1samp(d, 0.0).pvalue) if any(d) else 1.0, "test": "paired t"}


def paired_binary(a, b, grids) -> dict:
    """Paired 0/1 outcomes a - b: Newcombe's interval and the exact McNemar test (puzzles as independent), and a
    bootstrap interval that resamples solution grids (puzzles of one grid are not independent)."""
    from dlmscope.stats import cluster_bootstrap, mcnemar_exact, newcombe_paired

    m = mcnemar_exact(a, b)
    return {"diff": newcombe_paired(a, b), "p": m["p"], "test": "exact McNemar", "gained": m["a_only"],
            "lost": m["b_only"], "diff_by_grid": cluster_bootstrap([x - y for x, y in zip(a, b)], grids)}


def sudoku_grids(n: int) -> list[str]:
    """The solution grid of each test puzzle `task_accuracy` draws (`examples("test", n, seed=0)`)."""
    from dlmscope.tasks import get_task

    return [e.meta["solution"] for e in get_task("sudoku").examples("test", n, seed=0)]


def proportion(values) -> list[float]:
    from dlmscope.stats import wilson

    return wilson(int(sum(values)), len(values))


def run(args) -> dict:
    from dlmscope.analysis.order import feature_dynamics, make_strategy, order_log_likelihood, task_accuracy
    from dlmscope.data import heldout_rows
    from dlmscope.models import load_model
    from dlmscope.sae import load_sae

    lm = load_model("dlmscope-tiny-dlm", device=args.device)
    saes = [load_sae(n, device=args.device) for n in ("tiny-dlm-L1-k32", "tiny-dlm-L3-k32")]
    guide = saes[1]
    budgets = [int(b) for b in args.budgets.split(",")]
    ll_budgets = [int(b) for b in args.ll_budgets.split(",")]
    rows = heldout_rows(lm.tokenizer, 64, args.ll_rows)
    res: dict = {"config": vars(args) | {"out": str(args.out)}, "rows": {}}
    for name, (strategy, opts) in ROWS.items():
        t0 = time.time()
        parallel = "threshold" in opts  # steps are not a budget then: one run each
        dyn = feature_dynamics(lm, saes, PROMPTS, make_strategy(strategy, guide), gen_length=32, steps=32, **opts)
        sudoku = {}
        for b in budgets[-1:] if parallel else budgets:
            r = task_accuracy(lm, "sudoku", make_strategy(strategy, guide), n=args.n, steps=b, gen_length=16,
                              batch=args.n, **opts)
            sudoku["parallel" if parallel else str(b)] = {"correct": r["correct"], "forwards": r["forwards"]}
        nll = {}
        for b in ll_budgets[-1:] if parallel else ll_budgets:
            v, fw = order_log_likelihood(lm, rows, 32, make_strategy(strategy, guide), b, return_forwards=True,
                                         **opts)
            nll["parallel" if parallel else str(b)] = {"nll": v.tolist(), "forwards": fw.tolist()}
        res["rows"][name] = {"strategy": strategy, "options": opts,
                             "dynamics": {h: m["per_sequence"] for h, m in dyn["layers"].items()},
                             "dynamics_forwards": dyn["forwards"], "sudoku": sudoku, "heldout": nll,
                             "sample": dyn["texts"][:2], "seconds": round(time.time() - t0, 1)}
        print(name, f"{time.time() - t0:.0f}s", flush=True)
    return res


def summary(res: dict) -> dict:
    """Every number the tables print, from the raw per-item results: [mean, low, high] per row, metric and
    budget, with the paired difference to low_confidence (None on its own row)."""
    rows = res["rows"]
    base = rows[BASE]
    grids = sudoku_grids(res["config"]["n"])
    out: dict = {"config": {k: res["config"][k] for k in ("n", "ll_rows")} | {"threshold": THRESHOLD},
                 "hooks": list(base["dynamics"]), "rows": {}}
    for name, r in rows.items():
        own = name == BASE
        dyn = {h: {m: {"value": interval(v), "vs_low_confidence": None if own else paired(v, base["dynamics"][h][m])}
                   for m, v in per.items()} for h, per in r["dynamics"].items()}
        entry = {"dynamics": dyn, "dynamics_forwards": r["dynamics_forwards"]}
        for key, metric, value, diff in (("sudoku", "correct", proportion,
                                           lambda a, b: paired_binary(a, b, grids)),
                                          ("heldout", "nll", interval, paired)):
            last = list(base[key])[-1]
            entry[key] = {b: {"value": value(cell[metric]), "forwards": interval(cell["forwards"]),
                              "vs_low_confidence": None if own else
                              diff(cell[metric], base[key][last if b == "parallel" else b][metric])}
                          for b, cell in r[key].items()}
        out["rows"][name] = entry
    tests = [c["vs_low_confidence"] for r in out["rows"].values() for c in _cells(r) if c["vs_low_confidence"]]
    for t, p in zip(tests, holm([t["p"] for t in tests])):
        t["p_holm"] = p
    out["family"] = {"tests": len(tests), "holm_below_0.05": sum(t["p_holm"] < 0.05 for t in tests)}
    out["config"]["grids"] = len(set(grids))
    return out


def _cells(row: dict) -> list[dict]:
    """Every cell of one row that may carry a comparison, in table order."""
    return [row["dynamics"][h][m] for h in row["dynamics"] for m in row["dynamics"][h]] + \
        [cell for key in ("sudoku", "heldout") for cell in row[key].values()]


def _fmt(ci: list[float], digits: int = 3) -> str:
    return f"{ci[0]:.{digits}f} [{ci[1]:.{digits}f}, {ci[2]:.{digits}f}]"


def _diff(test: dict | None, digits: int = 3) -> str:
    """A paired difference with its interval and Holm-adjusted p; bold when that p < 0.05."""
    if test is None:
        return ""
    ci = test["diff"]
    text = f"{ci[0]:+.{digits}f} [{ci[1]:+.{digits}f}, {ci[2]:+.{digits}f}] (p_Holm {test['p_holm']:.3f})"
    return f"**{text}**" if test["p_holm"] < 0.05 else text


def markdown(s: dict) -> str:
    """The full table of experiments/results/decoding_order.md, from `summary`."""
    rows, hooks, c = s["rows"], s["hooks"], s["config"]
    short = {h: f"L{h.split('.')[1]}" for h in hooks}
    lines = ["### Feature dynamics (8 prompts; mean [95% interval]; difference to low_confidence, paired by prompt)", "",
             "| row | " + " | ".join(f"{short[h]} pre-mask stability | vs low_conf. | {short[h]} post-decode drift | "
                                     "vs low_conf." for h in hooks) + " | forwards (32 tokens) |",
             "|" + "---|" * (1 + 4 * len(hooks) + 1)]
    for name, r in rows.items():
        cells = [x for h in hooks for m in ("pre_mask_stability", "post_decode_drift")
                 for x in (_fmt(r["dynamics"][h][m]["value"]), _diff(r["dynamics"][h][m]["vs_low_confidence"]))]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {r['dynamics_forwards']} |")

    def table(key: str, title: str, digits: int) -> list[str]:
        last = list(rows[BASE][key])[-1]
        out_lines = [f"### {title}", "", "| row | budget | value | vs low_confidence (same budget; threshold rows: "
                     f"vs @{last}) | forwards per item |", "|---|---|---|---|---|"]
        for name, r in rows.items():
            for b, cell in r[key].items():
                out_lines.append(f"| {name} | {'threshold' if b == 'parallel' else b} | {_fmt(cell['value'], digits)} | "
                                 f"{_diff(cell['vs_low_confidence'], digits)} | {_fmt(cell['forwards'], 1)} |")
        return out_lines

    lines += [""] + table("sudoku", f"Sudoku exact solve ({c['n']} test puzzles, 16 tokens, one block, greedy)", 2)
    lines += [""] + table("heldout", f"Held-out NLL, nats/token ({c['ll_rows']} rows, last 32 of 64 tokens "
                                     "revealed in each order, teacher forced)", 3)
    return ("dlmscope-tiny-dlm; Jaccard of the k=32 feature sets of the shipped SAEs; exact solve with Wilson "
            "intervals, its differences with Newcombe's interval and an exact McNemar test, other differences paired "
            f"t; bold = Holm-adjusted p < 0.05 over all {s['family']['tests']} comparisons of these tables. "
            f"Threshold rows (Fast-dLLM, {c['threshold']}) take as many steps as they need; "
            "cache rows keep positions a cached step does not recompute at their last computed features.\n\n"
            + "\n".join(lines) + "\n")


def _count(ci: list[float]) -> str:
    """Forwards per item: the integer when every item took the same number (a step budget), else one decimal."""
    return str(int(ci[0])) if ci[1] == ci[2] == ci[0] == int(ci[0]) else f"{ci[0]:.1f}"


def readme_table(s: dict) -> str:
    """The README's decoding-order table (last SAE layer, first and last budgets), from `summary`."""
    rows, hook = s["rows"], s["hooks"][-1]
    short = f"L{hook.split('.')[1]}"
    first, last = list(rows[BASE]["sudoku"])[0], list(rows[BASE]["sudoku"])[-1]
    ll_last = list(rows[BASE]["heldout"])[-1]
    lines = [f"| order | {short} pre-mask stability | {short} post-decode drift | Sudoku @{first} | Sudoku @{last} | "
             f"forwards / puzzle @{last} | held-out NLL @{ll_last} |", "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        parallel = "parallel" in r["sudoku"]
        sudoku = r["sudoku"]["parallel" if parallel else last]
        nll = r["heldout"]["parallel" if parallel else ll_last]
        cells = [_fmt(r["dynamics"][hook][m]["value"], 2) for m in ("pre_mask_stability", "post_decode_drift")]
        cells += ["-" if parallel else _fmt(r["sudoku"][first]["value"], 2),
                  _fmt(sudoku["value"], 2) + (" (own steps)" if parallel else ""),
                  _count(sudoku["forwards"]), _fmt(nll["value"], 3)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render(res: dict, out: Path) -> str:
    s = summary(res)
    atomic_write_json(out / "decoding_order_summary.json", s)
    md = markdown(s)
    atomic_write_text(out / "decoding_order.md", md)
    try:
        import plotly.graph_objects as go
    except ImportError:
        return md
    fig = go.Figure()
    for name, r in s["rows"].items():
        pts = [(cell["forwards"][0], cell["value"]) for cell in r["sudoku"].values()]
        fig.add_trace(go.Scatter(x=[p[0] for p in pts], y=[p[1][0] for p in pts], name=name, mode="lines+markers",
                                 error_y=dict(type="data", symmetric=False, array=[p[1][2] - p[1][0] for p in pts],
                                              arrayminus=[p[1][0] - p[1][1] for p in pts])))
    fig.update_layout(title="Sudoku exact solve vs forward passes per puzzle (dlmscope-tiny-dlm)",
                      xaxis_title="forward passes", yaxis_title="exact solve", height=600)
    atomic_write_text(out / "decoding_order.html", fig.to_html(include_plotlyjs="cdn"))
    return md


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=100, help="Sudoku test puzzles")
    # shrunk to fit about 15 CPU-minutes on a shared 2-core machine (the earlier run: budgets 4,8,16 / 4,8,32, 64 rows)
    p.add_argument("--budgets", default="4,16", help="step budgets for Sudoku (16 tokens)")
    p.add_argument("--ll-budgets", default="4,32", help="step budgets for held-out likelihood (32 tokens)")
    p.add_argument("--ll-rows", type=int, default=32)
    run_or_render(p, "decoding_order", run, render)


if __name__ == "__main__":
    main()
