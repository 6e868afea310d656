"""Run folders and resume state that are safe to share: no pickle, no silent corruption, one writer.

Run-folder guard::

    with RunFolder(out / name, resume=False) as run:   # DLMScopeError if another live process holds it,
        ...                                             # or it is non-empty and resume is False
        save_state(run.path, "checkpoint", state)

- `RunFolder(path, resume)` takes an exclusive `fcntl.flock` on `path/.lock` (the file holds the holder's
  pid, for the message). The kernel drops the lock when its holder dies, so the lock of a killed run
  (kill -9) is stale and simply taken over. A second live process gets one-line `DLMScopeError`.
- Without `resume` an existing folder must be empty (apart from the lock and leftovers).
- On entry, leftover `.*.tmp` files of killed runs (`io_utils.atomic_write` temporaries) are removed.
- On exit with an exception, a folder this run created is removed again if nothing but the lock and
  temporaries is in it (a run that failed before writing anything leaves no trace). The lock is released.
- `check_name(name, what)`: run names are names (letters, digits, `-`, `_`, `.`), never paths.

Resume state (`save_state(folder, name, state)` / `load_state(folder, name)` / `has_state(folder, name)`):

- `state` is any nesting of dicts, lists, tuples, tensors and JSON scalars (an optimizer `state_dict()`
  with int keys and tuple betas included). `flatten` splits it into a dict of tensors (saved with
  safetensors) and a JSON skeleton; `unflatten` rebuilds it exactly (types, dict keys, float bits, and the
  memory layout of transposed tensors, which fused optimizers rely on).
- On disk: `<name>.<digest>.safetensors` (content-addressed) and `<name>.json` holding the skeleton,
  the tensors file's name and sha256, and the sha256 of its own canonical body. Both are written
  atomically, the JSON last, and older tensor files are removed after it: a kill at any point leaves
  the previous or the new state, never a mix.
- `load_state` verifies both checksums; a flipped byte anywhere is one `DLMScopeError` line naming the file.
- `rng_state()` / `set_rng_state(s)`: torch CPU (and CUDA, if initialised), python `random` and numpy
  global generators as tensors/JSON, so a resumed run draws the same numbers as an uninterrupted one.

Run base: `Run(cfg, folder)` is the lifecycle every run shares (lock, signals, resume state and checks,
progress); `training.DictionaryRun` (SAEs, crosscoders, `diff`) and `rl.RLRun` subclass it.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import random
import re
import shutil
import signal
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch

from .errors import DLMScopeError
from .io_utils import atomic_write, atomic_write_text

LOCK = ".lock"
NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
FORMAT = "dlmscope-state/1"


def check_name(name: str, what: str = "run name") -> str:
    """A name, not a path: letters, digits, `-`, `_` and `.`, and not `.` or `..`."""
    if not NAME_RE.fullmatch(name or "") or name in (".", ".."):
        raise DLMScopeError(f"{what} {name!r} is not a name; allowed: letters, digits, '-', '_', '.' "
                            "(no paths)")
    return name


def clean_tmp(folder: str | os.PathLike) -> list[Path]:
    """Remove leftover `.*.tmp` files (temporaries of atomic writes killed mid-way) under `folder`."""
    removed = []
    for p in Path(folder).rglob(".*.tmp"):
        if p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunFolder:
    """An exclusively locked run folder (see the module docstring); use as a context manager."""

    def __init__(self, path: str | os.PathLike, resume: bool = False):
        self.path = Path(path)
        self.resume = resume
        self.created = False
        self._fd: int | None = None

    def __enter__(self) -> RunFolder:
        self.acquire()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.release(failed=exc_type is not None)

    def acquire(self) -> None:
        try:
            self.created = not self.path.exists()
            self.path.mkdir(parents=True, exist_ok=True)
            self._lock()
        except OSError as e:
            raise DLMScopeError(f"cannot write to output folder {str(self.path)!r}: "
                                f"{e.strerror or e}") from None
        try:
            clean_tmp(self.path)
            if not self.resume and self._contents():
                raise DLMScopeError(f"run {str(self.path)!r} already exists; pass --resume to continue it or "
                                    "choose another --name")
        except BaseException:
            self.release(failed=True)
            raise

    def _lock(self) -> None:
        lock = self.path / LOCK
        while True:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                holder = self._holder(lock)
                raise DLMScopeError(f"run folder {str(self.path)!r} is in use by another process"
                                    f"{f' (pid {holder})' if holder else ''}; wait for it or choose another "
                                    "--name") from None
            try:  # the file we locked may have been unlinked by a holder releasing it meanwhile: retry
                same = os.fstat(fd).st_ino == os.stat(lock).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    @staticmethod
    def _holder(lock: Path) -> int | None:
        try:
            pid = int(lock.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _pid_alive(pid) else None

    def _contents(self) -> list[Path]:
        return [p for p in self.path.iterdir() if p.name != LOCK]

    def release(self, failed: bool = False) -> None:
        """Drop the lock; after a failure, remove a folder this run created if it holds nothing."""
        if self._fd is None:
            return
        if failed:
            clean_tmp(self.path)
        remove = failed and self.created and not self._contents()
        (self.path / LOCK).unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None
        if remove:
            shutil.rmtree(self.path, ignore_errors=True)


# ------------------------------------------------------------------------------------ resume state

def flatten(obj: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """Tensors out of a nested structure: returns (tensors by key, a JSON-able skeleton referring to them)."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            key = str(len(tensors))
            # Keep the memory layout (a transposed weight stays transposed): fused optimizers pair a
            # parameter with its state element by element in memory order.
            order = sorted(range(x.dim()), key=lambda d: -x.stride()[d])
            dense, perm = x.permute(order), order
            if not dense.is_contiguous() or order == list(range(x.dim())):
                dense, perm = x, []
            tensors[key] = dense.detach().cpu().clone().contiguous()
            return {"__tensor__": key, "perm": perm} if perm else {"__tensor__": key}
        if isinstance(x, dict):
            if all(isinstance(k, str) and not k.startswith("__") for k in x):
                return {k: walk(v) for k, v in x.items()}
            return {"__items__": [[walk(k), walk(v)] for k, v in x.items()]}
        if isinstance(x, tuple):
            return {"__tuple__": [walk(v) for v in x]}
        if isinstance(x, list):
            return [walk(v) for v in x]
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise TypeError(f"cannot store a {type(x).__name__} in resume state (tensors and JSON values only)")

    return tensors, walk(obj)


