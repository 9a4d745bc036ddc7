"""SpillQueue alone: the byte budget holds, failures surface once on the next call, close drains."""

from __future__ import annotations

import threading
import time

import pytest

from vinekv.kvstore.errors import StoreError
from vinekv.kvstore.spill_queue import SpillError, SpillQueue


class Recorder:
    """A write function that records items and the queue's bytes in flight while each is written."""

    def __init__(self, delay: float = 0.0, fail: set[str] = frozenset()):
        self.delay, self.fail = delay, fail
        self.done: list[str] = []
        self.inflight_seen: list[int] = []
        self.queue: SpillQueue | None = None
        self.lock = threading.Lock()

    def __call__(self, item: str) -> None:
        self.inflight_seen.append(self.queue.inflight_bytes)
        time.sleep(self.delay)
        if item in self.fail:
            raise OSError(28, f"No space left on device writing {item}")
        with self.lock:
            self.done.append(item)


def make(delay=0.0, fail=frozenset(), budget=100, workers=2):
    rec = Recorder(delay, set(fail))
    rec.queue = SpillQueue(rec, budget, workers, describe=lambda item: f"item {item}")
    return rec.queue, rec


def test_bytes_in_flight_never_exceed_the_budget():
    queue, rec = make(delay=0.02, budget=100, workers=3)
    for i in range(12):
        queue.put(i, f"x{i}", 40)  # two fit, the third waits
        assert queue.inflight_bytes <= 100
    queue.drain()
    assert sorted(rec.done) == sorted(f"x{i}" for i in range(12))
    assert max(rec.inflight_seen) <= 100 and queue.peak_inflight_bytes == 80
    assert queue.inflight_bytes == 0 and queue.stats["written"] == 12 and queue.stats["bytes"] == 480


def test_an_item_larger_than_the_budget_is_written_alone():
    queue, rec = make(delay=0.02, budget=100, workers=2)
    queue.put("big", "big", 250)
    queue.put("small", "small", 10)  # waits until the big one is done
    queue.drain()
    assert rec.done == ["big", "small"] and rec.inflight_seen == [250, 10]


def test_failure_is_raised_once_on_the_next_call_naming_the_item():
    queue, rec = make(fail={"b"}, workers=1)
    queue.put("a", "a", 1)
    queue.put("b", "b", 1)
    with pytest.raises(SpillError, match=r"item b: .*No space left on device writing b") as info:
        queue.drain()
    assert isinstance(info.value, StoreError) and isinstance(info.value.__cause__, OSError)
    queue.drain()  # reported once; the queue stays usable
    queue.put("c", "c", 1)
    queue.close()
    assert rec.done == ["a", "c"]


def test_failure_surfaces_on_put_and_counts_the_rest():
    queue, rec = make(fail={"a", "b"}, workers=2)
    queue.put("a", "a", 1)
    queue.put("b", "b", 1)
    time.sleep(0.2)
    with pytest.raises(SpillError, match=r"and 1 more failed writes"):
        queue.put("c", "c", 1)
    queue.close()
    assert rec.done == [] and not queue.pending("c")  # a put that raises queued nothing


def test_a_failure_while_waiting_for_room_is_raised_without_queuing():
    queue, rec = make(delay=0.1, fail={"bad"}, budget=10, workers=1)
    queue.put("bad", "bad", 10)
    with pytest.raises(SpillError, match="item bad"):
        queue.put("next", "next", 10)  # waits for room; the failure arrives instead
    queue.put("next", "next", 10)  # the same item can be put again
    queue.close()
    assert rec.done == ["next"]


def test_close_writes_everything_pending_then_refuses():
    queue, rec = make(delay=0.01, budget=1000, workers=2)
    for i in range(20):
        queue.put(i, i, 1)
    queue.close()
    assert sorted(rec.done) == list(range(20))
    with pytest.raises(RuntimeError, match="closed"):
        queue.put("late", "late", 1)
    queue.close()  # idempotent


def test_duplicate_pending_key_is_refused():
    queue, _ = make(delay=0.1, workers=1)
    queue.put("k", "a", 1)
    assert queue.pending("k")
    with pytest.raises(FileExistsError, match="'k' is already queued"):
        queue.put("k", "b", 1)
    queue.drain()
    assert not queue.pending("k")


@pytest.mark.parametrize("bad", [{"max_inflight_bytes": 0}, {"workers": 0}, {"workers": 1.5}])
def test_bad_settings(bad):
    args = {"write": print, "max_inflight_bytes": 10, "workers": 1, **bad}
    with pytest.raises(ValueError, match=next(iter(bad))):
        SpillQueue(**args)
