"""Which layers, heads and visible positions carry a masked Sudoku cell's answer in dlmscope-tiny-dlm, and at which
denoising step the answer is decided.

Items: a test-split 4x4 puzzle, one empty target cell with answer a, and a second digit b; the corrupted puzzle
swaps the digits a and b everywhere (still a valid puzzle, whose answer at the target is b). Metric: logit(a) -
logit(b) at the target, restored fraction (patched - corrupted) / (clean - corrupted).
- Positions x layers: one denoising forward of prompt + 16 masks (the sampler's first step); resid_pre of each
  layer at each puzzle digit and each answer position patched from clean into corrupted; positions grouped by
  role: the target, the givens in the target's row / column / box ("constraint"), the other givens, the other
  masked answer cells in the target's units and the rest. Attribution patching on the same sweep, with its
  agreement with exact patching.
- Heads x layers: each head's `attn.hook_z` (all positions) patched, where the model exposes it.
- Steps x layers: the real sampler (16 tokens, 16 steps, low_confidence); the clean puzzle's residual stream at
  the 16 puzzle positions patched from step s onward. The answer is decided at the first s from which patching no
  longer restores the clean digit; compared with the step the corrupted run reveals the cell.
- Control: the same on random-digit grids ("Sudoku: " + 16 random digits 1-4 with holes), where no constraint
  ties a cell to any other; a is the model's own clean answer there.
Intervals: 95% bootstrap over solution grids (items resampled by grid), 2,000 draws. Attention patterns of the
target row across steps are kept for a few example items (the explorer's Circuits page).
Writes experiments/results/circuits_sudoku.json (and .md).
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _study import run_or_render  # noqa: E402
from dlmscope.io_utils import atomic_write_text  # noqa: E402

ROLES = ("target", "constraint givens", "other givens", "constraint masked", "other masked")
GEN = 16


def units(cell: int) -> set[int]:
    """The cells sharing a row, column or 2x2 box with `cell` (itself excluded)."""
    r, c = divmod(cell, 4)
    box = {4 * (2 * (r // 2) + i) + 2 * (c // 2) + j for i in range(2) for j in range(2)}
    return ({4 * r + j for j in range(4)} | {4 * i + c for i in range(4)} | box) - {cell}


def items(task: str, n: int, seed: int) -> list[dict]:
    """Puzzles (or random grids) with a target empty cell and the digit its corruption swaps in."""
    from dlmscope.tasks import Sudoku

    rng = random.Random(f"circuits-{task}-{seed}")
    out = []
    if task == "sudoku":
        for ex in Sudoku().examples("test", n, seed):
            puzzle, grid = ex.meta["puzzle"], ex.meta["solution"]
            cell = rng.choice([i for i, ch in enumerate(puzzle) if ch == "0"])
            b = rng.choice([d for d in "1234" if d != grid[cell]])
            out.append({"puzzle": puzzle, "grid": grid, "cell": cell, "b": b})
    else:
        while len(out) < n:
            grid = "".join(rng.choice("1234") for _ in range(16))
            holes = rng.sample(range(16), rng.randint(4, 10))
            puzzle = "".join("0" if i in holes else ch for i, ch in enumerate(grid))
            out.append({"puzzle": puzzle, "grid": grid, "cell": rng.choice(holes), "b": None})
    return out


def roles(item: dict, offset: int) -> dict[int, str]:
    """Sequence position -> role, for the 16 puzzle digits (at `offset`) and the 16 answer cells after the prompt."""
    near, puzzle = units(item["cell"]), item["puzzle"]
    out = {}
    for i, ch in enumerate(puzzle):
        if ch != "0":
            out[offset + i] = "constraint givens" if i in near else "other givens"
    return out


def run_item(lm, item: dict, task: str, args, digit_ids: dict, keep_patterns: bool) -> dict | None:
    import torch

    from dlmscope.analysis.patching import Patcher, PatchSetup
    from dlmscope.tasks import Sudoku

    clean = lm.to_tokens(Sudoku.prompt(item["puzzle"]))[0]
    offset = len(lm.to_tokens("Sudoku: ")[0])
    P = len(clean)
    target = P + item["cell"]
    if item["b"] is None:  # control: a is whatever the model answers on the clean grid
        with torch.no_grad():
            ids = torch.tensor([clean + [lm.mask_id] * GEN])
            logits = lm.denoise_logits(ids)[0, target]
        order = sorted("1234", key=lambda d: -float(logits[digit_ids[d]]))
        a, b = order[0], order[1]
    else:
        a, b = item["grid"][item["cell"]], item["b"]
    swapped = item["puzzle"].translate(str.maketrans({a: b, b: a}))
    corrupted = lm.to_tokens(Sudoku.prompt(swapped))[0]
    kw = dict(target=target, answer=digit_ids[a], wrong=digit_ids[b], gen_length=GEN, batch_size=args.batch_size)
    fwd = Patcher(lm, PatchSetup(clean, corrupted, **kw))
    positions = list(range(offset, offset + 16)) + list(range(P, P + GEN))
    lp = fwd.sweep("layer_position", positions=positions, attribution=True)
    pos_roles = roles(item, offset)
    near = units(item["cell"])
    for j in range(GEN):
        if j != item["cell"]:
            pos_roles[P + j] = "constraint masked" if j in near else "other masked"
    pos_roles[target] = "target"
    out = {"task": task, "puzzle": item["puzzle"], "grid": item["grid"], "cell": item["cell"], "a": a, "b": b,
           "clean": lp.clean, "corrupted": lp.corrupted, "positions": positions,
           "roles": [pos_roles.get(p, "other masked") for p in positions],
           "changed": [offset <= p < offset + 16 and item["puzzle"][p - offset] in (a, b) for p in positions],
           "layer_position": lp.normalised.tolist(),
           "attribution": (lp.attribution / (lp.clean - lp.corrupted)).tolist(),
           "agreement": lp.agreement, "forwards": {"layer_position": lp.forwards}}
    if "blocks.0.attn.hook_z" in lm.sites:
        lh = fwd.sweep("layer_head")
        out["layer_head"] = lh.normalised.tolist()
        out["forwards"]["layer_head"] = lh.forwards
    smp = Patcher(lm, PatchSetup(clean, corrupted, mode="sampler", steps=GEN, **kw))
    sl = smp.sweep("step_layer", layers=args.step_layers, positions=list(range(offset, offset + 16)))
    cb, cr = smp.baseline("clean"), smp.baseline("corrupted")
    out |= {"sampler": {"clean_token": int(cb.token), "corrupted_token": int(cr.token),
                        "clean_reveal": int(cb.reveal_step), "corrupted_reveal": int(cr.reveal_step),
                        "restored": (sl.tokens == int(cb.token)).int().tolist(), "effect": sl.normalised.tolist(),
                        "layers": sl.cols, "forwards": sl.forwards}}
    if keep_patterns and "blocks.0.attn.hook_pattern" in lm.sites:
        out["patterns"] = target_patterns(lm, clean, target)
        out["tokens"] = [lm.to_text([t], skip_special=False) for t in clean] + ["_"] * GEN
    return rounded(out)


def rounded(x):
    """Floats to 4 decimals, through lists and dicts (keeps the committed JSON small)."""
    if isinstance(x, float):
        return round(x, 4)
    if isinstance(x, dict):
        return {k: rounded(v) for k, v in x.items()}
    if isinstance(x, list):
        return [rounded(v) for v in x]
    return x


def target_patterns(lm, prompt: list[int], target: int) -> list:
    """[step][layer][head] -> the target's attention over keys, through the clean sampler run."""
    import torch

    from dlmscope.diffusion.sampler import generate
    from dlmscope.hooks import capture

    names = [f"blocks.{i}.attn.hook_pattern" for i in range(lm.n_layers)]
    with capture(lm, names) as cache, torch.no_grad():
        generate(lm, torch.tensor([prompt]), gen_length=GEN, steps=GEN)
    steps = len(cache.acts[names[0]])
    return [[[[float(v) for v in cache.acts[n][s][0, h, target]] for h in range(cache.acts[n][s].shape[1])]
             for n in names] for s in range(steps)]


