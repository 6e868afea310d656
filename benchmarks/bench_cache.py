"""Activation-cache write and read speed (GB/s of stored activations) at LLaDA-8B's width.

Synthetic activations (d 4,096, `--tokens-per-shard` per shard, one hook) go through the real writer
(`write_cache`: safetensors shards written atomically, a sha256 per shard, the manifest rewritten every 10 s)
and the real reader (`CachedSource.batch`: memory-mapped, then float32; one sum over every value, since mapped
pages are read only when touched), for float32 and bfloat16 storage. Reads are timed right after writing, so
they come from the page cache (memory speed); a cold read is bounded by the disk. The checksum pass
`CachedSource(verify=True)` is timed on its own. Side by side, the same shards go through the former write
path (safetensors' `save_file`, then the file read back for its sha256) against ours (`atomic_save_safetensors`
hashes while it writes). On a shared machine wall-clock rates fall with the load, so rates per CPU-second of
this process are reported too.

    python benchmarks/bench_cache.py [--shards 24] [--tokens-per-shard 2048] [--folder /big/disk/tmp]
    python benchmarks/bench_cache.py --projection-only   # only (re)compute the 100M-token projection

Writes benchmarks/results/cache.json, with the disk and shard arithmetic of a 100M-token cache at LLaDA-8B's
width (`projection`: no measurement, the README's sizes).
"""

from __future__ import annotations

import argparse
import platform
import shutil
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parent.parent
HOOK = "blocks.16.hook_resid_post"


