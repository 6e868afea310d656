"""Overheads measured side by side, interleaved, median of repetitions (run by hand).

(a) capture: `run_with_cache` of every layer (no early stop) vs a bare forward;
(b) sampler: `dlmscope.generate` vs a minimal reference loop written here (same schedule, low confidence);
(c) steering: steered vs unsteered generation with the shipped SAE.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

from dlmscope import generate, run_with_cache
from dlmscope.analysis.steering import SteeringSpec, steer
from dlmscope.models.checkpoint import wrap_decoder
from dlmscope.models.tiny import tiny_llama


def timed(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def pair(a, b, reps: int) -> dict:
    ta, tb = [], []
    for _ in range(reps):  # interleaved so drift hits both
        ta += timed(a, 1)
        tb += timed(b, 1)
    ma, mb = statistics.median(ta), statistics.median(tb)
    return {"baseline_s": ma, "measured_s": mb, "ratio": mb / ma}


@torch.no_grad()
def reference_loop(lm, x, mask_id, steps):
    """The least a sampler can do: forward, argmax, confidence, unmask the top n."""
    per = (x == mask_id).sum(1) // steps
    for _ in range(steps):
        mask = x == mask_id
        logits = lm.forward(x)
        p = torch.softmax(logits.float(), -1)
        conf, x0 = p.max(-1)
        conf = conf.masked_fill(~mask, -1)
        idx = conf.topk(int(per[0]), dim=1).indices
        x = x.scatter(1, idx, x0.gather(1, idx))
    return x


TARGETS = {"capture_vs_forward": "capture of every layer vs bare forward",
           "sampler_vs_reference": "`generate` vs a minimal reference sampling loop",
           "steering_vs_plain": "steered vs plain generation (SAE at every step)"}
LIMITS = {"capture_vs_forward": 5, "sampler_vs_reference": 10, "steering_vs_plain": 15}  # % slower at most


def readme_table(overheads: dict, sae_train: dict, sae_train_1m: dict, sae_train_1m_b1024: dict, explorer: dict,
                 fast_decoding: dict) -> str:
    """The README's benchmark summary: this script's overheads, then a row or two from each other benchmark."""
    import bench_explorer
    import bench_fast_decoding
    import bench_sae_train

    lines = ["| benchmark | what is compared | result |", "|---|---|---|"]
    for i, (key, words) in enumerate(TARGETS.items()):
        r = overheads[key]["ratio"]
        note = "no measurable overhead; " if key == "capture_vs_forward" and r <= 1 else ""
        label = f"| `bench_overheads.py` ({overheads['model']}) |" if i == 0 else "| |"
        lines.append(f"{label} {words} | {r:.2f}x ({note}target: at most {LIMITS[key]}% slower) |")
    for j, res in enumerate((sae_train, sae_train_1m, sae_train_1m_b1024)):
        total = res["train_tokens"] + res["heldout_tokens"]
        tokens = float(f"{total:.1g}")
        label = (f"`bench_sae_train.py` (DLM layer 3, {res['latents']:,} latents, k {res['k']}, batch {res['batch']:,}, "
                 f"{tokens / 1e3:.0f}k tokens)" if j == 0 else f"`bench_sae_train.py --tokens {tokens:.0f}"
                 + (f" --batch {res['batch']}` (our default batch)" if res["batch"] != sae_train["batch"] else "`"))
        lines += bench_sae_train.readme_rows(res, label, first=j == 0)
    lines.append(f"| `bench_explorer.py` | store vs live feature data | {bench_explorer.readme_cell(explorer)} |")
    lines.append("| `bench_fast_decoding.py` (Fast-dLLM; tiny DLM, 256 tokens, blocks of 32) | dual cache / "
                 f"{bench_fast_decoding.LABELS['threshold+dual']} vs plain (CPU time) | "
                 f"{bench_fast_decoding.readme_summary_cell(fast_decoding)} |")
    return "\n".join(lines)


def main(quick: bool = "--quick" in sys.argv) -> dict:
    torch.manual_seed(0)
    d, layers, B, L = (256, 4, 4, 128) if quick else (512, 6, 8, 256)
    module = tiny_llama(d_model=d, n_layers=layers, n_heads=8, d_mlp=4 * d, vocab_size=4096)
    lm = wrap_decoder(module, family="llada", name="bench", tokenizer=None, mask_id=4095, shift=False, causal=False)
    ids = torch.randint(0, 4000, (B, L))
    hooks = [f"blocks.{i}.hook_resid_post" for i in range(layers)]
    reps = 5 if quick else 10
    res = {"model": f"{layers} layers, d_model {d}, batch {B} x {L}"}
    with torch.no_grad():
        res["capture_vs_forward"] = pair(lambda: lm.forward(ids), lambda: run_with_cache(lm, ids, hooks, stop_early=False), reps)
    prompt, gen, steps = ids[:, :L // 2], L // 2, 16
    x = torch.cat([prompt, torch.full((B, gen), 4095)], 1)
    res["sampler_vs_reference"] = pair(lambda: reference_loop(lm, x.clone(), 4095, steps),
                                       lambda: generate(lm, prompt, gen_length=gen, steps=steps, block_length=gen), 3)
    from dlmscope.models import load_model
    from dlmscope.sae import load_sae

    tiny, sae = load_model("dlmscope-tiny-dlm"), load_sae("tiny-dlm-L3-k32")
    prompts = ["The list type", "A dictionary is", "The import statement", "Exceptions are"]

    def steered():
        with steer(tiny, sae, SteeringSpec(100, 4.0)):
            generate(tiny, prompts, gen_length=32, steps=32, block_length=32)

    res["steering_vs_plain"] = pair(lambda: generate(tiny, prompts, gen_length=32, steps=32, block_length=32), steered, reps)
    out = Path(__file__).parent / "results" / "overheads.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    for k, v in res.items():
        print(k, v if isinstance(v, str) else f"ratio {v['ratio']:.3f} ({v['baseline_s']:.3f}s vs {v['measured_s']:.3f}s)")
    return res


if __name__ == "__main__":
    main()
