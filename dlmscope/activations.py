"""Activation providers for SAE training, following DLM-Scope's protocol.

One forward per batch of packed text: the mask ratio t is drawn once per batch from a t-range,
the first token is never masked, and a position policy picks which tokens' activations are kept
(`mask`: masked positions, `unmask`: visible ones, `all`, or `clean`: no masking, the default for
autoregressive models). Every source batch is a pure function of (seed, rank, pass, index), so a
resumed run regenerates exactly the batches it would have seen.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .diffusion.noise import check_t_range, corrupt
from .errors import DLMScopeError
from .hooks import run_with_cache
from .io_utils import SAFETENSORS_DTYPES, atomic_save_safetensors, atomic_write_json, file_sha256
from .models.base import LoadedModel

POLICIES = ("mask", "unmask", "all", "clean")
INFO_KEYS = ("token", "position", "doc", "t", "masked")


@dataclass
class ActivationBatch:
    """Activations per hook (N, d) and, per token: id, position, document id, t, was-masked."""

    acts: dict[str, torch.Tensor]
    info: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return int(self.info["token"].shape[0])


def default_policy(lm: LoadedModel) -> str:
    return "clean" if lm.causal else "mask"


class ActivationSource:
    """Batches of activations from one forward each over packed token rows."""

    def __init__(self, lm: LoadedModel, hooks: Sequence[str], rows: torch.Tensor, doc_ids: torch.Tensor | None = None,
                 *, policy: str | None = None, t_range: tuple[float, float] = (0.05, 0.5), seqs_per_batch: int = 16,
                 seed: int = 0, rank: int = 0, world: int = 1):
        self.lm, self.hooks = lm, list(hooks)
        for h in self.hooks:
            lm.site(h)
        self.policy = policy or default_policy(lm)
        if self.policy not in POLICIES:
            raise DLMScopeError(f"unknown position policy {self.policy!r}; allowed: {', '.join(POLICIES)}")
        if lm.causal and self.policy != "clean":
            raise DLMScopeError(f"policy {self.policy!r} needs a diffusion model; {lm.name} is autoregressive (use clean)")
        if self.policy != "clean":
            lm.require_mask_id()
        self.t_range = check_t_range(t_range)
        self.rows = rows[rank::world]
        self.doc_ids = (doc_ids if doc_ids is not None else torch.zeros_like(rows))[rank::world]
        if self.rows.shape[0] < seqs_per_batch:
            raise DLMScopeError(f"the dataset has {self.rows.shape[0]} rows for this process, fewer than one batch of "
                                f"{seqs_per_batch}; give more text or a smaller batch")
        self.seqs_per_batch, self.seed, self.rank = seqs_per_batch, seed, rank

    def __len__(self) -> int:
        """Batches per pass over the data."""
        return self.rows.shape[0] // self.seqs_per_batch

    def _generator(self, epoch: int, index: int) -> torch.Generator:
        return torch.Generator().manual_seed(hash((self.seed, self.rank, epoch, index)) & 0x7FFFFFFF)

    @torch.no_grad()
    def batch(self, epoch: int, index: int) -> ActivationBatch:
        order = torch.randperm(self.rows.shape[0], generator=torch.Generator().manual_seed(self.seed * 1000 + epoch))
        pick = order[index * self.seqs_per_batch:(index + 1) * self.seqs_per_batch]
        x0, docs = self.rows[pick], self.doc_ids[pick]
        B, L = x0.shape
        if self.policy == "clean":
            xt, masked, t = x0, torch.zeros_like(x0, dtype=torch.bool), torch.zeros(B)
        else:
            gen = self._generator(epoch, index)
            lo, hi = self.t_range
            t = torch.full((B,), lo + (hi - lo) * float(torch.rand(1, generator=gen)))
            c = corrupt(x0, self.lm.require_mask_id(), t, eps=0.0, keep_first=True, generator=gen)
            xt, masked = c.xt, c.mask
        keep = {"mask": masked, "unmask": ~masked, "all": torch.ones_like(masked),
                "clean": torch.ones_like(masked)}[self.policy]
        acts = run_with_cache(self.lm, xt, self.hooks, positions=keep.to(self.lm.device), clean=x0)
        info = {"token": x0[keep], "position": torch.arange(L).expand(B, L)[keep], "doc": docs[keep],
                "t": t[:, None].expand(B, L)[keep], "masked": masked[keep]}
        return ActivationBatch({h: a.float().cpu() for h, a in acts.items()}, info)


class ShuffleBuffer:
    """Mixes tokens across forwards: refills to capacity when half empty, yields each token once per pass."""

    def __init__(self, source, capacity: int, batch_size: int, seed: int = 0):
        if capacity < 2 * batch_size:
            raise DLMScopeError(f"buffer capacity {capacity} must be at least twice the batch size {batch_size}")
        self.source, self.capacity, self.batch_size = source, capacity, batch_size
        self.gen = torch.Generator().manual_seed(seed)
        self.epoch, self.index = 0, 0
        self.acts: dict[str, torch.Tensor] | None = None
        self.info: dict[str, torch.Tensor] | None = None

    def _size(self) -> int:
        return 0 if self.info is None else int(self.info["token"].shape[0])

    def _refill(self) -> bool:
        """Top up from the current pass (one concatenation per refill); False once the pass is used up."""
        new, size = [], self._size()
        while size < self.capacity and self.index < len(self.source):
            new.append(self.source.batch(self.epoch, self.index))
            size += len(new[-1])
            self.index += 1
        if not new:
            return False
        old = [] if self.info is None or self.acts is None else [ActivationBatch(self.acts, self.info)]
        parts = old + new
        self.acts = {h: torch.cat([p.acts[h] for p in parts]) for h in parts[0].acts}
        self.info = {k: torch.cat([p.info[k] for p in parts]) for k in parts[0].info}
        return True

    def next(self) -> ActivationBatch:
        if self._size() <= self.capacity // 2:
            self._refill()
        if self._size() < self.batch_size:  # pass exhausted: start the next one
            self.epoch, self.index = self.epoch + 1, 0
            self._refill()
        n, b = self._size(), self.batch_size
        assert self.acts is not None and self.info is not None  # _size() >= batch_size: refilled
        take = torch.randperm(n, generator=self.gen)[:b]
        out = ActivationBatch({h: a[take] for h, a in self.acts.items()}, {k: v[take] for k, v in self.info.items()})
        # Remove the drawn rows by moving the undrawn rows of the last b slots into the holes the draw left
        # before them, then dropping the tail: O(batch) copying per step instead of the whole buffer.
        kept_tail = torch.ones(b, dtype=torch.bool)
        kept_tail[take[take >= n - b] - (n - b)] = False
        holes, movers = take[take < n - b], torch.arange(n - b, n)[kept_tail]
        for t in (*self.acts.values(), *self.info.values()):
            t[holes] = t[movers]
        self.acts = {h: a[: n - b] for h, a in self.acts.items()}
        self.info = {k: v[: n - b] for k, v in self.info.items()}
        return out

    def state_dict(self) -> dict:
        """A snapshot: copies, because `next` edits the buffer in place."""
        return {"gen": self.gen.get_state(), "epoch": self.epoch, "index": self.index, "acts": _copy(self.acts),
                "info": _copy(self.info)}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["gen"])
        self.epoch, self.index = state["epoch"], state["index"]
        self.acts, self.info = _copy(state["acts"]), _copy(state["info"])


def _copy(tensors: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    return None if tensors is None else {k: t.clone() for k, t in tensors.items()}


class Prefetcher:
    """Makes a source's batches ahead in a background thread while the caller (the SAE step) works.

    Wraps any source with `batch(epoch, index)` and `len()` (`ActivationSource`, `CachedSource`) and serves
    the same batches: a source batch is a pure function of (epoch, index), so computing it early changes
    nothing, and results and `--resume` stay bit-identical to a run without prefetching. The thread walks
    the order a `ShuffleBuffer` asks in -- (e, 0), (e, 1), ..., (e + 1, 0) -- and keeps up to `max_tokens`
    tokens queued (bounded memory; at least one batch); any other request (a resume, a seek) restarts it there.
    One design for every device: on CPU the model's ops release the GIL, so forward and SAE step run on
    separate cores; on a GPU the thread issues its kernels on its own CUDA stream, so the model's forward
    overlaps the SAE kernels on the default stream (`.cpu()` of the result waits for that stream only).
    An error in the thread is raised by the `batch` call that would have returned that batch. Hooks are
    per model, so nothing else may run the source's model while its thread is alive (`close()` first).
    """

    def __init__(self, source, max_tokens: int):
        import threading

        self.source, self.max_tokens = source, max_tokens
        self._cond = threading.Condition()
        self._queue: list[tuple[tuple[int, int], object]] = []
        self._thread: threading.Thread | None = None
        self._stop = False
        self._next: tuple[int, int] | None = None

    def __len__(self) -> int:
        return len(self.source)

    def _after(self, epoch: int, index: int) -> tuple[int, int]:
        return (epoch, index + 1) if index + 1 < len(self.source) else (epoch + 1, 0)

    def _produce(self, pos: tuple[int, int], threads: int) -> None:
        from contextlib import nullcontext

        torch.set_num_threads(threads)
        device = getattr(getattr(self.source, "lm", None), "device", torch.device("cpu"))
        stream = torch.cuda.stream(torch.cuda.Stream(device)) if torch.device(device).type == "cuda" else nullcontext()
        with stream:
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: self._stop or not self._queue
                                        or sum(len(b) for _, b in self._queue if isinstance(b, ActivationBatch))
                                        < self.max_tokens)
                    if self._stop:
                        return
                try:
                    item: object = self.source.batch(*pos)
                except Exception as e:  # handed to the consumer, raised where the batch was asked for
                    item = e
                with self._cond:
                    if self._stop:
                        return
                    self._queue.append((pos, item))
                    self._cond.notify_all()
                if isinstance(item, Exception):
                    return
                pos = self._after(*pos)

    def _restart(self, pos: tuple[int, int]) -> None:
        import threading

        self.close()
        self._stop, self._queue = False, []
        self._thread = threading.Thread(target=self._produce, args=(pos, torch.get_num_threads()), daemon=True,
                                        name="dlmscope-prefetch")
        self._thread.start()

    def batch(self, epoch: int, index: int) -> ActivationBatch:
        if (epoch, index) != self._next or self._thread is None:
            self._restart((epoch, index))
        with self._cond:
            self._cond.wait_for(lambda: bool(self._queue))
            pos, item = self._queue.pop(0)
            self._cond.notify_all()
        self._next = self._after(*pos)
        if isinstance(item, Exception):
            self._thread, self._next = None, None
            raise item
        assert isinstance(item, ActivationBatch)
        return item

    def close(self) -> None:
        """Stop the thread (it finishes the batch it is making); the next `batch` call starts a new one."""
        if self._thread is not None:
            with self._cond:
                self._stop = True
                self._cond.notify_all()
            self._thread.join()
            self._thread = None


TRAJECTORY_POSITIONS = ("all", "masked", "unmasked")


@torch.no_grad()
def trajectory_activations(lm: LoadedModel, prompts, hooks: Sequence[str], *, at_steps=None, positions: str = "all",
                           **generate_kwargs) -> list[ActivationBatch]:
    """Activations from a real sampler run, one ActivationBatch per captured denoising step.

    `at_steps`: None (every step), step indices or a predicate, as in `dlmscope.hooks.capture`. Rows are
    kept at `positions` (all, masked or unmasked at that step). Per row, `token` is the input id at that
    step (the mask id where still masked), `doc` the prompt index, `t` the fraction of generated positions
    still masked and `step` the step index. Other keyword arguments go to `diffusion.sampler.generate`.
    """
    from .diffusion.sampler import generate
    from .hooks import capture

    if positions not in TRAJECTORY_POSITIONS:
        raise DLMScopeError(f"unknown positions {positions!r}; allowed: {', '.join(TRAJECTORY_POSITIONS)}")
    for h in hooks:
        lm.site(h)
    seen: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = {}

    def remember(record) -> None:  # only ids, mask and t: the record's logits are not kept
        seen[record.step] = (record.x.cpu(), record.mask.cpu(), record.t)

    with capture(lm, hooks, steps=at_steps, to_cpu=True) as cache:
        generate(lm, prompts, callback=remember, **generate_kwargs)
    out = []
    for i, step in enumerate(cache.steps[hooks[0]]):
        assert step is not None  # captured inside the sampler, which numbers its steps
        x, masked, t = seen[step]
        B, L = x.shape
        keep = {"all": torch.ones_like(masked), "masked": masked, "unmasked": ~masked}[positions]
        acts = {h: cache.acts[h][i][:B][keep].float() for h in hooks}  # [:B] drops the CFG half
        info = {"token": x[keep], "position": torch.arange(L).expand(B, L)[keep],
                "doc": torch.arange(B)[:, None].expand(B, L)[keep], "t": torch.full((B, L), t)[keep],
                "masked": masked[keep], "step": torch.full((B, L), step)[keep]}
        out.append(ActivationBatch(acts, info))
    return out


# ------------------------------------------------------------------------------------------ disk cache



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
    from .runstate import RunFolder

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
        from .runtime import progress as bar
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


class PairedActivationSource:
    """The same batches run through several checkpoints: identical tokens, masks and positions for each
    (one `ActivationSource` per checkpoint, all with the same seed); each hook's activations are the
    checkpoints' concatenated along the feature axis (N, C * d), checkpoint order as given.

    Checkpoints must share tokenizer and width (checked by the caller, `analysis.stability.check_compatible`)."""

    def __init__(self, lms: Sequence[LoadedModel], hooks: Sequence[str], rows: torch.Tensor,
                 doc_ids: torch.Tensor | None = None, **kwargs):
        if len(lms) < 2:
            raise DLMScopeError(f"paired activations need at least two checkpoints; got {len(lms)}")
        self.sources = [ActivationSource(lm, hooks, rows, doc_ids, **kwargs) for lm in lms]
        first = self.sources[0]
        self.lm, self.hooks, self.policy, self.t_range = first.lm, first.hooks, first.policy, first.t_range
        self.seed, self.seqs_per_batch = first.seed, first.seqs_per_batch

    def __len__(self) -> int:
        return len(self.sources[0])

    def batch(self, epoch: int, index: int) -> ActivationBatch:
        batches = [s.batch(epoch, index) for s in self.sources]
        return ActivationBatch({h: torch.cat([b.acts[h] for b in batches], dim=1) for h in self.hooks}, batches[0].info)
