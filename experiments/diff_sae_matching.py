"""The SAE lens of experiments/diff_rspo.py trained longer: only the four SAEs (base seeds 0 and 1, RSPO seed 2,
Countdown fine-tune seed 3) on the same paired stream, with Hungarian-matched decoder cosine against the base
SAE recorded as training proceeds, to see how far the other-seed floor rises with tokens.
Needs the RSPO checkpoint and runs/countdown-ft-120 (`diff_rspo.finetune_countdown(path, 120, 2e-3)`, a harder
fine-tune than diff_rspo.py's default). Writes
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

    from dlmscope.training import TrainSAEConfig

    torch.set_num_threads(1)
    work = ROOT / "runs"
    ckpts = ["dlmscope-tiny-dlm", str(args.rspo), str(work / "countdown-ft-120")]
    name = f"diff-saes-{args.total_tokens}"
    cfg = TrainSAEConfig(model=ckpts[0], layers="1", total_tokens=args.total_tokens,
                         dataset=str(diff_rspo._mixed_text(work / "diff_mixed.txt")), out=str(work), name=name,
                         eval_every=args.eval_every, checkpoint_every=args.eval_every, progress=False, seed=0,
                         batch_size=256, lr=args.lr, policy="all", expansion=4,
                         resume=(work / name / "checkpoint.json").is_file())
    study = diff_rspo._study_run_class()
    study.pairs = {}
    result = study(cfg, ckpts).run()
    return {"config": {"checkpoints": ckpts, "total_tokens": args.total_tokens, "lr": args.lr, "batch_size": 256,
                       "n_latents": 4 * 256, "policy": "all", "hook": "blocks.1.hook_resid_post"},
            "matching_vs_tokens": [h["matching"] for h in result.history if "matching" in h],
            "sae_final": {k: {m: v[m] for m in ("fvu", "l0", "dead_fraction")} for k, v in result.metrics.items()}}


def render(res: dict, out: Path) -> str:
    lines = ["| tokens | base other seed | RSPO SAE | Countdown-FT SAE | random directions |", "|---|---|---|---|---|"]
    for m in res["matching_vs_tokens"]:
        lines.append(f"| {m['tokens']:,} | " + " | ".join(f"{m[k]['mean']:.3f} ({m[k]['fraction_above_0.9']:.2f} > 0.9)"
                                                        for k in ("base_other_seed", "rspo", "countdown", "random")) + " |")
    c = res["config"]
    md = (f"Mean Hungarian-matched decoder cosine against the base SAE (seed 0) (fraction of latents above 0.9), Top-K "
          f"k=32, {c['n_latents']} latents, lr {c['lr']}, batch {c['batch_size']}, {c['hook']}, all positions:\n\n"
          + "\n".join(lines) + "\n")
    atomic_write_text(out / "diff_sae_matching.md", md)
    return md


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rspo", type=Path, default=ROOT / "runs" / "rl-rspo" / "checkpoint-00030")
    p.add_argument("--total-tokens", type=int, default=400_000)
    p.add_argument("--eval-every", type=int, default=400)
    p.add_argument("--lr", type=float, default=3e-3)
    run_or_render(p, "diff_sae_matching", run, render)


if __name__ == "__main__":
    main()
