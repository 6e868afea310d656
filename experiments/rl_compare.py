"""RSPO vs SPG vs diffu-GRPO vs no RL on Sudoku 4x4 decoded in 2 steps, several seeds, same prompts and budget.

Starting point: the built-in tiny DLM on 10-12-empty-cell puzzles decoded with 2 denoising steps (8 of
the 16 cells committed per step). At 16 steps the model solves 91% greedily (too close to the ceiling for
RL to show anything); committing 8 cells at once forces it to fill them consistently in parallel, which
it does for about a third of the puzzles. That leaves room both ways, and the reward (cell accuracy) is
informative. Every method gets the same seeds, train prompts per step, completions, optimiser steps,
sampler (2 steps, temperature 1 rollouts) and the same test puzzles (greedy, 2 steps).

Intervals: a method's exact-solve is the mean over seeds with a two-level bootstrap 95% interval (seeds and
the test puzzles' solution grids resampled: the 200 test puzzles come from 57 grids, and puzzles of one grid
are not independent); "vs no RL" is the paired difference on the same puzzles, resampled the same way.
The defaults reproduce the committed run (`python experiments/rl_compare.py`).

Writes experiments/results/rl_compare.{json,md,html}; checkpoints in runs/rl-compare/<algo>-s<seed>/
(an interrupted study resumes its runs).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _study import run_or_render  # noqa: E402
from dlmscope.io_utils import atomic_write_json, atomic_write_text  # noqa: E402

ALGOS = ("rspo", "spg", "diffu-grpo")


def run(args) -> dict:
    from dlmscope.rl import RLConfig, train_rl
    from dlmscope.runstate import has_state

    base = RLConfig(rl_steps=args.steps, prompts_per_step=args.prompts, group_size=6, lr=args.lr, denoise_steps=2,
                    eval_n=args.eval_n, eval_every=max(1, args.steps // 4), checkpoint_every=args.steps)
    per_algo = {"rspo": {}, "spg": {"spg_beta": 1.0, "spg_block_length": 8}, "diffu-grpo": {}}
    logs = {}
    start = starting_point(base)
    for seed in range(args.seeds):
        for algo in ALGOS:
            out = args.runs / f"{algo}-s{seed}"
            cfg = replace(base, algo=algo, seed=seed, out=str(out), resume=has_state(out, "trainer_state"),
                          **per_algo[algo])
            logs[f"{algo}-s{seed}"] = train_rl(cfg)
    return {"settings": {"steps": args.steps, "prompts": args.prompts, "seeds": args.seeds, "lr": args.lr,
                         "eval_n": args.eval_n, "runs": str(args.runs)}, "starting_point": start, "logs": logs}


def starting_point(cfg) -> dict:
    """Greedy exact solve of the starting model on the test puzzles by number of decoding steps (why 2 steps)."""
    from dlmscope.models import load_model
    from dlmscope.rl.rollout import evaluate
    from dlmscope.rl.trainer import make_task

    lm, task = load_model(cfg.model), make_task(cfg)
    ex = task.examples("test", cfg.eval_n, seed=0)
    return {str(n): evaluate(lm, task, ex, gen_length=cfg.gen_length, steps=n)["accuracy"] for n in (16, 8, 4, 2)}


def test_grids(cfg: dict) -> list[str]:
    """The solution grid of each test puzzle, in evaluation order (the trainer's `examples("test", eval_n, seed=0)`)."""
    from dlmscope.tasks import get_task

    task = get_task("sudoku", min_empty=cfg["min_empty"], max_empty=cfg["max_empty"])
    return [e.meta["solution"] for e in task.examples("test", cfg["eval_n"], seed=0)]


def _bootstrap(rows, grids, base=None) -> tuple[float, float, float]:
    """Mean over seeds of per-puzzle correctness (minus `base`), 95% interval resampling seeds and grids."""
    import numpy as np

    from dlmscope.stats import cluster_bootstrap

    x = np.asarray(rows, dtype=float) - (0.0 if base is None else np.asarray(base, dtype=float))
    return tuple(cluster_bootstrap(x, grids))


def render(res: dict, out: Path) -> str:
    import numpy as np

    logs, st = res["logs"], res["settings"]
    base = next(iter(logs.values()))["before"]["correct"]
    assert all(log["before"]["correct"] == base for log in logs.values())  # greedy: one no-RL model
    seeds = range(st["seeds"])
    grids = test_grids(logs["rspo-s0"]["config"])
    lines = ["| method | exact solve (mean of seeds) | 95% interval | vs no RL | 95% interval | cell accuracy | "
             "s/step sampling | s/step update |", "|---|---|---|---|---|---|---|---|"]
    m, lo, hi = _bootstrap([base], grids)
    lines.append(f"| no RL | {m:.3f} | [{lo:.3f}, {hi:.3f}] | - | - | {logs['rspo-s0']['before']['reward']:.3f} | - | - |")
    summary = {"no RL": {"exact": m, "ci": [lo, hi], "cell_accuracy": logs["rspo-s0"]["before"]["reward"]},
               "test_grids": len(set(grids))}
    for algo in ALGOS:
        runs = [logs[f"{algo}-s{s}"] for s in seeds]
        rows = [r["after"]["correct"] for r in runs]
        m, lo, hi = _bootstrap(rows, grids)
        d, dlo, dhi = _bootstrap(rows, grids, [base] * len(rows))
        steps = [s for r in runs for s in r["steps"]]
        sample, update = (float(np.mean([s[k] for s in steps])) for k in ("sample_s", "update_s"))
        sig = dlo > 0 or dhi < 0
        name = f"**{algo}**" if sig and d > 0 else algo
        lines.append(f"| {name} | {m:.3f} | [{lo:.3f}, {hi:.3f}] | {d:+.3f} | [{dlo:+.3f}, {dhi:+.3f}] | "
                     f"{np.mean([r['after']['reward'] for r in runs]):.3f} | {sample:.2f} | {update:.2f} |")
        summary[algo] = {"exact": m, "ci": [lo, hi], "vs_no_rl": d, "vs_ci": [dlo, dhi], "significant": sig,
                         "per_seed": [r["after"]["accuracy"] for r in runs], "sample_s": sample, "update_s": update,
                         "cell_accuracy": float(np.mean([r["after"]["reward"] for r in runs]))}
    c = logs["rspo-s0"]["config"]
    md = (f"Sudoku 4x4 ({c['min_empty']}-{c['max_empty']} empty cells), tiny DLM, {c['denoise_steps']}-step decoding; "
          f"{st['seeds']} seeds x {c.get('rl_steps', c.get('steps'))} steps x {c['prompts_per_step']} prompts x {c['group_size']} completions, "
          f"lr {c['lr']}, 1 optimiser step per rollout, rollouts at temperature {c['temperature']}; "
          f"{c['eval_n']} test puzzles from {len(set(grids))} solution grids, greedy; intervals resample seeds and "
          "grids. Bold: interval vs no RL excludes 0.\n\n"
          "Starting point, greedy exact solve by decoding steps: "
          + ", ".join(f"{k}: {v:.3f}" for k, v in res["starting_point"].items()) + "\n\n" + "\n".join(lines) + "\n")
    atomic_write_text(out / "rl_compare.md", md)
    atomic_write_json(out / "rl_compare_summary.json", summary)
    _figure(logs, st, out)
    return md


NAMES = {"rspo": "RSPO", "spg": "SPG", "diffu-grpo": "diffu-GRPO"}


def readme_table(summary: dict, res: dict) -> str:
    """The README's table, from the summary `render` writes (and the run's seed count)."""
    lines = [f"| method | exact solve (mean of {res['settings']['seeds']} seeds) | 95% interval | vs no RL | "
             "95% interval | cell accuracy | s/step sampling | s/step update |", "|---|---|---|---|---|---|---|---|"]
    s = summary["no RL"]
    lines.append(f"| no RL | {s['exact']:.3f} | [{s['ci'][0]:.3f}, {s['ci'][1]:.3f}] | - | - | {s['cell_accuracy']:.3f} | "
                 "- | - |")
    for algo in ALGOS:
        s = summary[algo]
        name = f"**{NAMES[algo]}**" if s["significant"] and s["vs_no_rl"] > 0 else NAMES[algo]
        lines.append(f"| {name} | {s['exact']:.3f} | [{s['ci'][0]:.3f}, {s['ci'][1]:.3f}] | {s['vs_no_rl']:+.3f} | "
                     f"[{s['vs_ci'][0]:+.3f}, {s['vs_ci'][1]:+.3f}] | {s['cell_accuracy']:.3f} | {s['sample_s']:.2f} | "
                     f"{s['update_s']:.2f} |")
    return "\n".join(lines)


def _figure(logs: dict, st: dict, out: Path) -> None:
    """Rollout reward and test exact-solve per step: mean over seeds with a 95% t band."""
    import numpy as np
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots
    from scipy import stats

    fig = make_subplots(rows=1, cols=2, subplot_titles=("rollout reward (cell accuracy)", "test exact solve (greedy)"))
    colours = {"rspo": "31,119,180", "spg": "44,160,44", "diffu-grpo": "214,39,40"}
    t = stats.t.ppf(0.975, st["seeds"] - 1)
    for algo in ALGOS:
        runs = [logs[f"{algo}-s{s}"] for s in range(st["seeds"])]
        for col, (xs, ys) in enumerate([([s["step"] for s in runs[0]["steps"]], [[s["reward"] for s in r["steps"]] for r in runs]),
                                        ([e["step"] for e in runs[0]["eval"]], [[e["accuracy"] for e in r["eval"]] for r in runs])], 1):
            y = np.asarray(ys)
            mean, half = y.mean(0), t * y.std(0, ddof=1) / np.sqrt(len(y))
            fig.add_trace(go.Scatter(x=xs + xs[::-1], y=list(mean + half) + list((mean - half)[::-1]), fill="toself",
                                     fillcolor=f"rgba({colours[algo]},0.2)", line={"width": 0}, showlegend=False,
                                     hoverinfo="skip"), row=1, col=col)
            fig.add_trace(go.Scatter(x=xs, y=mean, name=algo, line={"color": f"rgb({colours[algo]})"},
                                     showlegend=col == 1), row=1, col=col)
    fig.update_xaxes(title_text="rollout step")
    fig.update_layout(title=f"RL on Sudoku 4x4, 2-step decoding: mean of {st['seeds']} seeds, 95% band")
    atomic_write_text(out / "rl_compare.html", fig.to_html(include_plotlyjs="cdn"))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--prompts", type=int, default=4, help="prompts per step (6 completions each)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--eval-n", type=int, default=200)
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "rl-compare", help="checkpoint folders go here")
    run_or_render(p, "rl_compare", run, render)
