"""Dead crosscoder latents against dictionary width, token budget and AuxK settings (issue 25): the tiny DLM's
layer-1 residual stream of experiments/diff_planted.py (same text, corruption and held-out rows), the base against
itself with independent decoder starts, seed 0; AuxK at the SAE trainer's defaults or as tuned for the crosscoders
(diff_planted.AUX), with and without resampling of dead latents (`CrossCoderTrainer.resample`). Dead: never fires on the held-out rows (`evaluate_sae` density 0);
also the trainer's count of latents that did not fire in the last 30k training tokens. Writes
experiments/results/diff_dead_latents.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import diff_planted  # noqa: E402
from _study import run_or_render  # noqa: E402
from dlmscope.io_utils import atomic_write_json, atomic_write_text  # noqa: E402

DEFAULT_AUX = {"aux_coef": 1 / 32, "dead_tokens": None, "k_aux": None}  # the SAE trainer's defaults
RESAMPLE = 100  # steps between resamplings (first half of training)
RUNS = [(512, 153_600, "default", DEFAULT_AUX, 0), (512, 153_600, "tuned", diff_planted.AUX, 0),
        (512, 153_600, "tuned", diff_planted.AUX, RESAMPLE), (1024, 300_032, "default", DEFAULT_AUX, 0),
        (1024, 300_032, "tuned", diff_planted.AUX, 0), (1024, 300_032, "tuned", diff_planted.AUX, RESAMPLE)]


def run(args) -> dict:
    import torch

    from dlmscope.models import load_model

    torch.set_num_threads(1)
    base = load_model("dlmscope-tiny-dlm")
    path = args.out / "diff_dead_latents.json"
    out = json.loads(path.read_text())["runs"] if path.is_file() else []  # resumable: finished runs are kept
    for n_latents, tokens, name, aux, resample in RUNS:
        if any((r["n_latents"], r["tokens"], r["auxk"], r["resample_every"]) == (n_latents, tokens, name, resample)
               for r in out):
            continue
        cfg = {"tokens": tokens, "heldout_rows": 96, "context": 128, "task_share": 0.4, "n_latents": n_latents,
               "k": 32, "lr": 3e-3, "decoder_init": "independent"}
        s = diff_planted.stream(ROOT / "runs" / "diff_planted", cfg, [base])
        x, xh = s["train"], s["heldout"]
        tr = diff_planted.train_crosscoder(cfg, torch.cat([x, x], 1), seed=0, aux=aux, resample_every=resample)
        alive, ev = diff_planted._alive(tr, torch.cat([xh, xh], 1))
        out.append({"n_latents": n_latents, "tokens": tokens, "auxk": name, "resample_every": resample, **aux,
                    "k_aux_used": tr.k_aux, "dead_tokens_used": tr.dead_tokens,
                    "heldout_dead_fraction": 1 - float(alive.float().mean()),
                    "not_fired_30k_fraction": float((tr.since_fired >= 30_000).float().mean()), "fvu": ev["fvu"]})
        print(out[-1], flush=True)
        atomic_write_json(path, {"runs": out, "heldout_tokens": int(xh.shape[0])})
    return {"runs": out, "heldout_tokens": 96 * 128}


def readme_table(res: dict) -> str:
    lines = ["| latents | training tokens | AuxK | resampling | dead on held-out text | not fired in the last 30k tokens "
             "| FVU |", "|---|---|---|---|---|---|---|"]
    for r in res["runs"]:
        aux = (f"coefficient {r['aux_coef']:.4g}, window {r['dead_tokens_used']:,}, k_aux {r['k_aux_used']}")
        resample = f"every {r['resample_every']} steps, first half" if r["resample_every"] else "none"
        lines.append(f"| {r['n_latents']:,} | {r['tokens']:,} | {r['auxk']}: {aux} | {resample} | "
                     f"{r['heldout_dead_fraction']:.1%} | "
                     f"{r['not_fired_30k_fraction']:.1%} | {r['fvu']:.4f} |")
    return "\n".join(lines) + "\n"


def render(res: dict, out: Path) -> str:
    md = readme_table(res)
    atomic_write_text(out / "diff_dead_latents.md", md)
    return md


def main() -> None:
    run_or_render(argparse.ArgumentParser(description=__doc__), "diff_dead_latents", run, render)


if __name__ == "__main__":
    main()
