"""Cost of the attention hook sites (run by hand): capturing them vs a bare forward, side by side.

    python benchmarks/bench_attention.py [--reps 15]

Model: the built-in dlmscope-tiny-dlm (6 layers, d_model 256, 4 heads of 64), fp32, CPU, one thread,
batch 4 at 128 and 512 tokens. Variants, each interleaved with a bare forward and reported as the
per-repetition time ratio of process CPU time and of wall clock (mean, 95% t-interval;
`bench_moe_capture.paired`):
- `all attention sites`: `run_with_cache` of every `attn.hook_*` and `hook_attn_out` of every layer (the
  pattern hook switches attention from the fused SDPA kernel to explicit softmax(QK^T)V);
- `all but the pattern`: the same without `hook_pattern` (the fused kernel stays);
- `pattern only`: `hook_pattern` of every layer;
- `TransformerLens forward` / `TransformerLens run_with_cache`: the model converted by
  `to_hooked_transformer` (always explicit attention), bare and caching everything.
Writes benchmarks/results/attention_capture.json.
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import torch

from dlmscope import load_model, run_with_cache, to_hooked_transformer
from dlmscope.io_utils import atomic_write_json
from dlmscope.models.attention import ATTN_SITES

LENGTHS = (128, 512)


def variants(lm, ht, ids):
    layers = range(lm.n_layers)
    every = [f"blocks.{i}.attn.hook_{s}" for i in layers for s in ATTN_SITES]
    every += [f"blocks.{i}.hook_attn_out" for i in layers]
    no_pattern = [n for n in every if not n.endswith("pattern")]
    patterns = [n for n in every if n.endswith("pattern")]
    return {
        "all attention sites": (len(every), lambda: run_with_cache(lm, ids, every, stop_early=False)),
        "all but the pattern": (len(no_pattern), lambda: run_with_cache(lm, ids, no_pattern, stop_early=False)),
        "pattern only": (len(patterns), lambda: run_with_cache(lm, ids, patterns, stop_early=False)),
        "TransformerLens forward": (0, lambda: ht(ids)),
        "TransformerLens run_with_cache": (len(ht.hook_dict), lambda: ht.run_with_cache(ids)),
    }


@torch.no_grad()
def main() -> None:
    from bench_moe_capture import paired

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(1)
    lm = load_model("dlmscope-tiny-dlm")
    ht = to_hooked_transformer(lm)
    result = {"setup": {"model": lm.name, "n_layers": lm.n_layers, "d_model": lm.d_model, "batch": 4,
                        "lengths": list(LENGTHS), "dtype": "float32", "threads": 1,
                        "cpu": platform.processor() or platform.machine(), "reps": args.reps}, "runs": []}
    for length in LENGTHS:
        ids = torch.randint(4, lm.vocab_size, (4, length), generator=torch.Generator().manual_seed(0))
        lm.forward(ids)  # warm-up
        for name, (sites, fn) in variants(lm, ht, ids).items():
            fn()
            entry = {"length": length, "variant": name, "sites": sites,
                     **paired(lambda: lm.forward(ids), fn, args.reps)}
            result["runs"].append(entry)
            print(length, name, {k: entry[k] for k in ("ratio_mean", "ratio_ci95", "bare_median_s")})
    atomic_write_json(Path(__file__).parent / "results" / "attention_capture.json", result)


def readme_table(result: dict) -> str:
    rows = ["| tokens | variant | sites | bare forward | CPU time vs bare | wall clock vs bare |", "|---|---|---|---|---|---|"]
    for r in result["runs"]:
        (lo, hi), (clo, chi) = r["ratio_ci95"], r["cpu_ratio_ci95"]
        rows.append(f"| 4 x {r['length']} | {r['variant']} | {r['sites']} | {r['bare_median_s'] * 1000:.0f} ms | "
                    f"{r['cpu_ratio_mean']:.2f}x [{clo:.2f}, {chi:.2f}] | {r['ratio_mean']:.2f}x [{lo:.2f}, {hi:.2f}] |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