def unflatten(tensors: dict[str, torch.Tensor], skeleton: Any) -> Any:
    """Inverse of `flatten`."""

    def walk(x: Any) -> Any:
        if isinstance(x, dict):
            if "__tensor__" in x:
                t = tensors[x["__tensor__"]]
                perm = x.get("perm")
                return t.permute(sorted(range(t.dim()), key=perm.__getitem__)) if perm else t
            if "__tuple__" in x:
                return tuple(walk(v) for v in x["__tuple__"])
            if "__items__" in x:
                return {walk(k): walk(v) for k, v in x["__items__"]}
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, list):
            return [walk(v) for v in x]
        return x

    return walk(skeleton)


def _canonical(body: dict) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def has_state(folder: str | os.PathLike, name: str) -> bool:
    return (Path(folder) / f"{name}.json").is_file()


def save_state(folder: str | os.PathLike, name: str, state: Any) -> Path:
    """Write `state` as `<name>.<digest>.safetensors` + `<name>.json` (checksummed); returns the JSON path."""
    from safetensors.torch import save as to_bytes

    folder = Path(folder)
    tensors, skeleton = flatten(state)
    raw = to_bytes(tensors)
    digest = hashlib.sha256(raw).hexdigest()
    data_file = folder / f"{name}.{digest[:16]}.safetensors"
    atomic_write(data_file, lambda tmp: Path(tmp).write_bytes(raw))
    body = {"format": FORMAT, "tensors": {"file": data_file.name, "sha256": digest}, "state": skeleton}
    record = {**body, "sha256": hashlib.sha256(_canonical(body)).hexdigest()}
    path = atomic_write_text(folder / f"{name}.json", json.dumps(record) + "\n")
    for old in folder.glob(f"{name}.*.safetensors"):
        if old != data_file:
            old.unlink(missing_ok=True)
    return path


def load_state(folder: str | os.PathLike, name: str) -> Any:
    """Read and verify what `save_state` wrote; any damage is one DLMScopeError line naming the file."""
    from safetensors.torch import load as load_bytes

    path = Path(folder) / f"{name}.json"
    try:
        record = json.loads(path.read_text())
        body = {k: v for k, v in record.items() if k != "sha256"}
        ok = record.get("format") == FORMAT and record["sha256"] == hashlib.sha256(_canonical(body)).hexdigest()
        data_file = path.parent / check_name(body["tensors"]["file"], "tensors file")
    except FileNotFoundError:
        raise DLMScopeError(f"resume state {str(path)!r} does not exist") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise DLMScopeError(f"resume state {str(path)!r} is corrupt: {e}") from None
    if not ok:
        raise DLMScopeError(f"resume state {str(path)!r} is corrupt (checksum mismatch)")
    try:
        raw = data_file.read_bytes()
    except OSError as e:
        raise DLMScopeError(f"resume state {str(data_file)!r} is unreadable: {e.strerror or e}") from None
    if hashlib.sha256(raw).hexdigest() != body["tensors"]["sha256"]:
        raise DLMScopeError(f"resume state {str(data_file)!r} is corrupt (checksum mismatch)")
    try:
        return unflatten({k: v.clone() for k, v in load_bytes(raw).items()}, body["state"])
    except Exception as e:
        raise DLMScopeError(f"resume state {str(path)!r} is malformed: {e}") from None


