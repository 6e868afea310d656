"""Input checks shared by config dataclasses and the CLI: each returns the checked value or raises a
one-line `DLMScopeError` naming the bad value and what is allowed, before any expensive work starts."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .errors import DLMScopeError


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def integer(name: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> int:
    """An int (not a bool) in [minimum, maximum] (None: unbounded)."""
    if not _is_int(value) or (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        bounds = [f">= {minimum}"] * (minimum is not None) + [f"<= {maximum}"] * (maximum is not None)
        raise DLMScopeError(f"{name}={value!r} must be an integer{' ' + ' and '.join(bounds) if bounds else ''}")
    return value


INT64_MAX = 2**63 - 1
"""The largest value torch and numpy take as an integer (seeds, counts, indices)."""


def positive(name: str, value: Any) -> int:
    """A count that must be at least one."""
    return integer(name, value, 1)


def non_negative(name: str, value: Any) -> int:
    return integer(name, value, 0)


def seed(name: str, value: Any) -> int:
    """A random seed: torch's generators take [0, 2^63 - 1] without wrapping around."""
    return integer(name, value, 0, INT64_MAX)


def finite_values(values: dict[str, Any], flags: dict[str, str]) -> None:
    """Refuse NaN / infinite floats and integers beyond 64 bits among parsed option `values` (lists included),
    naming the option by its `flags` spelling: the CLI parses 'nan', 'inf' and 10**23 without complaint."""
    for key, value in values.items():
        for v in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(v, float) and not math.isfinite(v):
                raise DLMScopeError(f"{flags.get(key, key)}={v!r} must be a finite number")
            if _is_int(v) and abs(v) > INT64_MAX:
                raise DLMScopeError(f"{flags.get(key, key)}={v!r} is out of range: integers must fit in 64 bits "
                                    f"(|value| <= {INT64_MAX})")


def number(name: str, value: Any, low: float | None = None, high: float | None = None,
           low_open: bool = False, high_open: bool = False) -> float:
    """A finite float in [low, high] (an open end with `low_open` / `high_open`; None: unbounded)."""
    ok = (_is_int(value) or isinstance(value, float)) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        interval = f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
        raise DLMScopeError(f"{name}={value!r} must be a finite number in {interval}")
    return float(value)


def non_finite(tensors: Mapping[str, Any]) -> str | None:
    """The name of the first floating tensor holding NaN or inf (with its count), or None when all are finite."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(t.isfinite().all()):
            return f"{name} ({int((~t.isfinite()).sum())} of {t.numel()} values NaN/inf)"
    return None


def finite_tensors(what: str, tensors: Mapping[str, Any]) -> None:
    """Refuse NaN / inf in `tensors` in one line: `what` says what was being read or written (a file, a folder)."""
    bad = non_finite(tensors)
    if bad is not None:
        raise DLMScopeError(f"{what}: tensor {bad}; non-finite values are never saved or used")


def choice(name: str, value: Any, allowed: Iterable[str]) -> str:
    allowed = list(allowed)
    if value not in allowed:  # an empty choice means "the default": say so instead of listing nothing
        raise DLMScopeError(f"{name}={value!r}; allowed: {', '.join(a or repr(a) + ' (the default)' for a in allowed)}")
    return value


def text(name: str, value: Any) -> str:
    """A string option (a config file may hold a number where a string is meant, e.g. `k: 32`)."""
    if _is_int(value) or isinstance(value, float):
        return str(value)
    if not isinstance(value, str):
        raise DLMScopeError(f"{name}={value!r} must be a string")
    return value


def names(name: str, value: Any) -> list[str]:
    """A non-empty comma-separated list of names (blank items dropped)."""
    items = [v.strip() for v in text(name, value).split(",") if v.strip()]
    if not items:
        raise DLMScopeError(f"{name}={value!r} names nothing; give a comma-separated list")
    return items


def _parse_list(name: str, value: Any, convert, kind: str) -> list:
    """`names(name, value)` converted item by item; one line naming the value when an item does not convert."""
    items = names(name, value)  # outside the try: its own error (a DLMScopeError is a ValueError) stands
    try:
        return [convert(v) for v in items]
    except ValueError:
        raise DLMScopeError(f"{name}={value!r} must be comma-separated {kind}") from None


def int_list(name: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> list[int]:
    """A non-empty comma-separated list of integers, each in [minimum, maximum]."""
    ints = _parse_list(name, value, int, "integers")
    for v in ints:
        integer(name, v, minimum, maximum)
    return ints


def float_list(name: str, value: Any, low: float | None = None, high: float | None = None,
               low_open: bool = False) -> list[float]:
    """A non-empty comma-separated list of finite numbers in [low, high] ((low, high] with `low_open`)."""
    floats = _parse_list(name, value, float, "numbers")
    for v in floats:
        number(name, v, low, high, low_open)
    return floats


def device(name: str, value: Any) -> str:
    """A torch device string this machine has (cpu, cuda, cuda:1, mps, ...)."""
    import torch

    value = text(name, value)
    try:
        dev = torch.device(value)
    except (RuntimeError, ValueError):
        raise DLMScopeError(f"{name}={value!r} is not a torch device; e.g. cpu, cuda, cuda:1, mps") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise DLMScopeError(f"{name}={value!r} but CUDA is not available on this machine; use cpu")
        if dev.index is not None and dev.index >= count:
            raise DLMScopeError(f"{name}={value!r} but this machine has {count} CUDA device(s): "
                                f"cuda:0..cuda:{count - 1}")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise DLMScopeError(f"{name}={value!r} but MPS is not available on this machine; use cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise DLMScopeError(f"{name}={value!r}: unsupported device type; use cpu, cuda or mps")
    return value


def _probe_folder(name: str, path: Path, given: Path) -> None:
    """Fail unless a file can be created in `path`'s nearest existing folder (nothing is left behind);
    errors name the `given` path."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise DLMScopeError(f"{name}={str(given)!r}: {str(existing)!r} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise DLMScopeError(f"{name}={str(given)!r} is not writable ({str(existing)!r}: {e.strerror or e})") from None


def writable_file(name: str, path: str | os.PathLike) -> Path:
    """An output file we can write: not a folder, and its folder can be created and written."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise DLMScopeError(f"{name}={str(path)!r} is a folder; give a file path")
    _probe_folder(name, path.parent, path)
    return path


def result_file(name: str, path: str | os.PathLike, keys: Iterable[str]) -> Path:
    """A JSON result file a command may write: `writable_file`, and when it exists, a result of that command (a JSON
    object holding all `keys`): a user's file that happens to have the name is never overwritten."""
    path = writable_file(name, path)
    if path.exists():
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = None
        if not (isinstance(data, dict) and set(keys) <= data.keys()):
            raise DLMScopeError(f"{name}={str(path)!r} exists and is not a result this command wrote; it is not "
                                "overwritten: remove it or give another path")
    return path


def writable_folder(name: str, path: str | os.PathLike) -> Path:
    """An output folder we can create or write into: not an existing file."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise DLMScopeError(f"{name}={str(path)!r} is a file; give a folder path")
    _probe_folder(name, path, path)
    return path
