"""Attribution graphs on Sudoku 4x4: where does the answer's influence come from, DLM vs its AR twin?

Held-out puzzles (test split: solution grids never seen in training), `--cells` empty cells each. DLM: the
sampler solves the puzzle (16 tokens, 16 steps, one block, greedy); each chosen cell's graph is taken at the
step that committed it, target = the solution digit's logit there. AR twin: the same puzzle with the solution
written left to right up to the cell, target = the solution digit's logit as the next token. Transcoders: the
shipped tiny-dlm-tc / tiny-ar-tc (one skip transcoder per layer); each graph computes the incoming edges of at
most `--max-feature-nodes` features, the most influential first (the influence that ends at features past the
budget is reported as "uncomputed features", beside the error share).

Influence is the paper's: the target's indirect influence on each node through the row-normalised |adjacency|.
Leaves (token and error nodes) share it. Token nodes are grouped by their cell's relation to the target cell:
the same cell (its copy in the puzzle), same row, same column, same box (neither row nor column), other cells,
and tokens that are no cell ("Sudoku:", newline, "Solution:"...); a cell has up to two token nodes (puzzle
digit, answer position; the DLM's answer positions may still be mask tokens). `per cell` divides a group's
share by its number of cells (3, 3, 1, 8 for row, column, box-only, other). Features are grouped by layer and
by the same relation of their position. Error share = influence reaching error nodes / all leaves (what the
transcoders leave unexplained). 95% intervals: percentile bootstrap over solution grids (graphs of one grid
resampled together; DLM - AR paired on the same grids). Intervention check (DLM and AR): for each graph,
the 20 most influential features are ablated one at a time in the real model (their decoder contribution
removed from the MLP output at their position; attention, norms and every MLP live); agreement of sign with
the graph's predicted total effect (Wilson interval) and the per-graph Spearman correlation (bootstrap).
The same check on `--prose` held-out prose rows of 20 tokens (30% masked, target position 10) gives the
DLM's correlation over more inputs. Writes experiments/results/attribution_sudoku.json (run in shards:
`--shards N --shard K` for K < N, then `--shards N --merge`).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _study import run_or_render  # noqa: E402

GROUPS = ("same cell", "row", "column", "box", "other cells", "not a cell")
N_CELLS = {"row": 3, "column": 3, "box": 1, "other cells": 8}


def relation(a: int, b: int) -> str:
    """How cell b (0..15, row-major) relates to the target cell a."""
    if a == b:
        return "same cell"
    if a // 4 == b // 4:
        return "row"
    if a % 4 == b % 4:
        return "column"
    if (a // 8, a % 4 // 2) == (b // 8, b % 4 // 2):
        return "box"
    return "other cells"


def cell_map(lm, prompt: str, answer_start: int) -> dict[int, int]:
    """Sequence position -> cell for the puzzle digits (after "Sudoku: ") and the 16 answer positions."""
    head = len(lm.to_tokens(prompt.split(":")[0] + ":")[0])
    digits = lm.to_tokens(prompt)[0]
    out = {}
    cell = 0
    for pos in range(head, len(digits)):
        text = lm.tokenizer.decode([digits[pos]]).strip()
        if len(text) == 1 and text.isdigit() and cell < 16:
            out[pos] = cell
            cell += 1
    out.update({answer_start + c: c for c in range(16)})
    return out


def shares(graph, pruned, cells: dict[int, int], target_cell: int, n_layers: int) -> dict:
    """Influence shares of one graph: token groups, error nodes, features by layer x relation."""
    import torch

    inf = pruned.influence
    n_f, L = graph.n_features, graph.n_pos
    tok = inf[graph.token_index(0):graph.token_index(0) + L]
    err = inf[n_f:graph.token_index(0)]
    uncomputed = float(inf[:n_f][~graph.computed].sum())  # features past the row budget end paths like leaves
    leaves = float(tok.sum() + err.sum()) + uncomputed or 1.0
    groups = {g: 0.0 for g in GROUPS}
    masked_share = 0.0
    for pos in range(L):
        g = relation(target_cell, cells[pos]) if pos in cells else "not a cell"
        groups[g] += float(tok[pos]) / leaves
        masked_share += float(tok[pos]) / leaves if graph.masked[pos] else 0.0
    feat = inf[:n_f]
    total_feat = float(feat.sum()) or 1.0
    by_layer = []
    for layer in range(n_layers):
        sel = graph.features[:, 0] == layer
        row = {"share": float(feat[sel].sum()) / total_feat}
        rel = {}
        for pos_, v in zip(graph.features[sel, 1].tolist(), feat[sel].tolist()):
            g = relation(target_cell, cells[pos_]) if pos_ in cells else "not a cell"
            g = "peer (row/column/box)" if g in ("row", "column", "box") else g
            rel[g] = rel.get(g, 0.0) + v
        s = sum(rel.values()) or 1.0
        row.update({k: v / s for k, v in rel.items()})
        by_layer.append(row)
    return {"tokens": groups, "errors": float(err.sum()) / leaves, "mask_tokens": masked_share,
            "uncomputed": uncomputed / leaves,
            "features_by_layer": by_layer, "n_features": n_f,
            "kept_nodes": int(pruned.node_mask.sum()), "kept_edges": int(pruned.edge_mask.sum()),
            "error_by_layer": [float(err[i * L:(i + 1) * L].sum()) / leaves for i in range(n_layers)],
            "mass_check": float(torch.isfinite(inf).all())}


def spearman(a: list[float], b: list[float]) -> float:
    def ranks(x):
        order = sorted(range(len(x)), key=lambda i: x[i])
        r = [0.0] * len(x)
        for k, i in enumerate(order):
            r[i] = float(k)
        return r
    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.mean(ra), statistics.mean(rb)
    num = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    den = (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5
    return num / den if den else 0.0


def intervention(lm, tcs, graph, pruned, top: int = 20) -> dict:
    from dlmscope.analysis.attribution import ablate_in_model, total_effects

    n_f = graph.n_features
    order = pruned.influence[:n_f].argsort(descending=True)[:top].tolist()
    pred = total_effects(graph)[order].tolist()
    real = ablate_in_model(lm, tcs, graph, order).tolist()
    return {"predicted": pred, "real": real, "spearman": spearman(pred, real),
            "agree": sum((p > 0) == (r > 0) for p, r in zip(pred, real) if p != 0 and r != 0), "n": len(order)}


def run(args) -> dict:
    import torch

    from dlmscope.analysis.attribution import Target, attribute, load_transcoders, prune
    from dlmscope.data import builtin_corpus, pack
    from dlmscope.diffusion.sampler import generate
    from dlmscope.models import load_model
    from dlmscope.tasks import get_task

    torch.set_num_threads(args.threads)
    dlm, ar = load_model("dlmscope-tiny-dlm"), load_model("dlmscope-tiny-ar")
    tcs = {"dlm": load_transcoders(dlm, "tiny-dlm-tc"), "ar": load_transcoders(ar, "tiny-ar-tc")}
    examples = get_task("sudoku").examples("test", args.puzzles, seed=args.seed)
    rng = random.Random(args.seed)
    rows = []
    t0 = time.process_time()
    for i, ex in enumerate(examples):
        puzzle, solution = ex.meta["puzzle"], ex.meta["solution"]
        empty = [j for j, c in enumerate(puzzle) if c == "0"]
        chosen = sorted(rng.sample(empty, min(args.cells, len(empty))))  # drawn for every puzzle: shards agree
        if i % args.shards != args.shard:
            continue
        out = generate(dlm, [ex.prompt], gen_length=16, steps=16, block_length=16, return_history=True)
        P = out.prompt_length
        reveal = {int(q): r.step for r in out.history for q in r.transfer[0].nonzero().squeeze(1).tolist()}
        cells_dlm = cell_map(dlm, ex.prompt, P)
        prompt_ids = dlm.to_tokens(ex.prompt)[0]
        for c in chosen:
            digit = dlm.to_tokens(solution[c], add_bos=False)[0]
            if len(digit) != 1:
                continue
            pos = P + c
            rec = out.history[reveal[pos]]
            g = attribute(dlm, tcs["dlm"], rec.x[0], Target(pos, digit[0]), masked=rec.mask[0], step=rec.step,
                          max_feature_nodes=args.max_feature_nodes)
            pr = prune(g, args.node_threshold, args.edge_threshold)
            row = {"order": i, "grid": solution, "puzzle": puzzle, "cell": c, "step": rec.step,
                   "correct": int(out.sequences[0, pos]) == digit[0],
                   "dlm": {**shares(g, pr, cells_dlm, c, dlm.n_layers), "target": float(g.value[-1]),
                           "probability": g.probability}}
            if i < args.interventions:
                row["dlm"]["intervention"] = intervention(dlm, tcs["dlm"], g, pr)
            # the AR twin: puzzle + solution written left to right up to the cell, the digit as the next token
            ids = torch.tensor(prompt_ids + [t for ch in solution[:c] for t in ar.to_tokens(ch, add_bos=False)[0]])
            ga = attribute(ar, tcs["ar"], ids, Target(len(ids), digit[0]), max_feature_nodes=args.max_feature_nodes)
            pa = prune(ga, args.node_threshold, args.edge_threshold)
            row["ar"] = {**shares(ga, pa, cell_map(ar, ex.prompt, len(prompt_ids)), c, ar.n_layers),
                         "target": float(ga.value[-1]), "probability": ga.probability}
            if i < args.interventions:
                row["ar"]["intervention"] = intervention(ar, tcs["ar"], ga, pa)
            rows.append(row)
            print(len(rows), c, rec.step, {k: round(v, 3) for k, v in row["dlm"]["tokens"].items()},
                  "err", round(row["dlm"]["errors"], 3), "| ar", round(row["ar"]["errors"], 3), flush=True)
    prose = []
    text = pack(dlm.tokenizer, builtin_corpus("heldout"), 20).input_ids
    for j in range(args.prose):
        if j % args.shards != args.shard:
            continue
        x0 = text[j]
        m = torch.rand(20, generator=torch.Generator().manual_seed(j)) < 0.3
        m[0], m[10] = False, True
        g = attribute(dlm, tcs["dlm"], torch.where(m, torch.full_like(x0, dlm.mask_id), x0), Target(10, int(x0[10])),
                      max_feature_nodes=args.max_feature_nodes)
        prose.append({"order": j, **intervention(dlm, tcs["dlm"], g, prune(g, args.node_threshold, args.edge_threshold))})
        print("prose", j, prose[-1]["agree"], round(prose[-1]["spearman"], 3), flush=True)
    return {"config": {k: getattr(args, k) for k in ("puzzles", "cells", "seed", "node_threshold", "edge_threshold",
                                                      "max_feature_nodes", "interventions", "boot", "shards", "prose")},
            "cpu_s": round(time.process_time() - t0, 1), "rows": rows, "prose": prose}


def run_all(args) -> dict:
    """The study (or one shard of its puzzles, `--shard K --shards N`), or `--merge`: the shards' rows joined and
    summarised."""
    if args.merge:
        parts = [json.loads((args.out / f"attribution_sudoku.shard{k}.json").read_text()) for k in range(args.shards)]
        rows = sorted((r for p in parts for r in p["rows"]), key=lambda r: (r["order"], r["cell"]))
        prose = sorted((r for p in parts for r in p["prose"]), key=lambda r: r["order"])
        return {"config": parts[0]["config"], "cpu_s": round(sum(p["cpu_s"] for p in parts), 1), "rows": rows,
                "prose": prose, "summary": summarise(rows, args.boot, prose)}
    res = run(args)
    if args.shards == 1:
        res["summary"] = summarise(res["rows"], args.boot, res["prose"])
    return res


def _boot(rows: list[dict], stat, n: int, seed: int = 0) -> list[float]:
    """Percentile 95% interval of stat(rows) resampling solution grids (a grid's rows move together)."""
    grids: dict[str, list[dict]] = {}
    for r in rows:
        grids.setdefault(r["grid"], []).append(r)
    keys = sorted(grids)
    rng = random.Random(seed)
    vals = sorted(stat([r for _ in keys for r in grids[rng.choice(keys)]]) for _ in range(n))
    return [vals[int(0.025 * n)], vals[int(0.975 * n) - 1]]


def _intervention_summary(iv: list[dict], n_boot: int) -> dict:
    from dlmscope.stats import wilson

    agree, n = sum(x["agree"] for x in iv), sum(x["n"] for x in iv)
    rho = lambda rs: statistics.mean(r["spearman"] for r in rs)  # noqa: E731
    return {"graphs": len(iv), "sign_agreement": wilson(agree, n),
            "spearman": [rho(iv), *_boot([{"grid": str(i), **x} for i, x in enumerate(iv)], rho, n_boot)]}


def summarise(rows: list[dict], n_boot: int, prose: list[dict]) -> dict:
    def mean_of(side, get):
        return lambda rs: statistics.mean(get(r[side]) for r in rs)

    out = {"graphs": len(rows), "grids": len({r["grid"] for r in rows}),
           "dlm_correct": sum(r["correct"] for r in rows)}
    for side in ("dlm", "ar"):
        s = {}
        for g in GROUPS:
            f = mean_of(side, lambda x, g=g: x["tokens"][g])
            s[g] = [f(rows), *_boot(rows, f, n_boot)]
            if g in N_CELLS:
                s[g + " per cell"] = [v / N_CELLS[g] for v in s[g]]
        peers = mean_of(side, lambda x: sum(x["tokens"][g] for g in ("row", "column", "box")))
        s["peers (row+column+box)"] = [peers(rows), *_boot(rows, peers, n_boot)]
        err = mean_of(side, lambda x: x["errors"])
        s["errors"] = [err(rows), *_boot(rows, err, n_boot)]
        unc = mean_of(side, lambda x: x["uncomputed"])
        s["uncomputed features"] = [unc(rows), *_boot(rows, unc, n_boot)]
        mask = mean_of(side, lambda x: x["mask_tokens"])
        s["mask tokens"] = [mask(rows), *_boot(rows, mask, n_boot)]
        n_layers = len(rows[0][side]["features_by_layer"])
        s["feature share by layer"] = [statistics.mean(r[side]["features_by_layer"][i]["share"] for r in rows)
                                       for i in range(n_layers)]
        s["peer share by layer"] = [
            statistics.mean(r[side]["features_by_layer"][i].get("peer (row/column/box)", 0.0) for r in rows)
            for i in range(n_layers)]
        s["target-cell share by layer"] = [
            statistics.mean(r[side]["features_by_layer"][i].get("same cell", 0.0) for r in rows) for i in range(n_layers)]
        s["error share by layer"] = [statistics.mean(r[side]["error_by_layer"][i] for r in rows) for i in range(n_layers)]
        s["active features"] = statistics.mean(r[side]["n_features"] for r in rows)
        s["kept nodes"] = statistics.mean(r[side]["kept_nodes"] for r in rows)
        iv = [r[side]["intervention"] for r in rows if "intervention" in r[side]]
        if iv:
            s["intervention"] = _intervention_summary(iv, n_boot)
        out[side] = s
    if prose:
        out["prose_intervention"] = _intervention_summary(prose, n_boot)
    for key in ("peers (row+column+box)", "errors", "same cell", "not a cell"):
        if key == "peers (row+column+box)":
            get = lambda x: sum(x["tokens"][g] for g in ("row", "column", "box"))  # noqa: E731
        elif key == "errors":
            get = lambda x: x["errors"]  # noqa: E731
        else:
            get = lambda x, k=key: x["tokens"][k]  # noqa: E731
        f = lambda rs, get=get: statistics.mean(get(r["dlm"]) - get(r["ar"]) for r in rs)  # noqa: E731
        out.setdefault("dlm_minus_ar", {})[key] = [f(rows), *_boot(rows, f, n_boot)]
    return out


def _ci(v: list[float]) -> str:
    return f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]"


