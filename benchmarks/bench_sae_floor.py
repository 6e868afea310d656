"""Our SAE training step as a multiple of its floor, measured side by side in one run.

The floor of a Top-K SAE step is what no trainer can skip: one dense encode GEMM (N, d_in) @ (d_in, n_latents)
and the top-k over its rows, at the same shape and dtype (on CPU into a reused output buffer). Everything else
a step does (bias, sparse backward, decode, AuxK, optimiser, decoder renormalisation) is overhead over it.
Steps and floors alternate (so drifting background load hits both alike) and the medians are compared; on CPU
the clock is this process's CPU time (run it with one thread), which a busy shared machine does not inflate,
on GPUs wall time after synchronising.

This is a best case, not a training run: one random batch stepped 18 times, no warm-up, hardly any dead latents
(so almost no AuxK), and batch 4,096, over which the costs that scale with the dictionary rather than the batch
(the optimiser's passes over W_enc and W_dec, the decoder's projection and renormalisation: about 9 ms a step at
4,096 x 256) are spread. `bench_sae_steps.py` times every step of a real run (the DLM's activations, the default
schedule, AuxK once latents die) for both optimisers against the floor, and reports the medians of the paired
ratios; at batch 1,024 those are far above this file's.

    python benchmarks/bench_sae_floor.py                       # CPU, one thread: d_in 256, 4,096 latents, k 32
    python benchmarks/bench_sae_floor.py --activations dlm     # the same on a batch of the DLM's activations
    python benchmarks/bench_sae_floor.py --device cuda --d-in 4096 --latents 16384 --k 64   # LLaDA-8B width

Writes benchmarks/results/sae_floor.json (CPU) or the file given by --out.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def step_vs_floor(d_in: int, latents: int, k: int, batch: int, device: str, repeats: int = 10,
                  warmup: int = 3, optimizer: str = "adam", x: torch.Tensor | None = None) -> dict:
    """Median seconds of our training step and of the floor (encode GEMM + top-k), interleaved; on one random batch
    (a mean offset, like residual streams) unless `x` (batch, d_in) is given."""
    from dlmscope.sae import SAEConfig, SAETrainer, TrainConfig

    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(batch, d_in, generator=gen) + 0.5) if x is None else x
    x = x.to(device)
    total = batch * (warmup + repeats + 1)
    cuda = device.startswith("cuda")
    tr = SAETrainer(SAEConfig(d_in, latents, k), TrainConfig(total_tokens=total, batch_size=batch, warmup_steps=0,
                                                             decay_fraction=0.0, autocast_bf16=cuda,
                                                             optimizer=optimizer), device)
    w = tr.sae.W_enc.detach()
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    buf = torch.empty(batch, latents, device=device)

    def floor() -> None:
        if cuda:  # bf16, as our step runs under autocast there
            with torch.autocast("cuda", dtype=torch.bfloat16):
                (x @ w).topk(k, dim=-1, sorted=False)
        else:  # into a reused buffer: the floor at its fastest, without page faults
            torch.mm(x, w, out=buf).topk(k, dim=-1, sorted=False)

    clock = time.perf_counter if cuda else time.process_time  # CPU: this process's CPU time, robust to a busy machine
    times: dict[str, list[float]] = {"step": [], "floor": []}
    for i in range(warmup + repeats):
        for name, fn in (("step", lambda: tr.step(x)), ("floor", floor)):
            sync()
            t = clock()
            fn()
            sync()
            if i >= warmup:
                times[name].append(clock() - t)
    step, fl = statistics.median(times["step"]), statistics.median(times["floor"])
    pairs = [a / b for a, b in zip(times["step"], times["floor"])]  # each step against the floor timed next to it
    return {"clock": "wall" if cuda else "process CPU time", "d_in": d_in, "latents": latents, "k": k, "batch": batch,
            "device": device, "optimizer": optimizer,
            "repeats": repeats, "step_s": step, "floor_s": fl, "step_over_floor": step / fl,
            "paired_ratio_quartiles": statistics.quantiles(pairs, n=4) if len(pairs) > 1 else pairs * 3,
            "tokens_per_s": batch / step}


GOAL = 1.2  # the step may cost at most this many floors


def readme_row(res: dict) -> str:
    """The README scale table's row: our SAE step over its floor against GOAL."""
    r = res["step_over_floor"]
    verdict = "not met" if r > GOAL else "met at the margin" if r > GOAL - 0.01 else "met"
    return (f"| `bench_sae_floor.py` (d_in {res['d_in']}, {res['latents']:,} latents, k {res['k']}, batch "
            f"{res['batch']:,}, {'one thread' if res['torch_threads'] == 1 else str(res['torch_threads']) + ' threads'}"
            f", CPU time) | our SAE step vs its floor (one encode GEMM + top-k) | {r:.2f}x (goal <= {GOAL}x: {verdict}) |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d-in", type=int, default=256)
    p.add_argument("--latents", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--activations", choices=["random", "dlm"], default="random",
                   help="one random batch, or the first batch of the DLM's layer-3 activations (bench_sae_train.py)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sae_floor.json"))
    args = p.parse_args()
    from dlmscope.io_utils import atomic_write_json

    torch.set_num_threads(args.threads)
    x = None
    if args.activations == "dlm":
        import bench_sae_train as bst  # a sibling script: its folder is on sys.path when this one runs

        x = bst.cached_activations("dlm", args.batch, "cpu")
        args.d_in = x.shape[1]
    r = step_vs_floor(args.d_in, args.latents, args.k, args.batch, args.device, args.repeats, x=x)
    r.update(torch_threads=torch.get_num_threads(), machine=platform.processor() or platform.machine(),
             activations=args.activations)
    print(f"d_in {r['d_in']}, {r['latents']} latents, k {r['k']}, batch {r['batch']} on {r['device']}: step "
          f"{r['step_s'] * 1e3:.1f} ms, floor {r['floor_s'] * 1e3:.1f} ms, ratio {r['step_over_floor']:.2f}x (paired "
          f"ratios' quartiles {', '.join(f'{q:.2f}' for q in r['paired_ratio_quartiles'])})")
    atomic_write_json(args.out, r)


if __name__ == "__main__":
    main()
