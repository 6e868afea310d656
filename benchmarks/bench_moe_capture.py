"""Capture overhead on MoE models (run by hand): every hook site vs a bare forward, side by side.

    python benchmarks/bench_moe_capture.py [--reps 40]

Models: tiny builders at a non-trivial size (d_model 256, 4 layers, 16 experts with 4 active, expert
width 256, vocabulary 4096), LLaDA-MoE and LLaDA 2.x layouts, batch 4 x 256 tokens, fp32, CPU with
one thread. Each repetition runs the bare forward and `run_with_cache` of every site (residual
pre/mid/post and the three router sites of every MoE layer, no early stop), interleaved, so drift
hits both; the per-repetition ratio's mean and 95% t-interval are reported.
Writes benchmarks/results/moe_capture.json.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from dlmscope import run_with_cache
from dlmscope.io_utils import atomic_write_json
from dlmscope.models import load_model
from dlmscope.models.base import parse_hook
from dlmscope.models.tiny import write_tiny_llada2, write_tiny_lladamoe

SIZE = dict(d_model=256, n_layers=4, n_heads=8, n_kv_heads=4, n_experts=16, n_active=4, d_expert=256,
            vocab_size=4096)
T_975 = {19: 2.093, 39: 2.023, 59: 2.001}  # Student t quantiles by degrees of freedom


def seconds(fn) -> tuple[float, float]:
    """(wall, process CPU) seconds of one call: with one thread, CPU time is steadier on a shared machine."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def _ratio(bare: list[float], measured: list[float]) -> tuple[float, list[float]]:
    ratios = [m / b for b, m in zip(bare, measured)]
    mean, sd = statistics.mean(ratios), statistics.stdev(ratios)
    half = T_975.get(len(ratios) - 1, 1.96) * sd / len(ratios) ** 0.5
    return mean, [mean - half, mean + half]


def paired(bare, measured, reps: int) -> dict:
    """Interleaved repetitions; per-repetition time ratios (mean, 95% t-interval), wall clock and CPU time."""
    tb, tm = [], []
    for _ in range(reps):
        tb.append(seconds(bare))
        tm.append(seconds(measured))
    (wb, cb), (wm, cm) = zip(*tb), zip(*tm)
    mean, ci = _ratio(wb, wm)
    cpu_mean, cpu_ci = _ratio(cb, cm)
    return {"bare_median_s": statistics.median(wb), "capture_median_s": statistics.median(wm),
            "ratio_of_medians": statistics.median(wm) / statistics.median(wb), "ratio_mean": mean, "ratio_ci95": ci,
            "cpu_ratio_mean": cpu_mean, "cpu_ratio_ci95": cpu_ci, "reps": reps}


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=40)
    args = ap.parse_args()
    torch.set_num_threads(1)
    result = {"setup": {**SIZE, "batch": [4, 256], "dtype": "float32", "threads": 1, "cpu": platform.processor()
                        or platform.machine()}}
    with tempfile.TemporaryDirectory() as tmp:
        builders = {"lladamoe": (write_tiny_lladamoe, {}),
                    "llada2": (write_tiny_llada2, dict(head_dim=32, n_group=4, topk_group=2, first_dense=1,
                                                       block_size=32))}
        for family, (write, extra) in builders.items():
            lm = load_model(write(Path(tmp) / family, **SIZE, **extra))
            ids = torch.randint(0, 4000, (4, 256), generator=torch.Generator().manual_seed(0))
            ids[torch.rand(ids.shape, generator=torch.Generator().manual_seed(1)) < 0.3] = lm.mask_id
            names = [n for n in lm.hook_names if not parse_hook(n)[1].startswith("attn")]  # bench_attention: the rest
            lm.forward(ids)  # warm-up
            entry = paired(lambda: lm.forward(ids), lambda: run_with_cache(lm, ids, names, stop_early=False), args.reps)
            entry["sites"] = len(names)
            result[family] = entry
            print(family, entry)
    atomic_write_json(Path(__file__).parent / "results" / "moe_capture.json", result)


if __name__ == "__main__":
    main()
