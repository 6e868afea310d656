"""Activation caches on disk: safetensors shards plus a checksummed manifest, read memory-mapped."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import DLMScopeError
from ..io_utils import SAFETENSORS_DTYPES, atomic_save_safetensors, atomic_write_json, file_sha256
from .source import INFO_KEYS, POLICIES, ActivationBatch, ActivationSource


def mmap_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file as a zero-copy view of the file's memory map.

    Pages are mapped copy-on-write (a write never reaches the file) and read from disk when first
    touched, so a shard costs no copy and no Python work per token; converting bf16/fp16 activations
    to float32 is the only pass over the data. Raises ValueError/KeyError on a malformed file."""
    import mmap

    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # the map outlives the file object
    n = int.from_bytes(mm[:8], "little")
    header = json.loads(mm[8:8 + n])
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        dtype = getattr(torch, SAFETENSORS_DTYPES[meta["dtype"]])
        start, end = meta["data_offsets"]
        if not 0 <= start <= end <= len(mm) - 8 - n:
            raise ValueError(f"tensor {name!r} lies outside the file")
        flat = torch.frombuffer(mm, dtype=dtype, count=(end - start) // dtype.itemsize, offset=8 + n + start) \
            if end > start else torch.empty(0, dtype=dtype)
        out[name] = flat.view(meta["shape"])
    return out


def read_manifest(path: Path) -> dict:
    """A cache's manifest.json, checked: hooks, policy and a list of shards each with file, tokens and sha256."""
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DLMScopeError(f"cache manifest {str(path)!r} is unreadable or truncated: {e}") from None
    ok = isinstance(manifest, dict) and isinstance(manifest.get("model"), str) and manifest.get("policy") in POLICIES \
        and isinstance(manifest.get("hooks"), list) and manifest["hooks"] and isinstance(manifest.get("shards"), list) \
        and all(isinstance(h, str) for h in manifest["hooks"])
    if not ok:
        raise DLMScopeError(f"cache manifest {str(path)!r} is corrupt: it needs model, hooks, policy and shards")
    for s in manifest["shards"]:
        if not (isinstance(s, dict) and isinstance(s.get("file"), str) and Path(s["file"]).name == s["file"]
                and isinstance(s.get("sha256"), str) and isinstance(s.get("tokens"), int)):
            raise DLMScopeError(f"cache manifest {str(path)!r} is corrupt: bad shard entry {str(s)[:80]!r}")
    return manifest


def write_cache(source: ActivationSource, folder: str | Path, n_batches: int | None = None, *,
                dtype: torch.dtype = torch.float32, progress: bool = True) -> Path:
    """Write one pass of `source` as safetensors shards plus a manifest; skips shards already complete.

    The folder is locked while writing, and temporaries left by a killed writer are removed on start
    (`runstate.RunFolder`)."""
    from ..runstate import RunFolder

    with RunFolder(folder, resume=True):
        return _write_cache(source, Path(folder), n_batches, dtype, progress)


def _write_cache(source: ActivationSource, folder: Path, n_batches: int | None, dtype: torch.dtype,
                 progress: bool) -> Path:
    n = min(n_batches or len(source), len(source))
    manifest_path = folder / "manifest.json"
    header = {"model": source.lm.name, "hooks": source.hooks, "policy": source.policy,
              "t_range": list(source.t_range), "dtype": str(dtype).replace("torch.", ""), "seed": source.seed,
              "seqs_per_batch": source.seqs_per_batch}
    manifest: dict[str, Any] = read_manifest(manifest_path) if manifest_path.is_file() else {**header, "shards": []}
    if {k: manifest.get(k) for k in header} != header:
        raise DLMScopeError(f"cache folder {str(folder)!r} holds a different configuration; use another folder")
    done = {s["file"]: s for s in manifest["shards"]}
    iterator, saved = range(n), time.monotonic()
    if progress:
        from ..runtime import progress as bar
        iterator = bar(iterator, desc="caching activations", unit="batch")
    for i in iterator:
        name = f"shard-{i:05d}.safetensors"
        if name in done and (folder / name).is_file() and file_sha256(folder / name) == done[name]["sha256"]:
            continue
        b = source.batch(0, i)
        tensors = {f"act.{h}": a.to(dtype) for h, a in b.acts.items()}
        tensors.update({f"info.{k}": v for k, v in b.info.items()})
        done[name] = {"file": name, "tokens": len(b), "sha256": atomic_save_safetensors(folder / name, tensors)}
        if time.monotonic() - saved >= MANIFEST_EVERY_S:
            _save_manifest(manifest_path, manifest, done)
            saved = time.monotonic()
    _save_manifest(manifest_path, manifest, done)
    return folder


MANIFEST_EVERY_S = 10.0
"""Seconds between manifest rewrites while caching: rewriting it per shard costs O(shards^2) bytes at 100M
tokens; a shard written but not yet listed is simply written again by a resumed run."""


def _save_manifest(path: Path, manifest: dict, done: dict) -> None:
    def index(file: str) -> int:  # numeric order, also past shard 99,999
        return int(file.split("-")[1].split(".")[0])

    manifest["shards"] = [done[k] for k in sorted(done, key=index)]
    manifest["tokens"] = sum(s["tokens"] for s in manifest["shards"])
    atomic_write_json(path, manifest)


class CachedSource:
    """Reads a cache folder shard by shard (memory-mapped); same `batch(epoch, index)` as ActivationSource.

    `shards` picks which shards (by position in the manifest) this source serves, e.g. a held-out one
    for evaluation or `rank::world` under torchrun; default all.
    """

    def __init__(self, folder: str | Path, verify: bool = True, shards: slice | Sequence[int] | None = None):
        self.folder = Path(folder)
        path = self.folder / "manifest.json"
        if not path.is_file():
            raise DLMScopeError(f"{str(self.folder)!r} is not an activation cache (no manifest.json)")
        self.manifest = read_manifest(path)
        self.hooks, self.policy = self.manifest["hooks"], self.manifest["policy"]
        everything = self.manifest["shards"]
        if isinstance(shards, slice):
            self.shards = everything[shards]
        else:
            self.shards = everything if shards is None else [everything[i] for i in shards]
        if not self.shards:
            raise DLMScopeError(f"cache {str(self.folder)!r} has {len(everything)} shard(s), none left for this "
                                "source; write more batches with `dlmscope cache --batches`")
        if verify:
            for s in self.shards:
                file = self.folder / s["file"]
                if not file.is_file() or file_sha256(file) != s["sha256"]:
                    raise DLMScopeError(f"cache shard {str(file)!r} is missing or corrupt (checksum mismatch)")

    def __len__(self) -> int:
        return len(self.shards)

    def batch(self, epoch: int, index: int) -> ActivationBatch:
        file = self.folder / self.shards[index]["file"]
        try:
            tensors = mmap_safetensors(file)
            acts = {h: tensors[f"act.{h}"].float() for h in self.hooks}  # float32 shards: still the mapped view
            info = {k: tensors[f"info.{k}"] for k in INFO_KEYS}
        except Exception as e:
            raise DLMScopeError(f"cache shard {str(file)!r} is corrupt: {e}") from None
        return ActivationBatch(acts, info)
