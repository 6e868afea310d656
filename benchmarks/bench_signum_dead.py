"""Fewer dead latents under signum_sf, at what cost in held-out FVU: probes of the optimiser's dynamics.

signum_sf ends a run with more dead latents than adam, and AuxK over them is the whole of its extra step cost
(`bench_sae_steps.py --aux-coef 0`). Each probe changes one thing that should leave fewer dead latents or cheaper
AuxK, on the grid's data (`bench_sae_grid.py`: the DLM's layer-3 activations, d_in 256, 4,096 latents, k 32, the last
16,384 vectors held out), 299,008 tokens at batch 1,024 and 4,096, seeds 0-2:

- `rare steps / 4`: each latent's sign step (its W_enc column, b_enc entry and W_dec row) scaled by
  min(1, its fires in the batch / 4), so a latent that fires on one token moves a quarter step; dead latents (moved
  by AuxK only) keep the full step; `rare steps / 16` the same with 16, the far end of that trade;
- `dead steps x3`: dead latents' sign steps tripled, so AuxK revives them faster;
- `lr x0.7`: every sign step 0.7 times the default's (signum_sf's lr was set for FVU; fewer latents die at less);
- `AuxK on a quarter`: AuxK's loss over the first quarter of each batch's tokens only, at 4x the coefficient so
  that each of those tokens weighs what it did (a quarter of AuxK's entries on its ragged route).

The probes act on the trainer from outside (a correction after each optimiser step, which leaves the sign of each
gradient in `.grad`, and AuxK's activations cut to the quarter), so the default trainer is what runs. Reported per
cell, paired by seed against the default: held-out FVU, the trainer's dead fraction (mean over steps) and the share
of latents that never fire on the held-out vectors, with Student-t intervals over seeds (95% for each value; for the
differences from the default, Bonferroni over the probe and batch comparisons of each metric, ten by default, so
95% jointly per metric).

    python benchmarks/bench_signum_dead.py [--seeds 0,1,2] [--batches 1024,4096]

Writes benchmarks/results/signum_dead.json after every run; a rerun trains only the runs missing.
"""

from __future__ import annotations

import functools
import statistics

import torch

PROBES = ("default", "rare steps / 4", "rare steps / 16", "dead steps x3", "lr x0.7", "AuxK on a quarter")
METRICS = ("fvu", "dead_mean", "never_fired")
TOKENS, LATENTS, K = 299_008, 4096, 32
FAMILY_LEVEL = 0.95
"""Paired differences from the default: Bonferroni over the (probe, batch) comparisons of each metric, so 95% jointly
per metric."""


def rescale_sign_steps(trainer, scale: torch.Tensor) -> None:
    """After signum_sf's step, which left sign(grad) in each `.grad`: make each latent's sign step `scale` times what
    it was, in the parameter (the training point y) and in z (`SignScheduleFree.step`'s closed form)."""
    opt, sae = trainer.opt, trainer.sae
    rows = {sae.W_enc: scale[None, :], sae.b_enc: scale, sae.W_dec: scale[:, None]}
    with torch.no_grad():
        for group in opt.param_groups:
            lr, beta = group["lr"], group["beta"]
            for p in group["params"]:
                if p not in rows or p.grad is None or lr == 0:  # lr 0: the step took no sign
                    continue
                state = opt.state[p]
                c = lr * lr / state["weight_sum"]
                extra = p.grad * (1 - rows[p])  # the part of each step to take back (negative: to add)
                p.add_(extra, alpha=(1 - beta * (1 - c)) * lr)
                state["z"].add_(extra, alpha=lr)


