"""What AuxK buys at these budgets: held-out FVU and step cost with the default dead window and a longer one.

A latent is dead, and AuxK trains it, once it has not fired for `dead_tokens` tokens (default total_tokens // 5
here). signum_sf ends with more dead latents than adam, and AuxK over them is what makes its step dearer over a
whole run (`bench_sae_steps.py`). This trains both optimisers with the default window and with total_tokens // 2
(so AuxK runs far less), on the grid's data (`bench_sae_grid.py`: the DLM's layer-3 activations, d_in 256, 4,096
latents, k 32, the last 16,384 vectors held out), at batch 1,024 and 4,096, 299,008 and 999,424 tokens, seeds 0-2;
each run records the held-out FVU (schedule-free average for signum_sf) and the trainer's dead fraction per step.
Reported per cell, paired by seed: FVU(long window) - FVU(default), with Student-t 95% intervals over seeds. Each
row also keeps its CPU time, but the runs are sequential (the default window first), so those are no paired
timing: what AuxK costs a step is `bench_sae_steps.py --aux-coef 0`'s to measure, side by side.

    python benchmarks/bench_sae_dead_window.py [--seeds 0,1,2] [--batches 1024,4096] [--tokens 299008,999424]

Writes benchmarks/results/sae_dead_window.json after every run; a rerun trains only the runs missing.
"""

from __future__ import annotations

import functools
import statistics
import time

import torch

WINDOWS = {"default": 5, "half run": 2}
"""Window name -> the divisor of total_tokens."""
OPTIMISERS = ("adam", "signum_sf")
LATENTS, K = 4096, 32


def train(grid, x: torch.Tensor, optimiser: str, batch: int, tokens: int, window: str, seed: int) -> dict:
    train_x, held = x[:-grid.HELDOUT], x[-grid.HELDOUT:]
    steps = tokens // batch
    r = grid.Ours(optimiser, x.shape[1], LATENTS, K, steps * batch, batch, seed, steps * batch // WINDOWS[window])
    dead, cpu = [], 0.0
    for i in range(steps):
        t = time.process_time()
        logs = r.tr.step(train_x[i * batch:(i + 1) * batch])
        cpu += time.process_time() - t
        dead.append(logs["dead_fraction"])
    return {"optimiser": optimiser, "batch": batch, "tokens": steps * batch, "window": window, "seed": seed,
            "dead_tokens": r.tr.dead_tokens, "fvu": grid.fvu(held, r.reconstruct(held)), "cpu_s": cpu,
            "dead_median": statistics.median(dead), "dead_mean": statistics.fmean(dead), "dead_last": dead[-1]}


def summarise(grid, rows: dict) -> list[dict]:
    cells = sorted({(r["optimiser"], r["batch"], r["tokens"]) for r in rows.values()})
    out = []
    for opt, batch, tokens in cells:
        per = {w: {r["seed"]: r for r in rows.values() if (r["optimiser"], r["batch"], r["tokens"], r["window"])
                   == (opt, batch, tokens, w)} for w in WINDOWS}
        seeds = sorted(set(per["default"]) & set(per["half run"]))
        if not seeds:
            continue
        cell = {"optimiser": opt, "batch": batch, "tokens": tokens, "seeds": seeds}
        for w in WINDOWS:
            cell[w] = {k: grid.t_mean([per[w][s][k] for s in seeds]) for k in ("fvu", "dead_mean")}
        cell["fvu_difference"] = grid.t_mean([per["half run"][s]["fvu"] - per["default"][s]["fvu"] for s in seeds])
        out.append(cell)
    return out


def readme_table(result: dict) -> str:
    """The README's table: per cell, the two windows' FVU and mean dead fraction, and the paired differences."""
    lines = ["| optimiser | batch | tokens | seeds | held-out FVU: default / half-run window | paired difference | "
             "dead by its own window, mean over steps: default / half-run |", "|---|---|---|---|---|---|---|"]
    for c in result["summary"]:
        diff = c["fvu_difference"]
        lines.append(f"| {c['optimiser']} | {c['batch']:,} | {c['tokens']:,} | {len(c['seeds'])} | "
                     f"{c['default']['fvu'][0]:.4f} / {c['half run']['fvu'][0]:.4f} | "
                     f"{diff[0]:+.5f} [{diff[1]:+.5f}, {diff[2]:+.5f}] | "
                     f"{c['default']['dead_mean'][0]:.3f} / {c['half run']['dead_mean'][0]:.3f} |")
    return "\n".join(lines)


def main() -> None:
    import bench_sae_grid as grid  # a sibling script: its folder is on sys.path when this one runs

    args, x, results = grid.open_study(__doc__, "sae_dead_window.json", functools.partial(summarise, grid),
                                       tokens="299008,999424")
    results.fill(((f"{opt}/{batch}/{tokens // batch * batch}/{window}/{seed}",
                   functools.partial(train, grid, x, opt, batch, tokens, window, seed))
                  for tokens in grid.ints(args.tokens) for batch in grid.ints(args.batches)
                  for seed in grid.ints(args.seeds) for opt in OPTIMISERS for window in WINDOWS),
                 lambda r: f"FVU {r['fvu']:.4f}, dead {r['dead_mean']:.3f}, {r['cpu_s']:.1f} s")
    print(readme_table({"summary": summarise(grid, results.rows)}))


if __name__ == "__main__":
    main()
