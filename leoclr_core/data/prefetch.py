"""Prepare the next batches (decode, views, layout) while the current training step runs.

Why: on a GPU the views are made on the device (augment.py), and made inline they run between two
steps: the GPU waits while the CPU launches the augmentation's kernels, then the augmentation's
kernels wait behind nothing, then the step waits for them. `Prefetcher` moves that work to a
background thread that launches it on a side CUDA stream, up to `depth` batches ahead. The CPU
launches of both overlap (PyTorch releases the GIL inside each op), the side stream's kernels fill
what the step leaves of the GPU, and the training stream waits only on an event, never the host.

On the CPU there is no stream to overlap with, and a thread would only compete for the same
cores, so batches are prepared inline unless a test asks for the thread (`threaded=True`).
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Generic, Iterable, Iterator, TypeVar

import torch

T = TypeVar("T")
Batch = tuple[torch.Tensor, ...]

_END = object()


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


class Prefetcher(Generic[T]):
    """Iterate `prepare(item)` for each item of `items`, computed up to `depth` items ahead.

    Order is kept, so a seeded generator used inside `prepare` gives the same views as inline.
    An exception in `prepare` or in `items` is raised from the iteration, at the item it hit.
    The thread stops after the item it is on when the iteration ends, is closed or is collected
    (a `for` loop that breaks), or on `close()`.
    """

    def __init__(self, items: Iterable[T], prepare: Callable[[T], Batch], device: torch.device | str,
                 depth: int = 2, threaded: bool | None = None):
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        if cuda and self.device.index is None:  # the thread must select the same device explicitly
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.threaded = cuda if threaded is None else threaded
        self.items, self.prepare, self.depth = items, prepare, depth
        self._stream = torch.cuda.Stream(self.device) if cuda and self.threaded else None
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ producer
    def _put(self, entry) -> bool:
        """Hand an entry to the consumer; False once closed (so the producer can stop waiting)."""
        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        try:
            if self._stream is not None:
                torch.cuda.set_device(self.device)
            for item in self.items:
                if self._stop.is_set():
                    return
                if self._stream is None:
                    entry = (self.prepare(item), None)
                else:
                    with torch.cuda.stream(self._stream):
                        out = self.prepare(item)
                        ready = torch.cuda.Event()
                        ready.record(self._stream)
                    entry = (out, ready)
                if not self._put(entry):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            self._put(_Failure(exc))
            return
        self._put(_END)

    # ------------------------------------------------------------ consumer
    def __iter__(self) -> Iterator[Batch]:
        if not self.threaded:
            for item in self.items:
                yield self.prepare(item)
            return
        if self._thread is not None:
            raise RuntimeError("a Prefetcher can be iterated once")
        self._thread = threading.Thread(target=self._produce, name="leoclr-prefetch", daemon=True)
        self._thread.start()
        try:
            while True:
                entry = self._queue.get()
                if entry is _END:
                    return
                if isinstance(entry, _Failure):
                    raise entry.exc
                out, ready = entry
                if ready is not None:
                    current = torch.cuda.current_stream(self.device)
                    current.wait_event(ready)
                    for t in out:
                        # Made on the side stream, used on this one: the allocator must not hand
                        # the memory back to the side stream before this stream is done with it.
                        t.record_stream(current)
                yield out
        finally:
            self.close()

    def close(self, timeout: float = 30.0) -> None:
        """Stop the producer: it ends after its current item. Waits at most `timeout` seconds (a
        source blocked for longer is left to its daemon thread rather than hanging the caller)."""
        self._stop.set()  # a producer waiting for room in the queue sees it within 0.1 s
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
