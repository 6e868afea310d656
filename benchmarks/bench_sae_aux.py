"""Which of the CPU route's two AuxK routes is cheaper, by how many dead latents there are and how many of their
(token, latent) activations are positive: the numbers behind `dlmscope.sae.model.AUX_DENSE_CELL_COST` and
`AUX_RAGGED_TOKEN_COST`, and a check of the rule they make (`_dense_aux`).

Ragged: AuxK's positive entries only, as sparse products over the dead columns (cost per positive entry, and a
little per token). Dense: (N, n_dead) matmuls over the dead columns (a dense block; cost per cell, positive or
not).
One SAE of the usual CPU shape (d_in 256, 4,096 latents, k 32) on a batch of the built-in DLM's layer-3
activations (the cache of `bench_sae_train.py`); for each number of dead latents the dead latents' encoder biases
are shifted until the wanted share of their activations is positive. Each cell times the forward and backward of
the training loss (MSE + AuxK) with each route forced, alternately, and reports the medians and the ratio
ragged / dense (above 1: dense is cheaper), and which route the rule picks; beside them, the same loss without AuxK
and the dense block's four products alone, so each cell also says what AuxK adds to the step and how much of that
no implementation of the dense block can shed. Clock: this process's CPU time, one thread.

    python benchmarks/bench_sae_aux.py [--batch 4096]

Writes benchmarks/results/sae_aux.json (or --out).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
N_DEAD = (16, 64, 128, 256, 512)
DENSITIES = (0.005, 0.02, 0.04, 0.08, 0.2)


def time_routes(sae, x: torch.Tensor, dead: torch.Tensor, k_aux: int, repeats: int) -> dict:
    """Median CPU ms of the training loss's forward + backward with each AuxK route forced and without AuxK ("none":
    the MSE alone), and of AuxK's four dense products alone ("products": the decode of the (N, n_dead) block, its two
    gradients and the encoder's, each N x n_dead x d_in) on this cell's operands: the work the dense block cannot
    shed, whatever else AuxK does. The four are timed in turn, the order rotating every round."""
    from dlmscope.sae import model
    from dlmscope.sae.train import aux_loss, sum_of_squares

    n_dead, ids = int(dead.sum()), dead.nonzero().squeeze(1)
    with torch.no_grad():
        xc = x * sae.input_scale - sae.b_dec
        acts, rows = sae.pre_acts(x).index_select(1, ids).relu_(), sae.W_dec.index_select(0, ids)
        grad = torch.randn_like(xc)

    def loss_step(route: str) -> None:
        model._dense_aux = lambda *shape: route == "dense"
        sae.zero_grad(set_to_none=True)
        out = sae(x, None if route == "none" else dead, k_aux)
        miss = out.recon - out.x  # the trainer's losses (`SAETrainer.step`)
        loss = sum_of_squares(miss) / x.shape[0]
        if route != "none":
            loss = loss + aux_loss(miss, out.aux_recon, n_dead, k_aux, None) / 32
        loss.backward()

    def products() -> None:
        acts @ rows, grad @ rows.t(), acts.t() @ grad, acts.t() @ xc

    jobs = {"ragged": lambda: loss_step("ragged"), "dense": lambda: loss_step("dense"),
            "none": lambda: loss_step("none"), "products": products}
    kept = model._dense_aux
    times: dict[str, list[float]] = {name: [] for name in jobs}
    try:
        for i in range(repeats + 1):
            names = list(jobs)[i % len(jobs):] + list(jobs)[:i % len(jobs)]
            for name in names:
                t = time.process_time()
                jobs[name]()
                if i:  # the first round warms up
                    times[name].append(time.process_time() - t)
    finally:
        model._dense_aux = kept
    return {name: statistics.median(v) * 1e3 for name, v in times.items()}


@torch.no_grad()
def plant_density(sae, x: torch.Tensor, dead_ids: torch.Tensor, density: float) -> float:
    """Shift the dead latents' encoder biases so that `density` of their activations on `x` are positive; returns
    the share reached."""
    pre = sae.pre_acts(x)[:, dead_ids]
    shift = -torch.quantile(pre.flatten()[:1_000_000], 1 - density)
    sae.b_enc[dead_ids] += shift
    return float((pre + shift > 0).float().mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sae_aux.json"))
    args = p.parse_args()
    from dlmscope.io_utils import atomic_write_json
    from dlmscope.sae import SAE, SAEConfig, model

    torch.set_num_threads(1)
    import bench_sae_train as bst  # a sibling script: its folder is on sys.path when this one runs

    x = bst.cached_activations("dlm", args.batch, "cpu")[:args.batch]
    cells = []
    for n_dead in N_DEAD:
        for density in DENSITIES:
            sae = SAE(SAEConfig(x.shape[1], 4096, 32), seed=0)
            with torch.no_grad():
                sae.input_scale.fill_(float(x.pow(2).sum(1).mean().rsqrt()))
            dead = torch.zeros(4096, dtype=torch.bool)
            dead[torch.randperm(4096, generator=torch.Generator().manual_seed(n_dead))[:n_dead]] = True
            reached = plant_density(sae, x, dead.nonzero().squeeze(1), density)
            ms = time_routes(sae, x, dead, k_aux=x.shape[1] // 2, repeats=args.repeats)
            rule = "dense" if model._dense_aux(args.batch, n_dead, round(reached * args.batch * n_dead)) else "ragged"
            best = min(ms["ragged"], ms["dense"])
            cells.append({"n_dead": n_dead, "density": reached, **{f"{r}_ms": v for r, v in ms.items()},
                          "ragged_over_dense": ms["ragged"] / ms["dense"], "rule_picks": rule,
                          "rule_over_best": ms[rule] / best, "best_over_none": best / ms["none"],
                          "products_over_none": ms["products"] / ms["none"]})
            print(f"dead {n_dead:4d}, positive {reached:.3f}: ragged {ms['ragged']:.1f} ms, dense {ms['dense']:.1f} ms,"
                  f" ragged/dense {ms['ragged'] / ms['dense']:.2f}; the rule picks {rule}; the cheaper route"
                  f" {best / ms['none']:.3f}x the step without AuxK ({ms['none']:.1f} ms), the dense products alone"
                  f" {ms['products']:.1f} ms", flush=True)
    worst = max(c["rule_over_best"] for c in cells)
    print(f"the rule's pick costs at most {worst:.3f}x the cheaper route's step")
    atomic_write_json(args.out, {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                                 "torch_threads": 1, "clock": "process CPU time", "source": "dlm layer 3",
                                 "d_in": x.shape[1], "latents": 4096, "k": 32, "batch": args.batch,
                                 "dense_cell_cost": model.AUX_DENSE_CELL_COST,
                                 "ragged_token_cost": model.AUX_RAGGED_TOKEN_COST,
                                 "rule_worst_over_best": worst, "cells": cells})


if __name__ == "__main__":
    main()