def run(args) -> dict:
    import torch

    from dlmscope.models import load_model

    torch.set_num_threads(1)
    lm = load_model("dlmscope-tiny-dlm", device=args.device)
    digit_ids = {d: lm.to_tokens(d, add_bos=False)[0][0] for d in "1234"}
    args.step_layers = [int(v) for v in args.step_layers_text.split(",")]
    res: dict = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "items": []}
    for task, n in (("sudoku", args.n), ("control", args.n_control)):
        t0 = time.time()
        for k, item in enumerate(items(task, n, args.seed)):
            res["items"].append(run_item(lm, item, task, args, digit_ids, keep_patterns=k < args.n_patterns))
        print(task, f"{time.time() - t0:.0f}s", flush=True)
    return res


def grid_bootstrap(values: list[float], grids: list[str], n: int = 2000, seed: int = 0) -> list[float]:
    """[mean, low, high]: the mean over items with a 95% interval from resampling solution grids (NaNs dropped)."""
    import numpy as np

    keep = [(v, g) for v, g in zip(values, grids) if v == v]
    if not keep:
        return [float("nan")] * 3
    by_grid: dict[str, list[float]] = {}
    for v, g in keep:
        by_grid.setdefault(g, []).append(v)
    groups = list(by_grid.values())
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n):
        pick = rng.integers(0, len(groups), len(groups))
        vals = [v for i in pick for v in groups[i]]
        draws.append(sum(vals) / len(vals))
    mean = sum(v for v, _ in keep) / len(keep)
    return [mean, float(np.quantile(draws, 0.025)), float(np.quantile(draws, 0.975))]


