"""Which optimiser should train our SAEs: held-out FVU at equal tokens, against sparsify's default.

Same activations as `bench_sae_train.py` (built-in DLM, layer 3, d_in 256; 4,096 latents, k 32, the last
16,384 vectors held out). For each (batch, tokens) cell -- batch 1,024 and 4,096, 300k and 1M tokens --
every config trains from scratch on the same batches in the same order:

- `adam`, `signum_sf`, `signum_sf lr/2`: our `SAETrainer` with its real schedule (`TrainConfig` defaults:
  50 warm-up steps; Adam also decays over the last 20%) and `--optimizer`;
- `sparsify` (the anchor): sparsify's SparseCoder with its default optimiser, as in `bench_sae_train.py`.

Reported: held-out FVU, and for the best of ours minus the anchor a 95% bootstrap interval over held-out
tokens (2,000 resamples; it covers evaluation noise, not seed-to-seed training noise).

    python benchmarks/bench_optimizers.py [--cells 1024:300000,4096:1000000] [--configs adam,signum_sf]

Writes benchmarks/results/optimizers.json. The committed results are the four cells, one process each (one
seed), the 300k-token ones run side by side, then the 1M-token ones:

    python benchmarks/bench_optimizers.py --cells 1024:300000 --configs adam,signum_sf \
        --out benchmarks/results/optimizers_b1024.json
    python benchmarks/bench_optimizers.py --cells 4096:300000 --configs adam,signum_sf \
        --out benchmarks/results/optimizers_b4096.json
    python benchmarks/bench_optimizers.py --cells 1024:1000000 --configs adam,signum_sf \
        --out benchmarks/results/optimizers_b1024_1m.json
    python benchmarks/bench_optimizers.py --cells 4096:1000000 --configs adam,signum_sf \
        --out benchmarks/results/optimizers_b4096_1m.json

and a second sweep with the half-lr `signum_sf` (one process per cell, two at a time), into
`optimizers_b1024_lrhalf.json`, `optimizers_b4096_lrhalf.json` (`--configs "signum_sf,signum_sf lr/2"`, the
300k cells), `optimizers_b1024_1m_lrhalf.json` (`--configs "adam,signum_sf lr/2"`) and
`optimizers_b4096_1m_lrhalf.json` (`--configs "signum_sf,signum_sf lr/2"`).
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {"adam": ("adam", 1.0), "signum_sf": ("signum_sf", 1.0), "signum_sf lr/2": ("signum_sf", 0.5)}


class OurTrainer:
    def __init__(self, optimizer: str, lr_factor: float, latents: int, k: int, total: int, batch: int, d: int):
        from dlmscope.sae import SAEConfig, SAETrainer, TrainConfig
        from dlmscope.sae.optim import default_lr

        self.tr = SAETrainer(SAEConfig(d, latents, k), TrainConfig(total_tokens=total, batch_size=batch,
                                                                   optimizer=optimizer,
                                                                   lr=default_lr(optimizer, latents) * lr_factor))

    def step(self, x):
        self.tr.step(x)

    def reconstruct(self, x):
        with torch.no_grad(), self.tr.averaged():
            return self.tr.sae.reconstruct(x)


def per_token(x: torch.Tensor, x_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared error and squared deviation from the mean per held-out token: FVU = sum(err) / sum(dev)."""
    x, x_hat = x.double(), x_hat.double()
    return (x - x_hat).pow(2).sum(1), (x - x.mean(0)).pow(2).sum(1)


def bootstrap_difference(a: tuple, b: tuple, n: int = 2000) -> list[float]:
    """95% interval of FVU(a) - FVU(b) over resampled held-out tokens (the same resample for both)."""
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, a[0].shape[0], (n, a[0].shape[0]), generator=gen)
    diff = a[0][idx].sum(1) / a[1][idx].sum(1) - b[0][idx].sum(1) / b[1][idx].sum(1)
    return [float(diff.quantile(0.025)), float(diff.quantile(0.975))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cells", default="1024:300000,1024:1000000,4096:300000,4096:1000000",
                   help="comma-separated batch:tokens")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--latents", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--heldout", type=int, default=16_384)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "optimizers.json"))
    args = p.parse_args()
    from dlmscope.io_utils import atomic_write_json

    torch.set_num_threads(args.threads)
    import bench_sae_train as bst  # a sibling script: its folder is on sys.path when this one runs

    cells = [tuple(int(v) for v in c.split(":")) for c in args.cells.split(",")]
    x = bst.cached_activations("dlm", max(t for _, t in cells) + args.heldout, "cpu")
    train, held = x[:-args.heldout], x[-args.heldout:]
    d, lr_adam = x.shape[1], 2e-4 / (args.latents / 2**14) ** 0.5
    results = {"machine": platform.processor() or platform.machine(), "torch_threads": args.threads,
               "source": "dlm layer 3", "d_in": d, "latents": args.latents, "k": args.k,
               "heldout_tokens": args.heldout, "cells": []}
    t_start, cpu_start = time.time(), time.process_time()  # wall, and this process's CPU time (a loaded machine)
    for batch, tokens in cells:
        steps = tokens // batch
        runners = {name: OurTrainer(*CONFIGS[name], args.latents, args.k, steps * batch, batch, d)
                   for name in args.configs.split(",")}
        runners["sparsify"] = bst.Sparsify(d, args.latents, args.k, lr_adam, steps * batch, batch,
                                           min(10_000_000, steps * batch // 5), "cpu")
        for i in range(steps):
            b = train[i * batch:(i + 1) * batch]
            for r in runners.values():
                r.step(b)
        errs = {name: per_token(held, r.reconstruct(held)) for name, r in runners.items()}
        fvu = {name: float(e.sum() / v.sum()) for name, (e, v) in errs.items()}
        best = min((n for n in fvu if n != "sparsify"), key=fvu.get)
        cell = {"batch": batch, "tokens": steps * batch, "fvu": fvu, "best_ours": best,
                "best_minus_sparsify": fvu[best] - fvu["sparsify"],
                "best_minus_sparsify_ci95": bootstrap_difference(errs[best], errs["sparsify"])}
        results["cells"].append(cell)
        print(f"batch {batch}, {steps * batch} tokens: " + ", ".join(f"{n} {v:.4f}" for n, v in fvu.items())
              + f"; best ours - sparsify {cell['best_minus_sparsify']:+.4f} {cell['best_minus_sparsify_ci95']}")
        atomic_write_json(args.out, {**results, "seconds_so_far": time.time() - t_start,
                                     "cpu_seconds_so_far": time.process_time() - cpu_start})
    results.update(seconds=time.time() - t_start, cpu_seconds=time.process_time() - cpu_start)
    atomic_write_json(args.out, results)


if __name__ == "__main__":
    main()
