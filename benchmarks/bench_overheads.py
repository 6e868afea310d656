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
