"""The SAE lens of experiments/diff_rspo.py: Top-K SAEs on base (seeds 0 and 1), RSPO (seed 2) and the Countdown
fine-tune (seed 3), fed by the same paired stream as the crosscoders (same checkpoints, mixed text, positions),
with Hungarian-matched decoder cosine against the base SAE (seed 0) recorded as training proceeds: the other
base seed is the floor a changed model is read against, random directions are chance. A small dictionary
trained long (default 256 latents, k=16, 1M tokens) so that two seeds agree. Writes
experiments/results/diff_sae_matching.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import diff_rspo  # noqa: E402
from _study import run_or_render  # noqa: E402
from dlmscope.io_utils import atomic_write_text  # noqa: E402


def run(args) -> dict:
    import torch

    torch.set_num_threads(1)
    ckpts, _, cfg, config = diff_rspo.study_setup(args, "diff-saes", eval_every=args.eval_every)
    study = diff_rspo._study_run_class()
    study.pairs = {}
    result = study(cfg, ckpts).run()
    return {"config": config, "matching_vs_tokens": [h["matching"] for h in result.history if "matching" in h],
            "final": {k: {m: v[m] for m in ("fvu", "l0", "dead_fraction")} for k, v in result.metrics.items()}}


def render(res: dict, out: Path) -> str:
    lines = ["| tokens | base other seed (floor) | RSPO SAE | Countdown-FT SAE | random directions |", "|---|---|---|---|---|"]
    for m in res["matching_vs_tokens"]:
        lines.append(f"| {m['tokens']:,} | " + " | ".join(
            f"{m[k]['mean']:.3f} (median {m[k]['median']:.3f}, {m[k]['fraction_above_0.9']:.2f} > 0.9)"
            for k in ("base_other_seed", "rspo", "countdown", "random")) + " |")
    c = res["config"]
    fvu = " / ".join(f"{res['final'][f'sae-{n}']['fvu']:.3f}" for n in diff_rspo.SAES)
    md = (f"Mean Hungarian-matched decoder cosine against the base SAE (seed 0) (median; fraction of latents above "
          f"0.9), Top-K k={c['k']}, {c['n_latents']} latents, lr {c['lr']}, batch {c['batch_size']}, {c['hook']}, all "
          f"positions; text: built-in corpus + {c['task_share']:.0%} task tokens; Countdown checkpoint "
          f"{c['ft_steps']} steps at lr {c['ft_lr']:g}. Final held-out FVU (base s0 / base s1 / RSPO / Countdown): "
          f"{fvu}.\n\n" + "\n".join(lines) + "\n")
    atomic_write_text(out / "diff_sae_matching.md", md)
    return md

README_TOKENS = (100_000, 300_000, 500_000, 800_000, 1_000_000)  # the README's rows: the matchings nearest these


def readme_table(res: dict) -> str:
    """The README's table of diff_sae_matching.json: mean matched cosine (fraction above 0.9) at README_TOKENS."""
    ms = res["matching_vs_tokens"]
    lines = ["| tokens | base, other seed (floor) | RSPO SAE | Countdown-FT SAE | random directions (chance) |",
             "|---|---|---|---|---|"]
    for target in README_TOKENS:
        m = min(ms, key=lambda m: abs(m["tokens"] - target))
        t = m["tokens"]
        label = f"{t / 1e6:.0f}M" if t >= 999_500 else f"{t / 1e3:.0f}k"
        lines.append(f"| {label} | " + " | ".join(f"{m[k]['mean']:.3f} ({m[k]['fraction_above_0.9']:.2f})"
                                                  for k in ("base_other_seed", "rspo", "countdown"))
                     + f" | {m['random']['mean']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    diff_rspo.add_study_options(p, total_tokens=1_000_000, expansion=1, k=16)
    p.add_argument("--eval-every", type=int, default=400, help="optimiser steps (of 256 tokens) between matchings")
    run_or_render(p, "diff_sae_matching", run, render)


if __name__ == "__main__":
    main()
