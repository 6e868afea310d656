"""Attribution-graph cost on the built-in DLM with its shipped transcoders (run by hand; CPU, one thread).

    python benchmarks/bench_attribution.py [--lengths 16,32,64,128] [--reps 2]

Input: held-out text packed into rows of each length, 30% of the positions after BOS masked (seeded), the
target the first masked position's true token. Per length: active features n, backward passes (1 for the
logit + sum over layers of ceil(n_l / batch)), CPU seconds of the graph (the real forward, the frozen model,
every backward pass) and of pruning, the median of `reps`. Scaling exponents come from a log-log fit of the
graph time against the sequence length and against n. An 8B projection: the per-pass cost of one backward
pass is O(B L (3 d^2 + H L d_head)) per layer, so cost ~ passes x that; the plan below is written from the
fitted per-pass constant. Timings on a shared 2-core CPU are noisy (CPU time, not wall, is reported).
Writes benchmarks/results/attribution.json.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import torch

from dlmscope.analysis.attribution import Target, attribute, load_transcoders, prune
from dlmscope.data import builtin_corpus, pack
from dlmscope.io_utils import atomic_write_json
from dlmscope.models import load_model

OUT = Path(__file__).resolve().parent / "results" / "attribution.json"


def _input(lm, rows, L: int, seed: int = 0):
    x0 = rows[0, :L].clone()
    gen = torch.Generator().manual_seed(seed)
    masked = torch.rand(L, generator=gen) < 0.3
    masked[0] = False
    masked[int(torch.nonzero(masked)[0]) if masked.any() else 1] = True
    xt = torch.where(masked, torch.full_like(x0, lm.mask_id), x0)
    p = int(masked.nonzero()[0])
    return xt, Target(p, int(x0[p]))


def _fit(xs, ys) -> float:
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = statistics.mean(lx), statistics.mean(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


LLADA_8B = {"d_model": 4096, "n_layers": 32, "d_head": 128}


def project(res: dict, l0: int = 64, budget: int = 8192, batch: int = 256, lengths=(64, 256)) -> dict:
    """LLaDA-8B's graph cost from the measured per-pass constant: passes = 1 + ceil(budget / batch) (the row
    budget, as circuit-tracer's 8B graphs use), a pass walks half the layers on average at
    B L (3 d^2 + L d) multiply-adds per layer; memory: the adjacency's computed rows (budget x all nodes, fp32)
    and one (B, L, d) gradient per layer kept for the edge reads. `l0` active features per position and layer is
    an assumption (our tiny transcoders have about 15-20)."""
    d, n = LLADA_8B["d_model"], LLADA_8B["n_layers"]
    out = {"assumed_l0": l0, "budget": budget, "batch": batch, "by_length": {}}
    for L in lengths:
        features = L * n * l0
        nodes = features + n * L + L + 1
        passes = 1 + -(-min(budget, features) // batch)
        gmac = passes * batch * L * (3 * d * d + L * d) * n / 2 / 1e9
        out["by_length"][str(L)] = {
            "active_features": features, "backward_passes": passes, "tmac": gmac / 1e3,
            "adjacency_gib": (min(budget, features) + 1) * nodes * 4 / 2**30,
            "gradients_gib": n * batch * L * d * 4 / 2**30,
            "seconds_at_100_tflops": 2 * gmac / 1e5,  # an H100's dense bf16 rate, well below its peak
            "cpu_hours_at_measured_rate": gmac * res["cpu_s_per_gmac"] / 3600}
    return out


def readme_table(res: dict) -> str:
    """The README's per-length table: active features, backward passes, graph and pruning CPU seconds."""
    def sig(x: float) -> str:  # two significant digits below 10 s, one decimal above
        return f"{x:.1f}" if x >= 1 else f"{x:.2g}"

    lines = ["| input tokens | active features | backward passes | graph CPU s | pruning CPU s |", "|---|---|---|---|---|"]
    lines += [f"| {r['length']} | {r['active_features']:,} | {r['backward_passes']} | {sig(r['graph_cpu_s'])} | "
              f"{sig(r['prune_cpu_s'])} |" for r in res["runs"]]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--lengths", default="16,32,64,128")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--project", action="store_true", help="only recompute the 8B projection of the saved result")
    args = p.parse_args()
    if args.project:
        import json

        res = json.loads(args.out.read_text())
        res["projection_llada_8b"] = project(res)
        atomic_write_json(args.out, res)
        print(res["projection_llada_8b"])
        return
    torch.set_num_threads(1)
    lm = load_model("dlmscope-tiny-dlm")
    tcs = load_transcoders(lm, "tiny-dlm-tc")
    lengths = [int(x) for x in args.lengths.split(",")]
    rows = pack(lm.tokenizer, builtin_corpus("heldout"), max(lengths)).input_ids
    runs = []
    for L in lengths:
        xt, target = _input(lm, rows, L)
        graph_s, prune_s = [], []
        for _ in range(args.reps):
            t0 = time.process_time()
            g = attribute(lm, tcs, xt, target, batch_size=args.batch_size)
            t1 = time.process_time()
            prune(g)
            graph_s.append(t1 - t0)
            prune_s.append(time.process_time() - t1)
        per_layer = torch.bincount(g.features[:, 0], minlength=lm.n_layers).tolist()
        runs.append({"length": L, "active_features": g.n_features, "features_per_layer": per_layer,
                     "nodes": g.adjacency.shape[0], "backward_passes": g.info["backward_passes"],
                     "graph_cpu_s": statistics.median(graph_s), "prune_cpu_s": statistics.median(prune_s)})
        print(runs[-1], flush=True)
    t = [r["graph_cpu_s"] + r["prune_cpu_s"] for r in runs]
    res = {"model": lm.name, "transcoders": "tiny-dlm-tc", "threads": 1, "batch_size": args.batch_size,
           "reps": args.reps, "runs": runs,
           "exponent_time_vs_length": _fit(lengths, t),
           "exponent_time_vs_features": _fit([r["active_features"] for r in runs], t),
           "graph_64_cpu_s": next((x for r, x in zip(runs, t) if r["length"] == 64), None)}
    # per-pass cost model: a pass through layer l costs ~ B L (3 d^2 + L d) multiply-adds; fit seconds per unit
    d = lm.d_model
    work = [r["backward_passes"] * args.batch_size * r["length"] * (3 * d * d + r["length"] * d) * lm.n_layers / 2
            for r in runs]
    res["cpu_s_per_gmac"] = statistics.median(x / (w / 1e9) for x, w in zip(t, work))
    res["projection_llada_8b"] = project(res)
    atomic_write_json(args.out, res)
    print(res)


if __name__ == "__main__":
    main()