def rng_state() -> dict:
    """The global generators' states (torch CPU/CUDA, python `random`, numpy) as tensors and JSON."""
    import numpy as np

    np_state = np.random.get_state(legacy=False)
    np_state["state"]["key"] = torch.from_numpy(np_state["state"]["key"].astype(np.int64))
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
            "python": random.getstate(), "numpy": np_state}


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` returned."""
    import numpy as np

    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    np_state = {**state["numpy"], "state": {**state["numpy"]["state"]}}
    np_state["state"]["key"] = np_state["state"]["key"].numpy().astype(np.uint32)
    np.random.set_state(np_state)


# ------------------------------------------------------------------------------------- the run base

class Run:
    """The lifecycle every run shares (`training.DictionaryRun` for SAEs and crosscoders, `rl.RLRun`):

    - `lock()`: the locked run folder (`RunFolder`; a no-op context on torchrun ranks other than 0);
    - `signals()`: while inside, SIGINT/SIGTERM only set `self.signal`; the loop calls `stop_requested()`
      after each step, writes a checkpoint and returns, and the CLI exits 128 + signal;
    - `save(state)` / `load()`: the atomic, checksummed resume state `state_name` (`save_state`);
    - `check_resume(saved_config)`: refuse `--resume` when an option that changes the result differs
      from the one the checkpoint was written with (`resumable` lists the ones that may change);
    - `progress(...)`: the run's progress bar (`runtime.progress`), off when `cfg.progress` is false.
    """

    state_name = "checkpoint"
    resumable: tuple[str, ...] = ("resume", "progress", "device", "threads", "checkpoint_every")

    def __init__(self, cfg, folder: str | os.PathLike, main: bool = True):
        self.cfg = cfg
        self.folder = Path(folder)
        self.main = main
        self.signal = 0

    def lock(self):
        return RunFolder(self.folder, self.cfg.resume) if self.main else nullcontext()

    @contextmanager
    def signals(self):
        def on_signal(signum, frame):  # finish the step, checkpoint, stop
            self.signal = signum

        old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def stop_requested(self) -> bool:
        return bool(self.signal)

    def has_saved(self) -> bool:
        return has_state(self.folder, self.state_name)

    def save(self, state: dict) -> Path:
        return save_state(self.folder, self.state_name, state)

    def load(self) -> dict:
        """The verified resume state; one line when `--resume` finds none."""
        if not self.has_saved():
            legacy = " (checkpoint.pt files of older versions are not loaded: they are pickles)" \
                if (self.folder / "checkpoint.pt").exists() else ""
            raise DLMScopeError(f"--resume given but {str(self.folder / (self.state_name + '.json'))!r} does not "
                                f"exist{legacy}")
        return load_state(self.folder, self.state_name)

    def check_resume(self, saved: dict) -> None:
        """Refuse a resume whose result-changing options differ from the checkpoint's (`saved`: its config)."""
        from dataclasses import asdict, fields

        from .options import check_value, field_default, type_hints

        cls = type(self.cfg)
        saved = {getattr(cls, "renamed", {}).get(k, k): v for k, v in saved.items()}
        hints, now = type_hints(cls), asdict(self.cfg)
        was = {}
        for f in fields(cls):
            if f.name in self.resumable:
                continue
            old = saved.get(f.name, field_default(f))  # options added since the checkpoint was written
            try:
                old = check_value(f, hints[f.name], old)
            except DLMScopeError:
                pass
            if old != now[f.name]:
                was[f.name] = saved.get(f.name)
        if was:
            raise DLMScopeError(f"--resume with changed options {sorted(was)}; the checkpoint was written with {was}")

    def progress(self, iterable=None, **kwargs):
        """A progress bar over `iterable` (or one updated by hand); without one (`cfg.progress` false, or not
        rank 0): the iterable itself, or None."""
        from .runtime import progress

        return progress(iterable, **kwargs) if getattr(self.cfg, "progress", True) and self.main else iterable