class SyntheticSource:
    """Duck-types `ActivationSource` for `write_cache`: fixed random activations per batch."""

    def __init__(self, n_batches: int, tokens: int, d: int):
        self.lm = SimpleNamespace(name="synthetic")
        self.hooks, self.policy, self.t_range, self.seed, self.seqs_per_batch = [HOOK], "mask", (0.05, 0.5), 0, 1
        self.n, self.tokens, self.d = n_batches, tokens, d
        self.acts = torch.randn(tokens, d, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return self.n

    def batch(self, epoch: int, index: int):
        from dlmscope.activations import ActivationBatch

        n = self.tokens
        info = {"token": torch.zeros(n, dtype=torch.long), "position": torch.arange(n),
                "doc": torch.zeros(n, dtype=torch.long), "t": torch.full((n,), 0.3),
                "masked": torch.ones(n, dtype=torch.bool)}
        return ActivationBatch({HOOK: self.acts}, info)


def _shard(src: SyntheticSource, dtype: torch.dtype) -> dict:
    b = src.batch(0, 0)
    return {**{f"act.{h}": a.to(dtype) for h, a in b.acts.items()}, **{f"info.{k}": v for k, v in b.info.items()}}


def projection(tokens: float = 100e6, d: int = 4096, hooks: int = 4, seqs_per_forward: int = 8,
               context: int = 2048, t_range: tuple[float, float] = (0.05, 0.5)) -> dict:
    """Disk and shards of a `tokens`-token cache: activations per hook in bfloat16 / float32, the per-token info
    (the dtypes `ActivationSource` writes, as the synthetic source here), and with the `mask` policy (masked
    positions only, t ~ U[t_range]) the tokens per shard of one `seqs_per_forward` x `context` forward."""
    info = SyntheticSource(1, 1, 1).batch(0, 0).info
    info_bytes = sum(v.element_size() for v in info.values())
    kept = sum(t_range) / 2
    shard_tokens = seqs_per_forward * context * kept
    return {"tokens": tokens, "d": d, "hooks": hooks, "info_bytes_per_token": info_bytes,
            "per_hook_bfloat16_bytes": tokens * d * 2, "per_hook_float32_bytes": tokens * d * 4,
            "info_bytes": tokens * info_bytes, "all_hooks_bfloat16_bytes": hooks * tokens * d * 2 + tokens * info_bytes,
            "kept_fraction": kept, "tokens_per_shard": shard_tokens, "shards": tokens / shard_tokens,
            "shard_bytes_per_hook_bfloat16": shard_tokens * d * 2}


def write_readback(path: Path, src: SyntheticSource, dtype: torch.dtype) -> str:
    """The former shard write: safetensors' own writer, then the file read back for its sha256."""
    from safetensors.torch import save_file

    from dlmscope.io_utils import atomic_write, file_sha256

    tensors = _shard(src, dtype)
    atomic_write(path, lambda tmp: save_file(tensors, tmp))
    return file_sha256(path)


def write_hashing(path: Path, src: SyntheticSource, dtype: torch.dtype) -> str:
    """Ours: the sha256 is taken from the bytes as they are written."""
    from dlmscope.io_utils import atomic_save_safetensors

    return atomic_save_safetensors(path, _shard(src, dtype))


def readme_cell(res: dict) -> str:
    """The README scale table's cell: write / read rates per dtype, the sha256 check, the side-by-side shard writes."""
    f32, bf16 = res["dtypes"]["float32"], res["dtypes"]["bfloat16"]
    side = lambda d: (f"{d['shard_write_side_by_side']['readback']['gb_per_cpu_s']:.2f} -> "  # noqa: E731
                      f"{d['shard_write_side_by_side']['while_writing']['gb_per_cpu_s']:.2f} GB")
    return (f"float32: write {f32['write_gb_per_s']:.2f} GB/s, read {f32['read_gb_per_s']:.2f} GB/s; bfloat16: write "
            f"{bf16['write_gb_per_s']:.2f} GB/s, read (to float32) {bf16['read_gb_per_s']:.2f} GB/s; sha256 check "
            f"{f32['verify_gb_per_s']:.2f} GB/s; side by side per CPU-second: float32 {side(f32)}, bfloat16 {side(bf16)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=int, default=24)
    p.add_argument("--tokens-per-shard", type=int, default=2048)
    p.add_argument("--d", type=int, default=4096)
    p.add_argument("--folder", default="", help="where to write (default: a temporary folder)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cache.json"))
    p.add_argument("--projection-only", action="store_true", help="keep --out's measurements, recompute the projection")
    args = p.parse_args()
    from dlmscope.activations import CachedSource, write_cache
    from dlmscope.io_utils import atomic_write_json

    if args.projection_only:
        import json

        atomic_write_json(args.out, json.loads(Path(args.out).read_text()) | {"projection": projection(d=args.d)})
        return

    torch.set_num_threads(1)
    src = SyntheticSource(args.shards, args.tokens_per_shard, args.d)
    results = {"machine": platform.processor() or platform.machine(), "d": args.d, "shards": args.shards,
               "tokens_per_shard": args.tokens_per_shard, "dtypes": {}}
    base = Path(tempfile.mkdtemp(dir=args.folder or None))
    try:
        for dtype in (torch.float32, torch.bfloat16):
            name = str(dtype).replace("torch.", "")
            folder = base / name
            gb = args.shards * args.tokens_per_shard * args.d * dtype.itemsize / 1e9
            t, c = time.perf_counter(), time.process_time()
            write_cache(src, folder, dtype=dtype, progress=False)
            write_s, write_cpu = time.perf_counter() - t, time.process_time() - c
            write = {"readback": write_readback, "while_writing": write_hashing}
            strategies = {k: [0.0, 0.0] for k in write}  # wall, CPU seconds; interleaved shard by shard
            for i in range(args.shards):
                for key, fn in write.items():
                    t, c = time.perf_counter(), time.process_time()
                    fn(base / f"{key}.safetensors", src, dtype)
                    strategies[key][0] += time.perf_counter() - t
                    strategies[key][1] += time.process_time() - c
            t = time.perf_counter()
            reader = CachedSource(folder, verify=True)
            verify_s = time.perf_counter() - t
            reader = CachedSource(folder, verify=False)
            t, c = time.perf_counter(), time.process_time()
            total = 0.0
            for i in range(len(reader)):
                total += float(reader.batch(0, i).acts[HOOK].sum())  # touch every value: the map is lazy
            read_s, read_cpu = time.perf_counter() - t, time.process_time() - c
            results["dtypes"][name] = {"stored_gb": gb, "write_gb_per_s": gb / write_s,
                                       "read_gb_per_s": gb / read_s, "verify_gb_per_s": gb / verify_s,
                                       "read_tokens_per_s": args.shards * args.tokens_per_shard / read_s,
                                       "write_gb_per_cpu_s": gb / write_cpu, "read_gb_per_cpu_s": gb / read_cpu,
                                       "shard_write_side_by_side": {
                                           k: {"gb_per_s": gb / w, "gb_per_cpu_s": gb / c}
                                           for k, (w, c) in strategies.items()}}
            print(f"{name}: {gb:.2f} GB, write {gb / write_s:.2f} GB/s ({gb / write_cpu:.2f} per CPU-second), "
                  f"read {gb / read_s:.2f} GB/s ({gb / read_cpu:.2f} per CPU-second, to float32), "
                  f"checksum {gb / verify_s:.2f} GB/s; shard writes with sha256, read back vs while writing: "
                  + " vs ".join(f"{gb / w:.2f} GB/s ({gb / c:.2f} per CPU-second)" for w, c in strategies.values()))
    finally:
        shutil.rmtree(base)
    atomic_write_json(args.out, results | {"projection": projection(d=args.d)})


if __name__ == "__main__":
    main()