def readme_table(res: dict) -> str:
    s = res["summary"]
    lines = ["| share of the answer's influence | DLM | AR twin | DLM - AR |", "|---|---|---|---|"]
    for key in ("same cell", "row", "column", "box", "other cells", "not a cell", "peers (row+column+box)",
                "mask tokens", "errors", "uncomputed features"):
        diff = _ci(s["dlm_minus_ar"][key]) if key in s["dlm_minus_ar"] else ""
        lines.append(f"| {key} | {_ci(s['dlm'][key])} | {_ci(s['ar'][key])} | {diff} |")
    for side, name in (("dlm", "DLM"), ("ar", "AR twin")):
        iv = s[side].get("intervention")
        if iv:
            lines.append(f"| {name}: ablating the top-20 features, sign as predicted | "
                         + (f"{_ci(iv['sign_agreement'])} |  |  |" if side == "dlm" else f" | {_ci(iv['sign_agreement'])} |  |"))
            lines.append(f"| {name}: Spearman(predicted, real effect), {iv['graphs']} graphs | "
                         + (f"{_ci(iv['spearman'])} |  |  |" if side == "dlm" else f" | {_ci(iv['spearman'])} |  |"))
    iv = s.get("prose_intervention")
    if iv:
        lines.append(f"| DLM on held-out prose ({iv['graphs']} graphs): top-20 ablations, sign as predicted | "
                     f"{_ci(iv['sign_agreement'])} |  |  |")
        lines.append(f"| DLM on held-out prose: Spearman(predicted, real effect) | {_ci(iv['spearman'])} |  |  |")
    return "\n".join(lines)


