"""Per-step cost of a whole SAE training run, both optimisers paired: adam vs signum_sf vs the floor.

`bench_sae_floor.py` times a few steps on one random batch; this runs the real thing: the built-in DLM's layer-3
activations (the cache of `bench_sae_train.py`), d_in 256, 4,096 latents, k 32, `TrainConfig` defaults (warm-up,
Adam's decay, AuxK once latents die), and every step of the run timed. Both trainers step on the same batch,
alternately (the order flips every step), and the floor (the dense encode GEMM + top-k at the same shape, into a
reused buffer, as in `bench_sae_floor.py`) is timed next to them, so load drifting on a shared machine hits all
three alike. Clock: this process's CPU time (run it with one thread). Each step is also split into phases (the
SAE forward, the backward, the optimiser step, the decoder's projection and renormalisation, the rest:
losses, dead counters, logs) by wrapping those calls, and the dead fraction is logged.

Reported over the whole run (AuxK steps counted) and per quarter of it: medians of the paired ratios
signum_sf / adam and step / floor (with 95% intervals of the median: order statistics, binomial), and per phase
median milliseconds.

    python benchmarks/bench_sae_steps.py [--batch 1024] [--tokens 300000] [--flush-denormal]
        [--aux-coef 0]             # AuxK off for both: what is left of the gap without it
        [--dead-tokens 149504]     # AuxK's dead window for both (default: a fifth of the run)
        [--aux-route ragged|dense] # force one of the CPU's two AuxK routes instead of the rule (model._dense_aux)

Writes benchmarks/results/sae_steps.json (or --out).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
OPTIMISERS = ("adam", "signum_sf")
PHASES = ("forward", "backward", "optimiser", "decoder", "other")


def median_ci(values: list[float]) -> list[float]:
    """95% interval of the median from order statistics (normal approximation to the binomial)."""
    s, n = sorted(values), len(values)
    half = 1.96 * math.sqrt(n) / 2
    lo, hi = max(0, math.floor(n / 2 - half)), min(n - 1, math.ceil(n / 2 + half))
    return [s[lo], s[hi]]


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "ci95": median_ci(values), "n": len(values)}


class Timed:
    """A trainer whose step is split into phases by wrapping the calls `SAETrainer.step` makes."""

    def __init__(self, optimizer: str, d: int, latents: int, k: int, tokens: int, batch: int,
                 aux_coef: float = 1 / 32, dead_tokens: int | None = None):
        from dlmscope.sae import SAEConfig, SAETrainer, TrainConfig

        self.tr = SAETrainer(SAEConfig(d, latents, k), TrainConfig(total_tokens=tokens, batch_size=batch,
                                                                   optimizer=optimizer, aux_coef=aux_coef,
                                                                   dead_tokens=dead_tokens))
        self.phase = dict.fromkeys(PHASES, 0.0)
        sae = self.tr.sae
        sae.forward = self._wrap(sae.forward, "forward")
        self.tr.backward = self._wrap(self.tr.backward, "backward")
        self.tr.opt.step = self._wrap(self.tr.opt.step, "optimiser")
        sae.remove_parallel_grad = self._wrap(sae.remove_parallel_grad, "decoder")
        sae.normalize_decoder = self._wrap(sae.normalize_decoder, "decoder")
        self.aux: dict | None = None
        aux_acts = type(sae)._aux_acts

        def seen(pre, dead_ids, k_aux):  # AuxK's block: the share of positive activations, and the route it takes
            from dlmscope.sae import model

            acts, n_positive = aux_acts(pre, dead_ids, k_aux)
            dense = n_positive and model._dense_aux(acts.shape[0], acts.shape[1], n_positive)
            self.aux = {"positive": n_positive / max(acts.numel(), 1),
                        "route": "none positive" if not n_positive else "dense" if dense else "ragged"}
            return acts, n_positive

        sae._aux_acts = seen  # an instance attribute: this SAE only

    def _wrap(self, fn, name: str):
        def timed(*args, **kwargs):
            t = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.phase[name] += time.process_time() - t
        return timed

    def step(self, x: torch.Tensor) -> tuple[float, dict, dict]:
        self.phase, self.aux = dict.fromkeys(PHASES, 0.0), None
        t = time.process_time()
        logs = self.tr.step(x)
        total = time.process_time() - t
        self.phase["other"] = total - sum(v for k, v in self.phase.items() if k != "other")
        return total, dict(self.phase), logs


def run(x: torch.Tensor, batch: int, latents: int, k: int, aux_coef: float = 1 / 32,
        dead_tokens: int | None = None) -> dict:
    steps, d = x.shape[0] // batch, x.shape[1]
    trainers = {name: Timed(name, d, latents, k, steps * batch, batch, aux_coef, dead_tokens) for name in OPTIMISERS}
    buf = torch.empty(batch, latents)
    records = []
    for i in range(steps):
        b = x[i * batch:(i + 1) * batch]
        rec = {"step": i}
        order = OPTIMISERS if i % 2 == 0 else OPTIMISERS[::-1]
        for name in order:
            total, phases, logs = trainers[name].step(b)
            rec[name] = {"step_s": total, **{f"{p}_s": v for p, v in phases.items()},
                         "dead_fraction": logs["dead_fraction"], "fvu": logs["fvu"], "aux": trainers[name].aux}
        w = trainers["adam"].tr.sae.W_enc.detach()  # the floor at the same shape, on the same batch
        t = time.process_time()
        torch.mm(b, w, out=buf).topk(k, dim=-1, sorted=False)
        rec["floor_s"] = time.process_time() - t
        records.append(rec)
    return {"steps": steps, "records": records}


def run_parts(steps: list) -> dict[str, list]:
    """A run's per-step records under "whole run" and "quarter 1".."quarter 4"."""
    n = len(steps)
    return {"whole run": steps, **{f"quarter {q + 1}": steps[q * n // 4:(q + 1) * n // 4] for q in range(4)}}


def aux_summary(steps: list[dict | None]) -> dict:
    """Over the steps that ran AuxK's block: how many, the median share of its activations that are positive, and the
    share of them on the dense route."""
    ran = [a for a in steps if a]
    return {"steps": len(ran), "positive_median": statistics.median(a["positive"] for a in ran) if ran else None,
            "dense_share": sum(a["route"] == "dense" for a in ran) / len(ran) if ran else None}


def report(records: list[dict]) -> dict:
    """Paired ratios and phase medians over the whole run and per quarter."""
    parts = {**run_parts(records), "aux steps (both with dead latents)": [
        r for r in records if all(r[o]["dead_fraction"] > 0 for o in OPTIMISERS)]}
    out = {}
    for label, rs in parts.items():
        if not rs:
            continue
        out[label] = {
            "signum_sf_over_adam": summary([r["signum_sf"]["step_s"] / r["adam"]["step_s"] for r in rs]),
            **{f"{o}_over_floor": summary([r[o]["step_s"] / r["floor_s"] for r in rs]) for o in OPTIMISERS},
            "floor_ms": statistics.median(r["floor_s"] for r in rs) * 1e3,
            **{f"{o}_ms": {p: statistics.median(r[o][f"{p}_s"] for r in rs) * 1e3 for p in ("step",) + PHASES}
               for o in OPTIMISERS},
            **{f"{o}_dead_fraction": statistics.median(r[o]["dead_fraction"] for r in rs) for o in OPTIMISERS},
            **{f"{o}_aux": aux_summary([r[o].get("aux") for r in rs]) for o in OPTIMISERS},
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--tokens", type=int, default=300_000)
    p.add_argument("--latents", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--flush-denormal", action="store_true", help="torch.set_flush_denormal(True) first")
    p.add_argument("--aux-coef", type=float, default=1 / 32, help="AuxK's coefficient for both (0: AuxK off)")
    p.add_argument("--dead-tokens", type=int, default=None,
                   help="AuxK's dead window for both (default: TrainConfig's, a fifth of the run)")
    p.add_argument("--aux-route", choices=["rule", "ragged", "dense"], default="rule",
                   help="force one of the CPU's AuxK routes for both (default: the rule, model._dense_aux)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sae_steps.json"))
    args = p.parse_args()
    from dlmscope.io_utils import atomic_write_json

    torch.set_num_threads(args.threads)
    if args.aux_route != "rule":
        from dlmscope.sae import model

        model._dense_aux = lambda *shape: args.aux_route == "dense"
    flushed = torch.set_flush_denormal(True) if args.flush_denormal else False
    import bench_sae_train as bst  # a sibling script: its folder is on sys.path when this one runs

    x = bst.cached_activations("dlm", args.tokens + 16_384, "cpu")[:args.tokens]  # the held-out tail stays unused
    load_before = os.getloadavg()
    t0, c0 = time.time(), time.process_time()
    r = run(x, args.batch, args.latents, args.k, args.aux_coef, args.dead_tokens)
    result = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
              "torch_threads": torch.get_num_threads(), "clock": "process CPU time", "source": "dlm layer 3",
              "d_in": x.shape[1], "latents": args.latents, "k": args.k, "batch": args.batch,
              "tokens": r["steps"] * args.batch, "flush_denormal": flushed, "aux_coef": args.aux_coef,
              "dead_tokens": args.dead_tokens,
              "aux_route": args.aux_route,
              "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "wall_s": time.time() - t0, "cpu_s": time.process_time() - c0,
              "summary": report(r["records"]), "records": r["records"]}
    for label, s in result["summary"].items():
        print(f"{label}: signum_sf/adam {s['signum_sf_over_adam']['median']:.3f} {s['signum_sf_over_adam']['ci95']}, "
              + ", ".join(f"{o}/floor {s[f'{o}_over_floor']['median']:.2f}" for o in OPTIMISERS)
              + f", floor {s['floor_ms']:.1f} ms; "
              + "; ".join(f"{o} " + " ".join(f"{k} {v:.1f}" for k, v in s[f"{o}_ms"].items()) for o in OPTIMISERS)
              + "; dead " + " ".join(f"{s[f'{o}_dead_fraction']:.3f}" for o in OPTIMISERS)
              + "; AuxK steps, median positive, dense share " + ", ".join(
                  f"{o} {a['steps']} {a['positive_median'] or 0:.3f} {a['dense_share'] or 0:.2f}"
                  for o, a in ((o, s[f"{o}_aux"]) for o in OPTIMISERS)))
    print(f"load average before {load_before}, after {result['load_average_after']}")
    atomic_write_json(args.out, result)


if __name__ == "__main__":
    main()