def _role_means(item: dict, layer: int, only_changed: bool = False) -> dict[str, float]:
    row = item["layer_position"][layer]
    out = {}
    for role in ROLES:
        vals = [v for v, r, ch in zip(row, item["roles"], item["changed"]) if r == role and (ch or not only_changed)]
        out[role] = sum(vals) / len(vals) if vals else float("nan")
    return out


def decided_step(restored: list[list[int]], layer: int) -> float:
    """The first step s from which patching at `layer` no longer restores the clean digit; NaN when patching
    there restores it at no step (the site does not carry the answer)."""
    col = [row[layer] for row in restored]
    s = len(col)
    while s > 0 and not col[s - 1]:
        s -= 1
    return float(s) if s else float("nan")


def summary(res: dict) -> dict:
    """Every number the README and the explorer show, per task, with grid-bootstrap intervals."""
    out: dict = {"config": {k: res["config"][k] for k in ("n", "n_control", "seed")}, "tasks": {}}
    for task in ("sudoku", "control"):
        its = [it for it in res["items"] if it["task"] == task]
        solved = [it for it in its if it["sampler"]["clean_token"] != it["sampler"]["corrupted_token"]]
        grids = [it["grid"] for it in its]
        n_layers = len(its[0]["layer_position"])
        layers = []
        for layer in range(n_layers):
            means = [_role_means(it, layer) for it in its]
            changed = [_role_means(it, layer, only_changed=True) for it in its]
            layers.append({
                **{role: grid_bootstrap([m[role] for m in means], grids) for role in ROLES},
                "constraint - other givens": grid_bootstrap(
                    [m["constraint givens"] - m["other givens"] for m in means], grids),
                "changed: constraint - other givens": grid_bootstrap(
                    [m["constraint givens"] - m["other givens"] for m in changed], grids)})
        entry = {"items": len(its), "gap": grid_bootstrap([it["clean"] - it["corrupted"] for it in its], grids),
                 "layers": layers,
                 "attribution_pearson": grid_bootstrap([it["agreement"]["pearson"] for it in its], grids),
                 "attribution_top_overlap": grid_bootstrap([it["agreement"]["top_overlap"] for it in its], grids),
                 "forwards": {k: its[0]["forwards"][k] for k in its[0]["forwards"]},
                 "sampler_forwards": its[0]["sampler"]["forwards"]}
        if "layer_head" in its[0]:
            heads = len(its[0]["layer_head"][0])
            entry["layer_head"] = [[grid_bootstrap([it["layer_head"][i][h] for it in its], grids) for h in range(heads)]
                                   for i in range(n_layers)]
        step_layers = its[0]["sampler"]["layers"]
        sg = [it["grid"] for it in solved]
        entry["sampler"] = {
            "items_flipped": len(solved), "layers": step_layers,
            "restored": [[grid_bootstrap([float(it["sampler"]["restored"][s][j]) for it in solved], sg)
                          for j in range(len(step_layers))] for s in range(GEN)],
            "reveal_step": grid_bootstrap([float(it["sampler"]["corrupted_reveal"]) for it in solved], sg),
            "decided_step": {str(layer): grid_bootstrap([decided_step(it["sampler"]["restored"], j)
                                                         for it in solved], sg) for j, layer in enumerate(step_layers)},
            "carries": {str(layer): grid_bootstrap([float(not math.isnan(decided_step(it["sampler"]["restored"], j)))
                                                    for it in solved], sg) for j, layer in enumerate(step_layers)},
            "steps_decided_before_reveal": {str(layer): grid_bootstrap(
                [float(it["sampler"]["corrupted_reveal"] + 1 - decided_step(it["sampler"]["restored"], j))
                 for it in solved], sg) for j, layer in enumerate(step_layers)}}
        out["tasks"][task] = entry
    return out


