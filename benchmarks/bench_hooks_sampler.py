"""Overhead of dlmscope's hooks and sampler, measured side by side (run by hand).

(a) capture: `run_with_cache` of every layer's resid_post (no early stop) vs a bare forward;
(b) sampler: `dlmscope.generate` vs a minimal reference loop written below (same model, same LLaDA
    block schedule, low_confidence, temperature 0; the two must produce the same tokens).

Repetitions are interleaved (A, B, A, B, ...) so machine drift hits both sides; the table reports
the ratio of medians and the median of the per-repetition ratios. Targets: capture <= 1.05,
sampler <= 1.10.

    python benchmarks/bench_hooks_sampler.py [--quick] [--threads N] [--vocab V]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from dlmscope import generate, run_with_cache
from dlmscope.io_utils import atomic_write_json
from dlmscope.models.checkpoint import wrap_decoder
from dlmscope.models.tiny import tiny_llama

RESULTS = Path(__file__).parent / "results" / "hooks_sampler.json"


def side_by_side(baseline, measured, reps: int, warm_up: bool = True) -> dict:
    """Interleaved timings of two callables, after one warm-up call each."""
    if warm_up:
        baseline(), measured()
    tb, tm = [], []
    for _ in range(reps):
        for fn, out in ((baseline, tb), (measured, tm)):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
    return {"baseline_s": statistics.median(tb), "measured_s": statistics.median(tm),
            "ratio": statistics.median(tm) / statistics.median(tb),
            "median_paired_ratio": statistics.median(m / b for m, b in zip(tm, tb)), "reps": reps}


@torch.no_grad()
def reference_generate(lm, prompt: torch.Tensor, mask_id: int, gen_length: int, steps: int,
                       block_length: int) -> torch.Tensor:
    """The least a block sampler must do: forward, argmax, confidence, unmask the top n in the block."""
    B, P = prompt.shape
    x = torch.cat([prompt, torch.full((B, gen_length), mask_id, dtype=torch.long)], 1)
    n_blocks = gen_length // block_length
    per_block = steps // n_blocks
    for block in range(n_blocks):
        lo, hi = P + block * block_length, P + (block + 1) * block_length
        n = block_length  # every row starts the block fully masked
        counts = [n // per_block + (i < n % per_block) for i in range(per_block)]
        for k in counts:
            logits = lm.forward(x)
            x0 = logits.argmax(-1)
            conf = torch.exp(logits.gather(-1, x0[..., None]).squeeze(-1) - torch.logsumexp(logits, -1))
            region = conf[:, lo:hi].masked_fill(x[:, lo:hi] != mask_id, float("-inf"))
            idx = region.topk(k, dim=1).indices + lo
            x.scatter_(1, idx, x0.gather(1, idx))
    return x


def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small model and few repetitions (smoke run)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=0, help="repetitions per side (0 = default for the mode)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    d, layers, B, L = (128, 2, 2, 64) if args.quick else (512, 6, 8, 256)
    gen, block, steps = L // 4, L // 16, L // 16  # 4 blocks of 4 steps, 4 tokens per step
    torch.manual_seed(0)
    module = tiny_llama(d_model=d, n_layers=layers, n_heads=8, d_mlp=4 * d, vocab_size=args.vocab)
    mask_id = args.vocab - 1
    lm = wrap_decoder(module, family="llada", name="bench", tokenizer=None, mask_id=mask_id, shift=False, causal=False)
    ids = torch.randint(0, mask_id, (B, L))
    prompt = ids[:, : L - gen]
    hooks = [f"blocks.{i}.hook_resid_post" for i in range(layers)]
    reps_fwd, reps_gen = (3, 2) if args.quick else (10, 3)
    if args.reps:
        reps_fwd = reps_gen = args.reps

    same = torch.equal(reference_generate(lm, prompt, mask_id, gen, steps, block),
                       generate(lm, prompt, gen_length=gen, steps=steps, block_length=block).sequences)
    with torch.no_grad():
        capture = side_by_side(lambda: lm.forward(ids), lambda: run_with_cache(lm, ids, hooks, stop_early=False),
                               reps_fwd)
    sampler = side_by_side(lambda: reference_generate(lm, prompt, mask_id, gen, steps, block),
                           lambda: generate(lm, prompt, gen_length=gen, steps=steps, block_length=block), reps_gen,
                           warm_up=False)  # the token comparison above was the warm-up
    res = {
        "model": f"Llama-architecture DLM, {layers} layers, d_model {d}, vocab {args.vocab}, batch {B} x {L}",
        "sampler_settings": {"gen_length": gen, "steps": steps, "block_length": block,
                             "remasking": "low_confidence", "temperature": 0.0},
        "machine": {"cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "python": platform.python_version(), "processor": platform.processor() or platform.machine()},
        "capture_vs_forward": {**capture, "target": 1.05},
        "sampler_vs_reference": {**sampler, "target": 1.10, "same_tokens": same},
    }
    if not args.quick:
        atomic_write_json(args.out, res)
    print(res["model"], f"| {torch.get_num_threads()} threads")
    print(f"{'comparison':<22}{'baseline s':>12}{'dlmscope s':>12}{'ratio':>8}{'paired':>8}{'target':>8}")
    for key in ("capture_vs_forward", "sampler_vs_reference"):
        r = res[key]
        print(f"{key:<22}{r['baseline_s']:>12.4f}{r['measured_s']:>12.4f}{r['ratio']:>8.3f}"
              f"{r['median_paired_ratio']:>8.3f}{r['target']:>8.2f}")
    print("sampler tokens identical to the reference loop:", same)
    return res


if __name__ == "__main__":
    main()
