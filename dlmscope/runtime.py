"""How long work runs on this machine: progress that suits terminals and logs, and torch's CPU threads.

Every progress bar in the package comes from `progress`: a tqdm bar on a terminal, and in a log
(stderr redirected to a file or a pipe) one plain line every few percent instead of thousands of
carriage-return redraws.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator, Sized
from contextlib import contextmanager
from typing import TextIO

import torch

LOG_EVERY_PERCENT = 5


class LogProgress:
    """tqdm's interface as used here (iterate, `update`, `set_postfix`, `close`), printing plain lines."""

    def __init__(self, iterable: Iterable | None = None, total: float | None = None, desc: str = "", unit: str = "it",
                 initial: float = 0, unit_scale: bool = False, file: TextIO | None = None,
                 every: float = LOG_EVERY_PERCENT):
        self.iterable = iterable
        self.total = total if total is not None else (len(iterable) if isinstance(iterable, Sized) else None)
        self.desc, self.unit, self.unit_scale, self.every = desc, unit, unit_scale, every
        self.file = file or sys.stderr
        self.n, self.postfix, self.t0 = initial, "", time.monotonic()
        self.shown = self._percent() // every if self.total else 0  # a resumed run does not repeat old lines
        self.closed = False
        self.last_printed: float | None = None

    def _percent(self) -> float:
        return 100.0 * self.n / self.total if self.total else 0.0

    def _count(self, n: float) -> str:
        if not self.unit_scale:
            return f"{n:g}"
        from tqdm import tqdm

        return tqdm.format_sizeof(n)

    def _print(self) -> None:
        done = f"{self._percent():3.0f}% ({self._count(self.n)}/{self._count(self.total)} {self.unit})" \
            if self.total else f"{self._count(self.n)} {self.unit}"
        line = f"{self.desc}: {done}, {time.monotonic() - self.t0:.0f} s"
        print(line + (f", {self.postfix}" if self.postfix else ""), file=self.file, flush=True)
        self.last_printed = self.n

    def update(self, n: float = 1) -> None:
        self.n += n
        if self.total and self._percent() // self.every > self.shown:
            self.shown = self._percent() // self.every
            self._print()

    def set_postfix(self, **values) -> None:
        self.postfix = " ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        """A last line, unless the current count was just printed."""
        if not self.closed and self.n != self.last_printed:
            self._print()
        self.closed = True

    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable or ():
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(iterable: Iterable | None = None, *, file: TextIO | None = None, **kw):
    """A tqdm bar when `file` (default stderr) is a terminal, else `LogProgress` with the same arguments
    (total, desc, unit, initial, unit_scale)."""
    stream = file or sys.stderr
    if getattr(stream, "isatty", lambda: False)():
        from tqdm import tqdm

        return tqdm(iterable, file=stream, **kw)
    return LogProgress(iterable, file=stream, **kw)


@contextmanager
def torch_threads(n: int):
    """Run the block with `n` torch CPU threads (0: leave the count alone), restoring the old count after."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
