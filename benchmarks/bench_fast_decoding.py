"""Fast-dLLM decoding side by side (run by hand): threshold, prefix / dual KV cache, and both.

(a) wall clock and forward passes per generated token on a random LLaDA-shaped model (8 layers,
    d_model 512): caches only, since random weights are never confident (max probability about
    1/vocab), so a threshold there reveals one position per step like plain decoding;
(b) the same plus threshold on the trained tiny DLM (256 tokens, blocks of 32, one token per
    step for plain decoding);
(c) quality on the tiny DLM: Sudoku exact solve (100 test puzzles) and held-out NLL (64 rows, 32
    tokens), each variant against plain decoding with paired 95% intervals.
Variants run interleaved in each round; times are medians over rounds, both wall clock and this
process's CPU time (steadier when other work shares the CPU). Writes benchmarks/results/fast_decoding.json
(`--parts` reruns some parts and keeps the others).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from dlmscope import generate
from dlmscope.analysis.order import order_log_likelihood, task_accuracy
from dlmscope.stats import t_interval
from dlmscope.data import heldout_rows
from dlmscope.io_utils import atomic_write_json
from dlmscope.models import load_model
from dlmscope.models.tiny import write_tiny_llada

THRESHOLD = 0.9  # Fast-dLLM's default
VARIANTS = {"plain": {}, "threshold": {"threshold": THRESHOLD}, "prefix": {"cache": "prefix"},
            "dual": {"cache": "dual"}, "threshold+dual": {"threshold": THRESHOLD, "cache": "dual"}}


def speed(lm, prompt, variants: list[str], gen_length: int, block_length: int, rounds: int) -> dict:
    """Interleaved timings of whole generations; forward passes per generated token."""
    times: dict[str, list[float]] = {v: [] for v in variants}
    cpu: dict[str, list[float]] = {v: [] for v in variants}
    nfe: dict[str, int] = {}
    texts: dict[str, list[str] | None] = {}
    for _ in range(rounds):
        for v in variants:
            t, c = time.perf_counter(), time.process_time()
            out = generate(lm, prompt, gen_length=gen_length, steps=gen_length, block_length=block_length,
                           **VARIANTS[v])
            times[v].append(time.perf_counter() - t)
            cpu[v].append(time.process_time() - c)
            nfe[v], texts[v] = out.n_forwards, out.texts
    base, base_cpu = statistics.median(times["plain"]), statistics.median(cpu["plain"])
    return {v: {"seconds": statistics.median(times[v]), "all_seconds": times[v],
                "speedup": base / statistics.median(times[v]), "cpu_seconds": statistics.median(cpu[v]),
                "all_cpu_seconds": cpu[v], "cpu_speedup": base_cpu / statistics.median(cpu[v]),
                "forwards": nfe[v], "forwards_per_token": nfe[v] / gen_length,
                "text": (texts[v] or [None])[0]} for v in variants}


def paired(values: dict[str, torch.Tensor], base: str = "plain") -> dict:
    """Mean and 95% interval of each variant, and of its paired difference to `base`."""
    out = {}
    for v, x in values.items():
        mean, lo, hi = t_interval(x.double())
        d = t_interval(x.double() - values[base].double())
        out[v] = {"mean": mean, "ci95": [lo, hi], "diff_vs_plain": d[0], "diff_ci95": [d[1], d[2]]}
    return out


def quality(lm, n_puzzles: int, n_rows: int) -> dict:
    res: dict = {"sudoku": {}, "heldout": {}}
    acc, fw = {}, {}
    for v, kw in VARIANTS.items():
        r = task_accuracy(lm, "sudoku", "low_confidence", n=n_puzzles, steps=16, gen_length=16, batch=n_puzzles, **kw)
        acc[v] = torch.tensor(r["correct"], dtype=torch.float64)
        fw[v] = torch.tensor(r["forwards"], dtype=torch.float64)
    res["sudoku"] = {"exact_solve": paired(acc), "forwards_per_puzzle": paired(fw),
                     "setup": f"{n_puzzles} test puzzles, 16 tokens, plain = 16 steps, one block, greedy"}
    rows = heldout_rows(lm.tokenizer, 64, n_rows)
    nll, fw = {}, {}
    for v, kw in VARIANTS.items():
        nll[v], fw[v] = order_log_likelihood(lm, rows, 32, "low_confidence", 32, return_forwards=True, **kw)
    res["heldout"] = {"nll": paired({v: x.double() for v, x in nll.items()}),
                      "forwards_per_row": paired({v: x.double() for v, x in fw.items()}),
                      "setup": f"{n_rows} held-out 64-token rows, last 32 tokens revealed (teacher forced), plain = 32 steps"}
    return res


LABELS = {"threshold": f"threshold {THRESHOLD:g}", "prefix": "prefix cache", "dual": "dual cache",
          "threshold+dual": f"threshold {THRESHOLD:g} + dual cache"}


def readme_table(res: dict) -> str:
    """The README's speed table: per model and variant, forwards per token and the speedups over plain decoding."""
    lines = ["| model, setup | variant | forwards / token | speedup, CPU time | speedup, wall |", "|---|---|---|---|---|"]
    for part in ("random_model", "tiny_dlm"):
        variants = [v for v in res[part]["results"] if v != "plain"]
        for i, v in enumerate(variants):
            r = res[part]["results"][v]
            lines.append(f"| {res[part]['model'] if i == 0 else ''} | {LABELS[v]} | {r['forwards_per_token']:.2f} | "
                         f"{r['cpu_speedup']:.2f}x | {r['speedup']:.2f}x |")
    return "\n".join(lines)


