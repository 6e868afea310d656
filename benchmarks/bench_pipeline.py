"""How long the SAE steps wait for activations, with and without the background prefetch thread.

Runs `train-sae` at its default shape (built-in DLM, layers 1 and 3, k 32, 2,048 latents, batch 1,024,
65,536-token shuffle buffer) for a short budget, from the live model and from a disk cache, each with
`--prefetch` off and on (alternating, so drifting background load hits both alike). Reported per run:
the fraction of training wall time spent inside `buffer.next()` (making, shuffling and copying the
batch while no SAE step runs) and tokens/s. Both settings train on the same batches in the same order.

    python benchmarks/bench_pipeline.py [--tokens 131072] [--threads 1]

Writes benchmarks/results/pipeline.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def one_run(out: Path, name: str, tokens: int, threads: int, prefetch: bool, cache: str = "") -> dict:
    from dlmscope.training import TrainSAEConfig, train_sae

    cfg = TrainSAEConfig(total_tokens=tokens, threads=threads, prefetch=prefetch, activation_cache=cache, out=str(out),
                         name=name, progress=False, checkpoint_every=10**6)
    result = train_sae(cfg)
    m = json.loads((result.folder / "metrics.json").read_text())
    return {"seconds": m["seconds"], "wait_seconds": m["input_wait_seconds"],
            "wait_fraction": m["input_wait_seconds"] / m["seconds"], "tokens_per_s": tokens / m["seconds"],
            "fvu": {k: v["fvu"] for k, v in m["final"].items()}}


def readme_table(pipeline: dict, copy_draw: dict, cache: dict, sae_floor: dict) -> str:
    """The README's scale table: this script's prefetch runs and the earlier shuffle buffer's, then a row each from
    bench_cache and bench_sae_floor."""
    import bench_cache
    import bench_sae_floor

    head = f"`bench_pipeline.py` (default `train-sae` shape, {pipeline['tokens']:,} tokens, from the "
    lines = ["| benchmark | what is compared | result |", "|---|---|---|"]
    for source, words in (("model", "live model"), ("cache", "disk cache")):
        off, on = pipeline["runs"][f"{source}, prefetch off"], pipeline["runs"][f"{source}, prefetch on"]
        same = "identical FVU" if off["fvu"] == on["fvu"] else "different FVU"
        lines.append(f"| {head}{words}) | SAE steps waiting for activations, prefetch off -> on | "
                     f"{off['wait_fraction']:.1%} -> {on['wait_fraction']:.1%} of wall time; {off['tokens_per_s']:,.0f} -> "
                     f"{on['tokens_per_s']:,.0f} tok/s ({pipeline[f'{source}_speedup']:.2f}x); {same} |")
    old, new = copy_draw["runs"]["cache, prefetch off"], pipeline["runs"]["cache, prefetch off"]
    lines.append("| `bench_pipeline.py`, the same from the disk cache with the previous shuffle buffer "
                 "(`pipeline_copy_draw.json`, a run minutes earlier) | waiting, prefetch off: copy of the whole buffer per "
                 f"draw -> in-place draw | {old['wait_fraction']:.1%} -> {new['wait_fraction']:.1%} of wall time; "
                 f"{old['tokens_per_s']:,.0f} -> {new['tokens_per_s']:,.0f} tok/s |")
    lines.append(f"| `bench_cache.py` (d {cache['d']:,}, {cache['shards']} shards x {cache['tokens_per_shard']:,} tokens) | "
                 "`write_cache` / `CachedSource` (memory-mapped); shard writes with sha256: read back vs hashed while "
                 f"writing | {bench_cache.readme_cell(cache)} |")
    lines.append(bench_sae_floor.readme_row(sae_floor))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=131_072)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache-batches", type=int, default=160, help="forwards written to the disk cache")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "pipeline.json"))
    args = p.parse_args()
    from dlmscope.activations import ActivationSource, write_cache
    from dlmscope.data import load_texts, pack
    from dlmscope.io_utils import atomic_write_json
    from dlmscope.models import load_model
    from dlmscope.training import TrainSAEConfig

    import torch

    torch.set_num_threads(args.threads)
    defaults = TrainSAEConfig()
    results = {"machine": platform.processor() or platform.machine(), "torch_threads": args.threads,
               "tokens": args.tokens, "shape": {"layers": defaults.layers, "k": defaults.k,
                                                "expansion": defaults.expansion, "batch": defaults.batch_size,
                                                "buffer_tokens": defaults.buffer_tokens}, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        lm = load_model(defaults.model)
        rows = pack(lm.tokenizer, load_texts("builtin"), defaults.context_length)
        hooks = [f"blocks.{i}.hook_resid_post" for i in defaults.layer_list()]
        src = ActivationSource(lm, hooks, rows.input_ids, rows.doc_ids, seqs_per_batch=defaults.seqs_per_forward)
        cache = write_cache(src, Path(tmp) / "cache", args.cache_batches, progress=False)
        for source, cache_dir in (("model", ""), ("cache", str(cache))):
            for prefetch in (False, True):
                key = f"{source}, prefetch {'on' if prefetch else 'off'}"
                r = one_run(Path(tmp) / "runs", f"{source}-{prefetch}", args.tokens, args.threads, prefetch,
                            cache_dir)
                results["runs"][key] = r
                print(f"{key:<22} wait {r['wait_fraction']:6.1%} of {r['seconds']:6.1f} s, "
                      f"{r['tokens_per_s']:7.0f} tok/s, FVU {list(r['fvu'].values())}")
    for source in ("model", "cache"):
        off, on = results["runs"][f"{source}, prefetch off"], results["runs"][f"{source}, prefetch on"]
        assert off["fvu"] == on["fvu"], "prefetching changed the result"
        results[f"{source}_speedup"] = off["seconds"] / on["seconds"]
    atomic_write_json(args.out, results)


if __name__ == "__main__":
    main()
