"""Making a source's batches ahead in a background thread (same batches, same order)."""

from __future__ import annotations

import torch

from .source import ActivationBatch


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
