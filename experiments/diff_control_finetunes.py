"""The three Countdown fine-tunes tried as the diffing study's positive control, side by side: which weights each
trains, its held-out ELBO loss on built-in prose and on Countdown and Sudoku test problems before and after, and how
far it moves the diffed activations (layer 1 residual) on each (`diff_rspo.finetune_eval`). Fine-tunes are cached in
runs/ (the study's folders). Writes experiments/results/diff_control_finetunes.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import diff_rspo  # noqa: E402
from _study import run_or_render  # noqa: E402
from dlmscope.io_utils import atomic_write_text  # noqa: E402

# (steps, lr, params, preserve, preserve_on): the first try, the second (diff_rspo's default), the narrow one, and
# the narrow one preserving Sudoku too
NARROW = "model.layers.0.mlp,model.layers.1.mlp"
FINETUNES = [(120, 5e-4, "all", 0.0, "prose"), (300, 2e-3, "all", 0.0, "prose"), (300, 2e-3, NARROW, 10.0, "prose"),
             (300, 2e-3, NARROW, 10.0, "prose,sudoku")]


def run(args) -> dict:
    import torch

    from dlmscope.models import load_model

    torch.set_num_threads(1)
    base, out = load_model("dlmscope-tiny-dlm"), {}
    for steps, lr, params, preserve, on in FINETUNES:
        name = f"countdown-ft-{steps}-lr{lr:g}{diff_rspo._ft_tag(params, preserve, on)}"
        folder = diff_rspo.finetune_countdown(ROOT / "runs" / name, steps, lr, params, preserve, on)
        # evaluated again: fine-tunes cached before Sudoku joined the evaluation lack it in finetune.json
        out[name] = json.loads((folder / "finetune.json").read_text()) | {
            "eval": diff_rspo.finetune_eval(base, load_model(str(folder)))}
    return out


def render(res: dict, out: Path) -> str:
    kinds = ("prose", "countdown", "sudoku")
    lines = ["| fine-tune | weights trained | preservation: weight, text | "
             + " | ".join(f"ELBO, {k}: base -> fine-tune" for k in kinds) + " | "
             + " | ".join(f"activation change, {k}" for k in kinds) + " |",
             "|" + "---|" * 9]
    for name, f in res.items():
        e = f["eval"]
        keep = f"{f['preserve']:g}, {f.get('preserve_on', 'prose')}" if f["preserve"] else "none"
        lines.append(f"| {f['steps']} steps, lr {f['lr']:g} | {f['params']} ({f['n_trained']:,}) | {keep} | "
                     + " | ".join(f"{e[k]['loss_base']:.3f} -> {e[k]['loss_ft']:.3f}" for k in kinds) + " | "
                     + " | ".join(f"{e[k]['drift']:.4f}" for k in kinds) + " |")
    md = ("Countdown fine-tunes (AdamW, batch 16 x 64 tokens, Countdown problems only). ELBO: held-out "
          "masked-diffusion loss, the same corruption for both checkpoints, 64 rows each of built-in held-out prose, "
          "Countdown and Sudoku test problems. Activation change: sum |h_ft - h_base|^2 / sum |h_base|^2 of the layer-1 "
          "residual (the diffed hook) on those corrupted rows, every position.\n\n" + "\n".join(lines) + "\n")
    atomic_write_text(out / "diff_control_finetunes.md", md)
    return md

# README labels of FINETUNES, in their order, and of what they trained
TRIES = ("first try", "second, the study's", "third", "fourth")
TRAINED = {"all": "all", NARROW: "layers 0-1 MLPs"}


def _lr(lr: float) -> str:
    """5e-04 -> '5e-4'."""
    mantissa, exponent = f"{lr:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def readme_table(res: dict) -> str:
    """The README's table of diff_control_finetunes.json: one row per fine-tune, in FINETUNES order."""
    kinds = ("prose", "countdown", "sudoku")
    lines = ["| Countdown fine-tune | weights trained | preservation | ELBO, prose: base -> fine-tune | ELBO, Countdown | "
             "ELBO, Sudoku | activation change: prose / Countdown / Sudoku |", "|" + "---|" * 7]
    for f, tries in zip(res.values(), TRIES):
        e = f["eval"]
        keep = f"{f['preserve']:g}, {diff_rspo.PRESERVED[f.get('preserve_on', 'prose')]}" if f["preserve"] else "none"
        lines.append(f"| {f['steps']} steps, lr {_lr(f['lr'])} ({tries}) | {TRAINED[f['params']]} ({f['n_trained']:,}) | "
                     f"{keep} | " + " | ".join(f"{e[k]['loss_base']:.3f} -> {e[k]['loss_ft']:.3f}" for k in kinds)
                     + " | " + " / ".join(f"{e[k]['drift']:.4f}" for k in kinds) + " |")
    return "\n".join(lines)


def main() -> None:
    run_or_render(argparse.ArgumentParser(description=__doc__), "diff_control_finetunes", run, render)


if __name__ == "__main__":
    main()
