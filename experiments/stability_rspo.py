"""SAE feature stability of dlmscope-tiny-dlm across RSPO post-training.

Trains Top-K SAEs (layers 1 and 3, default `train-sae` settings) on the base model with seeds 0 and 1 and on
the RSPO checkpoint with seed 2, so no two SAEs share an initialisation. Reports how the base SAE transfers
to the RSPO model (FVU, L0, dead, splice dCE, per-feature correlation, top-example overlap) and how well the
RSPO SAE's decoder matches the base SAE's, next to the floor set by the base model's other-seed SAE.
The RSPO checkpoint is a 30-step `dlmscope rspo --algo rspo` run with the default settings (trained here when missing).
Writes experiments/results/stability_rspo.{json,md,html}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _study import run_or_render  # noqa: E402
from dlmscope.io_utils import atomic_write_text  # noqa: E402

LAYERS = (1, 3)


def _rspo_checkpoint(path: Path) -> Path:
    if not path.is_dir():
        from dlmscope.rl import RLConfig, train_rl

        train_rl(RLConfig(algo="rspo", rl_steps=30, checkpoint_every=15, out=str(path.parent)))
    return path


def run(args) -> dict:
    from types import SimpleNamespace

    import torch

    from dlmscope.analysis.stability import matched_similarity, stability_report
    from dlmscope.data import heldout_rows
    from dlmscope.models import load_model
    from dlmscope.sae import load_sae
    from dlmscope.training import TrainSAEConfig, train_sae

    rspo = _rspo_checkpoint(args.checkpoint)
    runs = {"base": ("dlmscope-tiny-dlm", 0), "control": ("dlmscope-tiny-dlm", 1), "rspo": (str(rspo), 2)}
    saes = {}
    for name, (model, seed) in runs.items():
        cfg = TrainSAEConfig(model=model, layers=",".join(map(str, LAYERS)), total_tokens=args.total_tokens, seed=seed,
                             out=str(ROOT / "runs"), name=f"stability-{name}", device=args.device,
                             resume=(ROOT / "runs" / f"stability-{name}" / "checkpoint.pt").is_file())
        saes[name] = train_sae(cfg).saes
    base, tuned = load_model("dlmscope-tiny-dlm", device=args.device), load_model(str(rspo), device=args.device)
    rows = heldout_rows(base.tokenizer, 128)
    res = {"config": {"checkpoint": str(args.checkpoint), "total_tokens": args.total_tokens, "n_seqs": args.n_seqs},
           "layers": {}}
    for hook in saes["base"]:
        base_sae, rspo_sae, control = (load_sae(str(saes[run][hook]), device=args.device)
                                       for run in ("base", "rspo", "control"))
        report = stability_report(base_sae, [base, tuned], rows, saes_per_checkpoint=[base_sae, rspo_sae],
                                  control_sae=control, n_seqs=args.n_seqs)
        # Chance level: random directions of the same shape (a seed no SAE init used: seed 0 would be the base init).
        noise = torch.randn(base_sae.W_dec.shape, generator=torch.Generator().manual_seed(12345))
        report["matching_random"] = matched_similarity([base_sae, SimpleNamespace(W_dec=noise)])[0]
        for m in [*report["matching"], report["matching_control"], report["matching_random"]]:
            m.pop("matched")  # keep the JSON small; the histogram below uses the quantiles
        res["layers"][hook] = report
    return res


def readme_table(res: dict) -> str:
    """The README's per-layer table: transfer of the base SAE to RSPO, feature stability, decoder matching."""
    lines = ["| layer | FVU base -> RSPO | splice ΔCE base -> RSPO | mean feature corr | top-10 overlap >= 5 | "
             "decoder match: RSPO SAE | other-seed SAE (floor) | random directions |", "|---|---|---|---|---|---|---|---|"]
    for hook, r in res["layers"].items():
        (t0, t1), f = r["transfer"], r["features"][1]
        lines.append(f"| {hook.split('.')[1]} | {t0['fvu']:.3f} -> {t1['fvu']:.3f} | {t0['delta_ce']:+.3f} -> "
                     f"{t1['delta_ce']:+.3f} | {f['mean_correlation']:.3f} | {f['top_example_overlap_ge_half']:.2f} | "
                     f"{r['matching'][0]['mean']:.3f} | {r['matching_control']['mean']:.3f} | "
                     f"{r['matching_random']['mean']:.3f} |")
    return "\n".join(lines)


def render(res: dict, out: Path) -> str:
    head = ["layer", "FVU base -> RSPO", "dead base -> RSPO", "splice dCE base -> RSPO", "mean feature corr",
            "top-10 overlap >= 5", "decoder match RSPO SAE", "decoder match other-seed SAE (floor)",
            "decoder match random directions"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for hook, r in res["layers"].items():
        (t0, t1), f, m, c = r["transfer"], r["features"][1], r["matching"][0], r["matching_control"]
        lines.append(f"| {hook.split('.')[1]} | {t0['fvu']:.4f} -> {t1['fvu']:.4f} | {t0['dead_fraction']:.3f} -> "
                     f"{t1['dead_fraction']:.3f} | {t0['delta_ce']:+.3f} -> {t1['delta_ce']:+.3f} | "
                     f"{f['mean_correlation']:.3f} | {f['top_example_overlap_ge_half']:.3f} | {m['mean']:.3f} "
                     f"({m['fraction_above_0.9']:.2f} > 0.9) | {c['mean']:.3f} ({c['fraction_above_0.9']:.2f} > 0.9) | "
                     f"{r['matching_random']['mean']:.3f} |")
    c = res["config"]
    md = (f"dlmscope-tiny-dlm vs RSPO checkpoint `{Path(c['checkpoint']).name}`; SAEs: k=32, 2048 latents, "
          f"{c['total_tokens']:,} tokens each, seeds 0 (base), 1 (base, floor), 2 (RSPO); {c['n_seqs']} held-out "
          "sequences with DLM-Scope masking, masked positions. Decoder match = mean Hungarian-matched decoder "
          "cosine against the base SAE (fraction of latents above 0.9).\n\n" + "\n".join(lines) + "\n")
    atomic_write_text(out / "stability_rspo.md", md)
    import plotly.graph_objects as go

    layers = [h.split(".")[1] for h in res["layers"]]
    fig = go.Figure()
    for key, label in (("matching", "RSPO SAE vs base SAE"), ("matching_control", "base other seed vs base SAE"),
                       ("matching_random", "random directions vs base SAE")):
        ms = [r[key][0] if key == "matching" else r[key] for r in res["layers"].values()]
        fig.add_trace(go.Bar(x=layers, y=[m["median"] for m in ms], name=label,
                             error_y={"type": "data", "symmetric": False, "array": [m["p90"] - m["median"] for m in ms],
                                      "arrayminus": [m["median"] - m["p10"] for m in ms]}))
    fig.update_layout(title="matched decoder cosine (median, p10-p90) by layer", xaxis_title="layer", barmode="group")
    atomic_write_text(out / "stability_rspo.html", fig.to_html(include_plotlyjs="cdn"))
    return md


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint", type=Path, default=ROOT / "runs" / "rl-rspo" / "checkpoint-00030")
    p.add_argument("--total-tokens", type=int, default=600_000)
    p.add_argument("--n-seqs", type=int, default=32)
    run_or_render(p, "stability_rspo", run, render)


if __name__ == "__main__":
    main()
