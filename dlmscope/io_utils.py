"""Atomic file writes: a crash mid-write never leaves a half-written file behind."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """Call `write(tmp_path)` on a temporary file next to `path`, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return atomic_write(path, write)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> Path:
    import torch

    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, read in 1 MiB chunks (checksum verification)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                      "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
"""safetensors dtype codes -> torch dtype names (the ones we write and read)."""


def atomic_save_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> str:
    """Write `tensors` as a safetensors file, atomically; returns the file's sha256, hashed while writing (no
    read-back). Layout as safetensors writes it: an 8-byte header length, the JSON header padded with spaces to a
    multiple of 8, then each tensor's bytes, larger element sizes first (every tensor aligned to its dtype)."""
    import torch

    codes = {getattr(torch, name): code for code, name in SAFETENSORS_DTYPES.items()}
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in order:
        t = tensors[name]
        if t.dtype not in codes:
            raise TypeError(f"tensor {name!r} has dtype {t.dtype}, which safetensors files here do not hold")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": codes[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    digest = hashlib.sha256()

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            chunks: list[bytes | memoryview] = [len(raw).to_bytes(8, "little"), raw]
            for chunk in chunks + [memoryview(tensors[k].reshape(-1).view(torch.uint8).numpy()) for k in order]:
                f.write(chunk)
                digest.update(chunk)

    atomic_write(path, write)
    return digest.hexdigest()
