"""Held-out metrics of the shipped SAEs (dlmscope/saes/), measured the way `train-sae` measures its runs.

For each shipped SAE: its model, the built-in held-out split packed into 128-token rows, activations drawn
with the SAE's recorded masking policy and t-range (seed 1, as train-sae's held-out set for seed 0), the
first 8,192 activation vectors; FVU, cosine, L0 and dead fraction from `evaluate_sae`.
Writes experiments/results/shipped_saes.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _study import run_or_render  # noqa: E402

SHIPPED = ("tiny-dlm-L1-k32", "tiny-dlm-L3-k32", "tiny-ar-L1-k32", "tiny-ar-L3-k32")


def run(args) -> dict:
    import torch

    from dlmscope.activations import ActivationSource
    from dlmscope.data import builtin_corpus, pack
    from dlmscope.models import load_model
    from dlmscope.sae import load_sae
    from dlmscope.sae.metrics import evaluate_sae
    from dlmscope.training import _eval_set

    torch.set_num_threads(1)
    out = {"config": {"eval_tokens": args.eval_tokens, "context_length": 128, "seed": 1}, "saes": {}}
    for name in SHIPPED:
        sae = load_sae(name)
        lm = load_model(sae.cfg.model_name)
        rows = pack(lm.tokenizer, builtin_corpus("heldout"), 128)
        meta = sae.cfg.metadata
        src = ActivationSource(lm, [sae.cfg.hook_name], rows.input_ids, rows.doc_ids, seed=1,
                               policy=meta.get("masking_policy"), t_range=tuple(meta.get("t_range") or (0.05, 0.5)),
                               seqs_per_batch=32)
        x = _eval_set(src, args.eval_tokens)[sae.cfg.hook_name]
        m = evaluate_sae(sae, x)
        out["saes"][name] = {k: m[k] for k in ("fvu", "cosine", "l0", "dead_fraction")}
        print(name, out["saes"][name], flush=True)
    return out


def render(res: dict, out: Path) -> str:
    lines = ["| SAE | FVU | cosine | L0 | dead |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {m['fvu']:.3f} | {m['cosine']:.3f} | {m['l0']:.1f} | {100 * m['dead_fraction']:.1f}% |"
              for k, m in res["saes"].items()]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--eval-tokens", type=int, default=8192)
    run_or_render(p, "shipped_saes", run, render)


if __name__ == "__main__":
    main()
