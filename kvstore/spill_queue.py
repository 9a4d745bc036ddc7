"""`SpillQueue`: background writers with a bound on the bytes in flight and error propagation.

Producers `put` items that cost ``nbytes``; `put` blocks while the queued and in-progress items
already hold ``max_inflight_bytes`` (an item larger than the budget is admitted alone). Up to
``workers`` threads call ``write(item)``; a failure is kept and raised, once, by the next
`put`, `drain` or `close`, and the item is dropped (the writer must leave no partial result).
Items may finish out of order.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from typing import Any

from vinekv.kvstore.errors import StoreError

logger = logging.getLogger(__name__)


class SpillError(StoreError):
    """A background write failed; ``__cause__`` is the writer's exception."""


class SpillQueue:
    """A bounded queue of writes run by background threads.

    Args:
      write: called on a writer thread with each item; must be thread-safe.
      max_inflight_bytes: bytes queued or being written before `put` blocks.
      workers: writer threads at most (started on demand).
      describe: names an item in error messages and logs.
    """

    def __init__(
        self,
        write: Callable[[Any], None],
        max_inflight_bytes: int,
        workers: int,
        describe: Callable[[Any], str] = repr,
    ):
        if max_inflight_bytes < 1:
            raise ValueError(f"max_inflight_bytes must be positive, got {max_inflight_bytes}")
        if not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be a positive int, got {workers!r}")
        self._write, self._describe = write, describe
        self.max_inflight_bytes, self.workers = max_inflight_bytes, workers
        self._cond = threading.Condition()
        self._queue: deque[tuple[Hashable, Any, int]] = deque()
        self._keys: set[Hashable] = set()
        self._inflight = 0
        self._errors: list[tuple[str, BaseException]] = []
        self._closed = False
        self._threads: list[threading.Thread] = []
        self._free = 0  # writer threads not busy with an item
        self.peak_inflight_bytes = 0
        self.stats = {"written": 0, "bytes": 0, "write_seconds": 0.0}

    @property
    def inflight_bytes(self) -> int:
        """Bytes of the items queued or being written now."""
        return self._inflight

    def pending(self, key: Hashable) -> bool:
        """Whether an item put under ``key`` is queued or being written."""
        with self._cond:
            return key in self._keys

    def put(self, key: Hashable, item: Any, nbytes: int) -> None:
        """Queues ``item`` (blocks while the byte budget is spent); raises an earlier failure,
        before or while waiting, instead of queuing (the item is then not written).

        Raises:
          SpillError: an earlier write failed. RuntimeError: the queue is closed.
          FileExistsError: an item with ``key`` is already pending.
        """
        self.raise_errors()
        with self._cond:
            if self._closed:
                raise RuntimeError("spill queue is closed")
            if key in self._keys:
                raise FileExistsError(f"{key!r} is already queued for writing")
            while self._inflight and self._inflight + nbytes > self.max_inflight_bytes and not self._errors:
                self._cond.wait()
            if not self._errors:  # else: raised below, and this item is not queued
                self._keys.add(key)
                self._queue.append((key, item, nbytes))
                self._inflight += nbytes
                self.peak_inflight_bytes = max(self.peak_inflight_bytes, self._inflight)
                self._start_writers()
                self._cond.notify_all()
                return
        self.raise_errors()

    def drain(self) -> None:
        """Waits until every queued item is written; raises the first failure since the last raise."""
        with self._cond:
            while self._queue or self._inflight:
                self._cond.wait()
        self.raise_errors()

    def close(self) -> None:
        """Drains, then stops the writers (idempotent). Raises a failure of the drained writes."""
        if self._closed:
            return
        try:
            self.drain()
        finally:
            with self._cond:
                self._closed = True
                self._cond.notify_all()
            for thread in self._threads:
                thread.join()

    def raise_errors(self) -> None:
        with self._cond:
            errors, self._errors = self._errors, []
        if errors:
            (what, first), more = errors[0], len(errors) - 1
            tail = f" (and {more} more failed writes)" if more else ""
            raise SpillError(f"a background write failed: {what}: {first}{tail}") from first

    def _start_writers(self) -> None:
        """Starts writers (up to ``workers``) while queued items outnumber the free ones."""
        while len(self._queue) > self._free and len(self._threads) < self.workers:
            thread = threading.Thread(target=self._run, name="vinekv-spill", daemon=True)
            self._free += 1
            thread.start()
            self._threads.append(thread)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                key, item, nbytes = self._queue.popleft()
                self._free -= 1
            start = time.perf_counter()
            try:
                self._write(item)
            except BaseException as err:  # surfaced on the next put/drain/close
                what = self._describe(item)
                logger.error("write of %s failed: %s", what, err)
                with self._cond:
                    self._errors.append((what, err))
            with self._cond:
                self._free += 1
                self._keys.discard(key)
                self._inflight -= nbytes
                self.stats["written"] += 1
                self.stats["bytes"] += nbytes
                self.stats["write_seconds"] += time.perf_counter() - start
                self._cond.notify_all()