def layer_table(res: dict) -> str:
    s = res["summary"]
    n = len(s["dlm"]["feature share by layer"])
    lines = ["| layer | DLM: feature influence | of which at peer cells | at the target cell | error share | "
             "AR: feature influence | of which at peer cells | error share |", "|---|---|---|---|---|---|---|---|"]
    for i in range(n):
        d, a = s["dlm"], s["ar"]
        lines.append(f"| {i} | {d['feature share by layer'][i]:.3f} | {d['peer share by layer'][i]:.3f} | "
                     f"{d['target-cell share by layer'][i]:.3f} | {d['error share by layer'][i]:.3f} | "
                     f"{a['feature share by layer'][i]:.3f} | {a['peer share by layer'][i]:.3f} | "
                     f"{a['error share by layer'][i]:.3f} |")
    return "\n".join(lines)


def render(res: dict, out: Path) -> str:
    if "summary" not in res:
        return f"shard: {len(res['rows'])} graphs, CPU {res['cpu_s']} s"
    s = res["summary"]
    return (f"{s['graphs']} graphs on {s['grids']} solution grids ({s['dlm_correct']} DLM answers correct), "
            f"CPU {res['cpu_s']} s\n\n" + readme_table(res) + "\n\n" + layer_table(res))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--puzzles", type=int, default=32)
    p.add_argument("--prose", type=int, default=20, help="held-out prose inputs (20 tokens) for the DLM ablation check")
    p.add_argument("--cells", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--node-threshold", type=float, default=0.8)
    p.add_argument("--edge-threshold", type=float, default=0.98)
    p.add_argument("--max-feature-nodes", type=int, default=512, help="row budget per graph (see attribute)")
    p.add_argument("--interventions", type=int, default=24, help="graphs (per model) with the ablation check")
    p.add_argument("--boot", type=int, default=2000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--shards", type=int, default=1, help="split the puzzles over this many processes")
    p.add_argument("--shard", type=int, default=0, help="which shard this process runs (0-based)")
    p.add_argument("--merge", action="store_true", help="join the shards' results and summarise")
    args = p.parse_known_args()[0]
    name = "attribution_sudoku" + (f".shard{args.shard}" if args.shards > 1 and not args.merge else "")
    run_or_render(p, name, run_all, render)


if __name__ == "__main__":
    main()