def _fmt(ci: list[float], digits: int = 2) -> str:
    return f"{ci[0]:.{digits}f} [{ci[1]:.{digits}f}, {ci[2]:.{digits}f}]"


def readme_table(s: dict) -> str:
    """Per layer: restored fraction per constraint given and per other given, their difference over all givens and
    over the givens the corruption changed (Sudoku vs control), and at the target cell itself."""
    lines = ["| layer | Sudoku: constraint given | Sudoku: other given | difference: Sudoku | difference: control | "
             "changed givens only: Sudoku | changed givens only: control | Sudoku: the target cell |",
             "|---|---|---|---|---|---|---|---|"]
    su, co = s["tasks"]["sudoku"]["layers"], s["tasks"]["control"]["layers"]
    diff, changed = "constraint - other givens", "changed: constraint - other givens"
    for i, (a, b) in enumerate(zip(su, co)):
        cells = [a["constraint givens"], a["other givens"], a[diff], b[diff], a[changed], b[changed], a["target"]]
        lines.append(f"| {i} | " + " | ".join(_fmt(c) for c in cells) + " |")
    return "\n".join(lines)


def head_table(s: dict) -> str:
    """Restored fraction per head (its attn.hook_z at every position), Sudoku and control."""
    su, co = s["tasks"]["sudoku"]["layer_head"], s["tasks"]["control"]["layer_head"]
    heads = len(su[0])
    lines = ["| layer | " + " | ".join(f"head {h}: Sudoku | head {h}: control" for h in range(heads)) + " |",
             "|---|" + "---|" * (2 * heads)]
    for i, (a, b) in enumerate(zip(su, co)):
        lines.append(f"| {i} | " + " | ".join(f"{_fmt(a[h])} | {_fmt(b[h])}" for h in range(heads)) + " |")
    return "\n".join(lines)


def step_table(s: dict) -> str:
    """When the answer is decided, per patched layer (Sudoku vs control)."""
    lines = ["| task | items (answer flipped) | corrupted run reveals the cell at step | patched layer | "
             "decided at step | steps decided before the reveal |", "|---|---|---|---|---|---|"]
    for task, e in s["tasks"].items():
        smp = e["sampler"]
        for layer in smp["layers"]:
            lines.append(f"| {task} | {e['items']} ({smp['items_flipped']}) | {_fmt(smp['reveal_step'], 1)} | "
                         f"{layer} | {_fmt(smp['decided_step'][str(layer)], 1)} | "
                         f"{_fmt(smp['steps_decided_before_reveal'][str(layer)], 1)} |")
    return "\n".join(lines)


def render(res: dict, out: Path) -> str:
    from dlmscope.io_utils import atomic_write_json

    s = summary(res)
    atomic_write_json(out / "circuits_sudoku_summary.json", s)
    md = readme_table(s) + "\n\n" + head_table(s) + "\n\n" + step_table(s) + "\n"
    atomic_write_text(out / "circuits_sudoku.md", md)
    return md


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=16, help="Sudoku test puzzles")
    p.add_argument("--n-control", type=int, default=16, help="random-digit control grids")
    p.add_argument("--n-patterns", type=int, default=2, help="items whose attention patterns are kept")
    p.add_argument("--step-layers", dest="step_layers_text", default="0,2", help="layers of the step sweep")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    run_or_render(p, "circuits_sudoku", run, render)


if __name__ == "__main__":
    main()
