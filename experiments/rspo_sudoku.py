"""RSPO vs diffu-GRPO vs no RL on Sudoku 4x4 with the built-in tiny DLM (same seeds and step budget).

Writes experiments/results/rspo_sudoku.{json,md,html}. Budget: `--steps` optimiser steps of 4 prompts x 6
completions each (default 30: about 3 minutes per algorithm on a 2-core CPU); checkpoints go to runs/rl-<algo>.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _study import run_or_render  # noqa: E402
from dlmscope.io_utils import atomic_write_text  # noqa: E402


def run(args) -> dict:
    from dlmscope.rl import RLConfig, train_rl

    base = RLConfig(steps=args.steps, eval_n=args.eval_n, checkpoint_every=max(1, args.steps // 2), device=args.device)
    rows, logs = {}, {}
    for algo in ("rspo", "diffu-grpo"):
        log = train_rl(replace(base, algo=algo, out=str(ROOT / "runs" / f"rl-{algo}")))
        logs[algo] = log
        rows["no RL"] = log["before"]
        rows[algo] = log["after"]
    return {"table": rows, "logs": logs}


def render(res: dict, out: Path) -> str:
    rows, logs = res["table"], res["logs"]
    table = ["| method | exact solve | cell accuracy | mean rollout reward (last 5 steps) | s/step sampling | s/step update |",
             "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        if name == "no RL":
            table.append(f"| no RL | {r['accuracy']:.3f} | {r['reward']:.3f} | - | - | - |")
            continue
        steps = logs[name]["steps"]
        last = steps[-5:]
        table.append(f"| {name} | {r['accuracy']:.3f} | {r['reward']:.3f} | {sum(s['reward'] for s in last) / len(last):.3f} "
                     f"| {sum(s['sample_s'] for s in steps) / len(steps):.1f} | {sum(s['update_s'] for s in steps) / len(steps):.1f} |")
    c = next(iter(logs.values()))["config"]
    md = (f"Sudoku 4x4, {c['min_empty']}-{c['max_empty']} empty cells, {c['steps']} steps x {c['prompts_per_step']} prompts "
          f"x {c['group_size']} completions, lr {c['lr']}, temperature {c['temperature']}; test split, greedy, "
          f"{c['eval_n']} puzzles.\n\n" + "\n".join(table) + "\n")
    atomic_write_text(out / "rspo_sudoku.md", md)
    import plotly.graph_objects as go

    fig = go.Figure()
    for algo, log in logs.items():
        fig.add_trace(go.Scatter(x=[s["step"] for s in log["steps"]], y=[s["reward"] for s in log["steps"]], name=algo))
    fig.update_layout(title="rollout reward on Sudoku 4x4", xaxis_title="step", yaxis_title="mean reward")
    atomic_write_text(out / "rspo_sudoku.html", fig.to_html(include_plotlyjs="cdn"))
    return md


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--eval-n", type=int, default=100)
    run_or_render(p, "rspo_sudoku", run, render)


if __name__ == "__main__":
    main()