def readme_summary_cell(res: dict) -> str:
    """The README benchmark summary's cell: the tiny DLM's CPU-time speedups, and the threshold's Sudoku quality."""
    r, q = res["tiny_dlm"]["results"], res["quality"]["sudoku"]
    return (f"{r['dual']['cpu_speedup']:.2f}x / {r['threshold+dual']['cpu_speedup']:.2f}x; {LABELS['threshold']}: "
            f"Sudoku {q['exact_solve']['threshold']['mean']:.2f} at {q['forwards_per_puzzle']['threshold']['mean']:.1f} "
            f"vs {q['forwards_per_puzzle']['plain']['mean']:.0f} forwards per puzzle (see Fast decoding)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="small sizes, to check the script runs")
    p.add_argument("--parts", default="random,tiny,quality", help="which parts to (re)run; the others are kept")
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    q, parts = args.quick, args.parts.split(",")
    path = Path(__file__).parent / "results" / "fast_decoding.json"
    res: dict = json.loads(path.read_text()) if path.is_file() and not q else {}
    res.pop("rounds", None)
    res |= {"threshold": THRESHOLD, "threads": 1}
    if "random" in parts:
        res["random_model"] = random_model_speed(q, args.rounds)
    tiny = load_model("dlmscope-tiny-dlm")
    gen = 64 if q else 256
    if "tiny" in parts:
        res["tiny_dlm"] = {"model": f"dlmscope-tiny-dlm, prompt 'The list type', {gen} tokens, blocks of 32, {gen} steps",
                           "rounds": args.rounds, "results": speed(tiny, ["The list type"], list(VARIANTS), gen, 32,
                                                                   args.rounds)}
        print(json.dumps(res["tiny_dlm"], indent=1), flush=True)
    if "quality" in parts:
        res["quality"] = quality(tiny, 20 if q else 100, 8 if q else 64)
        print(json.dumps(res["quality"], indent=1), flush=True)
    if not q:
        atomic_write_json(path, res)
        print(readme_table(res))


def random_model_speed(q: bool, rounds: int) -> dict:
    with torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
        d, layers, gen = (128, 2, 64) if q else (512, 8, 128)
        lm = load_model(write_tiny_llada(Path(tmp) / "random", d_model=d, n_layers=layers, n_heads=8,
                                         d_mlp=2 * d if q else 1376, vocab_size=4096))
        prompt = torch.randint(0, 4000, (1, 32), generator=torch.Generator().manual_seed(0))
        out = {"model": f"random LLaDA-shaped, {layers} layers, d_model {d}, vocab 4096, prompt 32, "
                        f"{gen} tokens, blocks of 32, {gen} steps, batch 1", "rounds": rounds,
               "results": speed(lm, prompt, ["plain", "prefix", "dual"], gen, 32, rounds)}
    print(json.dumps(out, indent=1), flush=True)
    return out


if __name__ == "__main__":
    main()
