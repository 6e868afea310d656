"""RSPO vs SPG vs diffu-GRPO vs no RL on Sudoku 4x4 decoded in 2 steps, several seeds, same prompts and budget.

Starting point: the built-in tiny DLM on 10-12-empty-cell puzzles decoded with 2 denoising steps (8 of
the 16 cells committed per step). At 16 steps the model solves 92% greedily (too close to the ceiling for
RL to show anything); committing 8 cells at once forces it to fill them consistently in parallel, which
it does for about a third of the puzzles. That leaves room both ways, and the reward (cell accuracy) is
informative. Every method gets the same seeds, train prompts per step, completions, optimiser steps,
sampler (2 steps, temperature 1 rollouts) and the same test puzzles (greedy, 2 steps).

The budget (LoRA rank 8, 8 prompts x 6 completions per step, each method's learning rate) was chosen on the
validation split by `rl_budget_search.py` (experiments/results/rl_budget_search.md): full fine-tunes lost
validation accuracy at every learning rate tried, LoRA did not.

Statistics per metric (exact solve, cell accuracy): mean over seeds with a 95% interval resampling seeds and
the test puzzles' solution grids (the 200 test puzzles come from 57 grids, and puzzles of one grid are not
independent); "vs no RL" is the paired difference on the same puzzles, resampled the same way, tested by
flipping the signs of whole grids (`stats.cluster_sign_flip`), Holm over the 3 methods.
The defaults reproduce the committed run (`python experiments/rl_compare.py`).

Writes experiments/results/rl_compare.{json,md,html} and rl_compare_summary.json; checkpoints in
runs/rl-compare/<algo>-s<seed>/checkpoint-NNNNN/ (merged LLaDA folders; an interrupted study resumes its runs).
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
# each method's own conventions (d1 divides diffu-GRPO's advantages by the group std, SPG and RSPO do not) and
# learning rate, the best on the validation split of those tried (experiments/results/rl_budget_search.md)
PER_ALGO = {"rspo": {"lr": 3e-4}, "spg": {"lr": 3e-4, "spg_beta": 1.0, "spg_block_length": 8},
            "diffu-grpo": {"lr": 3e-4, "normalise_adv": True}}


def base_config(steps: int = 30, prompts: int = 4, lr: float = 3e-5, eval_n: int = 200, lora_r: int = 0):
    """The settings every method shares (the budget search starts from these defaults: the first committed run)."""
    from dlmscope.rl import RLConfig

    return RLConfig(rl_steps=steps, prompts_per_step=prompts, group_size=6, lr=lr, denoise_steps=2, eval_n=eval_n,
                    eval_every=max(1, steps // 4), checkpoint_every=steps, lora_r=lora_r)


def run(args) -> dict:
    from dlmscope.rl import train_rl
    from dlmscope.runstate import has_state

    base = base_config(args.steps, args.prompts, eval_n=args.eval_n, lora_r=args.lora_r)
    logs = {}
    start = starting_point(base)
    for seed in range(args.seeds):
        for algo in ALGOS:
            out = args.runs / f"{algo}-s{seed}"
            own = {**PER_ALGO[algo], **({} if args.lr is None else {"lr": args.lr})}
            cfg = replace(base, algo=algo, seed=seed, out=str(out), resume=has_state(out, "trainer_state"), **own)
            logs[f"{algo}-s{seed}"] = train_rl(cfg)
    return {"settings": {"steps": args.steps, "prompts": args.prompts, "seeds": args.seeds,
                         "lr": {a: logs[f"{a}-s0"]["config"]["lr"] for a in ALGOS}, "lora_r": args.lora_r, "eval_n": args.eval_n, "runs": str(args.runs)},
            "starting_point": start, "logs": logs}


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


METRICS = {"exact": "correct", "cell": "rewards"}  # summary key -> per-puzzle list in an evaluation


def compare(logs: dict, seeds: int, grids: list[str]) -> dict:
    """Per method and metric: mean [95% interval] and the paired difference to no RL [interval], its cluster
    sign-flip p and Holm's adjustment over the 3 methods (one family per metric).

    Intervals resample seeds and solution grids (`cluster_bootstrap`); the test flips the sign of each grid's
    summed difference (per puzzle: mean over seeds minus no RL).
    """
    import numpy as np

    from dlmscope.stats import cluster_bootstrap, cluster_sign_flip, holm

    first = logs[f"{ALGOS[0]}-s0"]["before"]
    assert all(log["before"]["correct"] == first["correct"] for log in logs.values())  # greedy: one no-RL model
    out: dict = {"no RL": {}, "test_grids": len(set(grids)), "test_puzzles": len(grids)}
    for key, field_ in METRICS.items():
        base = np.asarray(first[field_], dtype=float)
        out["no RL"][key] = cluster_bootstrap(base, grids)
        for algo in ALGOS:
            rows = np.asarray([logs[f"{algo}-s{s}"]["after"][field_] for s in range(seeds)], dtype=float)
            m = out.setdefault(algo, {})
            m[key], m[f"{key}_vs_no_rl"] = cluster_bootstrap(rows, grids), cluster_bootstrap(rows - base, grids)
            m[f"{key}_p"] = cluster_sign_flip(rows.mean(0) - base, grids)
            m[f"{key}_per_seed"] = rows.mean(1).tolist()
        for algo, adj in zip(ALGOS, holm([out[a][f"{key}_p"] for a in ALGOS])):
            out[algo][f"{key}_holm"] = adj
    for algo in ALGOS:
        runs = [logs[f"{algo}-s{s}"]["steps"] for s in range(seeds)]
        steps = [s for r in runs for s in r]
        out[algo].update({k: float(np.mean([s[k] for s in steps])) for k in ("sample_s", "update_s")})
        if "log_ratio" in steps[0]:  # drift from the reference (RSPO, diffu-GRPO): zero while it was the policy
            out[algo]["mean_abs_log_ratio"] = float(np.mean([abs(s["log_ratio"]) for s in steps]))
        # rollout reward (train prompts, temperature 1) over the first and last 5 steps, mean of seeds
        out[algo]["rollout_reward_first_last5"] = [float(np.mean([s["reward"] for r in runs for s in part(r)]))
                                                   for part in (lambda r: r[:5], lambda r: r[-5:])]
    return out


def render(res: dict, out: Path) -> str:
    logs, st = res["logs"], res["settings"]
    c = logs["rspo-s0"]["config"]
    grids = test_grids(c)
    summary = {**compare(logs, st["seeds"], grids), "settings": {**st, "group_size": c["group_size"],
               "min_empty": c["min_empty"], "max_empty": c["max_empty"], "denoise_steps": c["denoise_steps"]}}
    lrs = ", ".join(f"{logs[f'{a}-s0']['config']['lr']:g} ({NAMES[a]})" for a in ALGOS)
    md = (f"Sudoku 4x4 ({c['min_empty']}-{c['max_empty']} empty cells), tiny DLM, {c['denoise_steps']}-step decoding; "
          f"{st['seeds']} seeds x {c['rl_steps']} steps x {c['prompts_per_step']} prompts x {c['group_size']} "
          f"completions, LoRA rank {c['lora_r']}, lr {lrs}, 1 optimiser step per rollout, rollouts at temperature "
          f"{c['temperature']}; "
          f"{c['eval_n']} test puzzles from {len(set(grids))} solution grids, greedy. Intervals resample seeds and "
          "grids; p: cluster sign-flip test of the paired difference, Holm over the 3 methods per metric. "
          "Bold: Holm p < 0.05.\n\n"
          "Starting point, greedy exact solve by decoding steps: "
          + ", ".join(f"{k}: {v:.3f}" for k, v in res["starting_point"].items()) + "\n\n"
          + readme_table(summary, res) + "\n")
    atomic_write_text(out / "rl_compare.md", md)
    atomic_write_json(out / "rl_compare_summary.json", summary)
    _figure(logs, st, out)
    return md


NAMES = {"rspo": "RSPO", "spg": "SPG", "diffu-grpo": "diffu-GRPO"}


def _cell(v: list[float], signed: bool = False) -> str:
    f = "{:+.3f}" if signed else "{:.3f}"
    return f"{f.format(v[0])} [{f.format(v[1])}, {f.format(v[2])}]"


def readme_table(summary: dict, res: dict) -> str:
    """The README's table, from the summary `render` writes (and the run's seed count)."""
    lines = [f"| method | exact solve (mean of {res['settings']['seeds']} seeds) | vs no RL | Holm p | cell accuracy | "
             "vs no RL | Holm p | s/step sampling | s/step update |", "|---|---|---|---|---|---|---|---|---|"]
    s = summary["no RL"]
    lines.append(f"| no RL | {_cell(s['exact'])} | - | - | {_cell(s['cell'])} | - | - | - | - |")
    for algo in ALGOS:
        s = summary[algo]
        cols = []
        for key in METRICS:
            bold = s[f"{key}_holm"] < 0.05
            vs = _cell(s[f"{key}_vs_no_rl"], signed=True)
            cols += [_cell(s[key]), f"**{vs}**" if bold else vs, f"{s[f'{key}_holm']:.3f}"]
        lines.append(f"| {NAMES[algo]} | " + " | ".join(cols) + f" | {s['sample_s']:.2f} | {s['update_s']:.2f} |")
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
    p.add_argument("--prompts", type=int, default=8, help="prompts per step (6 completions each)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--lr", type=float, default=None, help="one learning rate for every method (default: each its own)")
    p.add_argument("--lora-r", type=int, default=8, help="LoRA rank (0: every weight trains)")
    p.add_argument("--eval-n", type=int, default=200)
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "rl-compare", help="checkpoint folders go here")
    run_or_render(p, "rl_compare", run, render)
