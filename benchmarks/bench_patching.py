"""A (layer x head) patching sweep on dlmscope-tiny-dlm: forwards, sequences and time, batched vs one run per patch,
and attribution patching's single forward + backward beside it.

Item: a Sudoku test puzzle with one empty cell's answer digit swapped for another everywhere (the study's
corruption, experiments/circuits_sudoku.py); metric logit(a) - logit(b) at the cell; each head's `attn.hook_z`
patched at every position. Forward mode (one denoising forward of prompt + 16 masks) and sampler mode (16 steps).
Times are the median of `--repeats` runs on one CPU thread, wall clock and CPU seconds of this process (a shared
machine's wall clock moves with the load; the forward counts do not). A sweep of N patches costs 2 unpatched runs
plus ceil(N / batch) patched ones; under the sampler each run is `steps` forwards.

    OMP_NUM_THREADS=1 python benchmarks/bench_patching.py [--repeats 3]

Writes benchmarks/results/patching.json.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def item(lm):
    from dlmscope.tasks import Sudoku

    ex = Sudoku().examples("test", 1, 0)[0]
    puzzle, grid = ex.meta["puzzle"], ex.meta["solution"]
    cell = puzzle.index("0")
    a = grid[cell]
    b = "1" if a != "1" else "2"
    swapped = puzzle.translate(str.maketrans({a: b, b: a}))
    digit = {d: lm.to_tokens(d, add_bos=False)[0][0] for d in "1234"}
    clean, corrupted = lm.to_tokens(ex.prompt)[0], lm.to_tokens(Sudoku.prompt(swapped))[0]
    return clean, corrupted, len(clean) + cell, digit[a], digit[b]


def timed(fn, repeats: int) -> tuple[dict, object]:
    walls, cpus, out = [], [], None
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return {"wall_s": statistics.median(walls), "cpu_s": statistics.median(cpus)}, out


def main() -> None:
    from dlmscope.analysis.patching import Patcher, PatchSetup
    from dlmscope.io_utils import atomic_write_json
    from dlmscope.models import load_model

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "patching.json")
    args = p.parse_args()
    torch.set_num_threads(1)
    lm = load_model("dlmscope-tiny-dlm")
    clean, corrupted, target, a, b = item(lm)
    rows = {}
    for mode, batches in (("forward", (1, 32)), ("sampler", (1, 32))):
        for batch in batches:
            setup = PatchSetup(clean, corrupted, target=target, answer=a, wrong=b, mode=mode, gen_length=16, steps=16,
                               batch_size=batch)
            stats, r = timed(lambda: Patcher(lm, setup).sweep("layer_head"), args.repeats)
            rows[f"{mode}, batch {batch}"] = {**stats, "forwards": r.forwards, "sequences": r.sequences,
                                              "patches": r.effect.numel(), "clean": r.clean, "corrupted": r.corrupted,
                                              "max_restored": float(r.normalised.abs().max())}
            print(mode, batch, rows[f"{mode}, batch {batch}"], flush=True)
    setup = PatchSetup(clean, corrupted, target=target, answer=a, wrong=b, gen_length=16, batch_size=32)
    stats, r = timed(lambda: Patcher(lm, setup).sweep("layer_head", attribution=True), args.repeats)
    rows["forward, batch 32 + attribution"] = {**stats, "forwards": r.forwards, "sequences": r.sequences,
                                               "patches": r.effect.numel(), "agreement": r.agreement}
    print(rows["forward, batch 32 + attribution"])
    for mode in ("forward", "sampler"):
        one, many = rows[f"{mode}, batch 1"], rows[f"{mode}, batch 32"]
        rows[f"{mode}: batched speed-up"] = {"wall": one["wall_s"] / many["wall_s"],
                                             "cpu": one["cpu_s"] / many["cpu_s"]}
    atomic_write_json(args.out, {"model": lm.name, "n_layers": lm.n_layers, "sweep": "layer_head", "threads": 1,
                                 "machine": platform.processor() or platform.machine(), "repeats": args.repeats,
                                 "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