def probe(grid, probe_name: str, d: int, seed: int, batch: int, tokens: int):
    """A default signum_sf trainer (`bench_sae_grid.Ours`) on d-wide activations with `probe_name` applied to it."""
    from dlmscope.sae.metrics import fire_counts

    r = grid.Ours("signum_sf", d, LATENTS, K, tokens // batch * batch, batch, seed)
    tr, sae = r.tr, r.tr.sae
    if probe_name.startswith("rare steps / ") or probe_name == "dead steps x3":
        seen: dict = {}

        def keep(module, args, kwargs, out):  # what the step needs of the training forward: who fired, who is dead
            dead = args[1] if len(args) > 1 else kwargs.get("dead_mask")
            seen.update(values=out.values.detach(), indices=out.indices, dead=dead)

        sae.register_forward_hook(keep, with_kwargs=True)
        step = tr.opt.step

        def scaled_step(closure=None):
            step()
            dead = seen["dead"]
            if probe_name.startswith("rare steps / "):
                fires = int(probe_name.rsplit("/", 1)[1])
                scale = (fire_counts(seen["values"], seen["indices"], LATENTS) / fires).clamp(max=1.0)
                if dead is not None:
                    scale[dead] = 1.0
            else:
                scale = torch.ones(LATENTS) if dead is None else 1.0 + 2.0 * dead.float()
            rescale_sign_steps(tr, scale)

        tr.opt.step = scaled_step
    elif probe_name == "lr x0.7":
        tr.lr *= 0.7  # the schedule (`SAETrainer.lr_at`) scales from it
    elif probe_name == "AuxK on a quarter":
        aux_acts = type(sae)._aux_acts
        tr.cfg.aux_coef *= 4  # the loss still averages over all N tokens, of which a quarter now count

        def first_quarter(pre, dead_ids, k_aux):
            acts, _ = aux_acts(pre, dead_ids, k_aux)
            cut = pre.shape[0] // 4
            acts[cut:] = 0  # a fresh tensor (index_select or top-k), not a view of the pre-activations
            return acts, float(acts[:cut].sign().sum())

        sae._aux_acts = first_quarter  # an instance attribute: this SAE only
    return r


def train(grid, x: torch.Tensor, probe_name: str, batch: int, tokens: int, seed: int) -> dict:
    train_x, held = x[:-grid.HELDOUT], x[-grid.HELDOUT:]
    r = probe(grid, probe_name, x.shape[1], seed, batch, tokens)
    dead = [r.tr.step(train_x[i * batch:(i + 1) * batch])["dead_fraction"] for i in range(tokens // batch)]
    return {"probe": probe_name, "batch": batch, "tokens": tokens // batch * batch, "seed": seed,
            "fvu": grid.fvu(held, r.reconstruct(held)), "dead_mean": statistics.fmean(dead),
            "never_fired": grid.never_fired(r, held, LATENTS)}


def summarise(grid, rows: dict) -> list[dict]:
    """Per (batch, probe): each metric's mean [95% interval] and, paired by seed, probe - default [interval at
    `FAMILY_LEVEL` over the comparisons]."""
    from dlmscope.stats import t_interval

    out = []
    batches = sorted({r["batch"] for r in rows.values()})
    level = 1 - (1 - FAMILY_LEVEL) / ((len(PROBES) - 1) * len(batches))
    for batch in batches:
        per = {p: {r["seed"]: r for r in rows.values() if (r["batch"], r["probe"]) == (batch, p)} for p in PROBES}
        for p in PROBES:
            seeds = sorted(set(per[p]) & set(per["default"]))
            if not seeds:
                continue
            cell = {"batch": batch, "probe": p, "seeds": seeds}
            for m in METRICS:
                cell[m] = grid.t_mean([per[p][s][m] for s in seeds])
                cell[f"{m}_vs_default"] = [float(v) for v in t_interval(
                    [per[p][s][m] - per["default"][s][m] for s in seeds], level=level)]
            out.append(cell)
    return out


def readme_table(result: dict) -> str:
    comparisons = sum(c["probe"] != "default" for c in result["summary"])
    lines = [f"| batch | probe | seeds | held-out FVU | FVU - default (paired, Bonferroni x{comparisons}) | "
             "dead, mean over steps | never fire on held-out |", "|---|---|---|---|---|---|---|"]
    for c in result["summary"]:
        d = c["fvu_vs_default"]
        diff = "-" if c["probe"] == "default" else f"{d[0]:+.4f} [{d[1]:+.4f}, {d[2]:+.4f}]"
        lines.append(f"| {c['batch']:,} | {c['probe']} | {len(c['seeds'])} | {c['fvu'][0]:.4f} | {diff} | "
                     f"{c['dead_mean'][0]:.1%} | {c['never_fired'][0]:.1%} |")
    return "\n".join(lines)


def main() -> None:
    import bench_sae_grid as grid  # a sibling script: its folder is on sys.path when this one runs

    args, x, results = grid.open_study(__doc__, "signum_dead.json", functools.partial(summarise, grid))
    results.fill(((f"{batch}/{name}/{seed}", functools.partial(train, grid, x, name, batch, TOKENS, seed))
                  for batch in grid.ints(args.batches) for seed in grid.ints(args.seeds) for name in PROBES),
                 lambda r: f"FVU {r['fvu']:.5f}, dead {r['dead_mean']:.3f}, never fired {r['never_fired']:.3f}")
    print(readme_table({"summary": summarise(grid, results.rows)}))


if __name__ == "__main__":
    main()
