"""Decoding orders and fast decoders compared through SAE features, Sudoku and held-out likelihood.

Rows: each remasking order with its upstream schedule (LLaDA's `linear` for low_confidence and
random, Dream's `dream` for origin, maskgit_plus, topk_margin and entropy), the SAE-informed
`sae_stability` (linear), and Fast-dLLM's parallel decoders (threshold 0.9, prefix cache, threshold
+ dual cache) as extra rows. On dlmscope-tiny-dlm: feature dynamics with the shipped layer-1 and
layer-3 SAEs (8 prompts, 32 tokens); Sudoku 4x4 exact solve (test puzzles, 16 tokens, one block) at
several step budgets; held-out NLL per token with the answer revealed in each order; forward passes.
Every number carries a 95% Student-t interval over prompts / puzzles / rows, and every row its paired
difference to low_confidence at the same budget. Countdown is left out (the tiny DLM solves <= 2%).
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


def paired(a, b) -> list[float]:
    return interval([x - y for x, y in zip(a, b)])


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
    out: dict = {"config": {k: res["config"][k] for k in ("n", "ll_rows")} | {"threshold": THRESHOLD},
                 "hooks": list(base["dynamics"]), "rows": {}}
    for name, r in rows.items():
        own = name == BASE
        dyn = {h: {m: {"value": interval(v), "vs_low_confidence": None if own else paired(v, base["dynamics"][h][m])}
                   for m, v in per.items()} for h, per in r["dynamics"].items()}
        entry = {"dynamics": dyn, "dynamics_forwards": r["dynamics_forwards"]}
        for key, metric in (("sudoku", "correct"), ("heldout", "nll")):
            last = list(base[key])[-1]
            entry[key] = {b: {"value": interval(cell[metric]), "forwards": interval(cell["forwards"]),
                              "vs_low_confidence": None if own else
                              paired(cell[metric], base[key][last if b == "parallel" else b][metric])}
                          for b, cell in r[key].items()}
        out["rows"][name] = entry
    return out


def _fmt(ci: list[float], digits: int = 3) -> str:
    return f"{ci[0]:.{digits}f} [{ci[1]:.{digits}f}, {ci[2]:.{digits}f}]"


def _diff(ci: list[float] | None, digits: int = 3) -> str:
    if ci is None:
        return ""
    real = ci[1] > 0 or ci[2] < 0
    text = f"{ci[0]:+.{digits}f} [{ci[1]:+.{digits}f}, {ci[2]:+.{digits}f}]"
    return f"**{text}**" if real else text


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
    return ("dlmscope-tiny-dlm; Jaccard of the k=32 feature sets of the shipped SAEs; bold = the 95% interval of the "
            f"difference excludes 0. Threshold rows (Fast-dLLM, {c['threshold']}) take as many steps as they need; "
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
