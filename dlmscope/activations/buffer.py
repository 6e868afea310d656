"""The shuffle buffer between activation sources and SAE steps: draws in place, O(batch) per step."""

from __future__ import annotations

import torch

from ..errors import DLMScopeError
from .source import ActivationBatch


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
