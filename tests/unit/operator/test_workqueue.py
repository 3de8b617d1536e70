"""The reconciler's work queue: what something asked for first, the resync's checks after."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from relayrl_operator import reconcile, settings, workqueue


def taken(q: workqueue.WorkQueue[str], n: int) -> list[str]:
    return [q.get_nowait() for _ in range(n)]


def test_urgent_keys_come_first_and_each_key_once() -> None:
    q: workqueue.WorkQueue[str] = workqueue.WorkQueue()
    for key in ("r1", "r2"):
        q.put(key, background=True)
    q.put("e1")
    q.put("e1")
    q.put("r1", background=True)
    q.put("e2")
    assert len(q) == 4
    assert taken(q, 4) == ["e1", "e2", "r1", "r2"]
    assert len(q) == 0


def test_the_urgent_count_follows_moves_and_takes() -> None:
    q: workqueue.WorkQueue[str] = workqueue.WorkQueue()
    q.put("r1", background=True)
    q.put("r2", background=True)
    assert q.urgent == 0
    q.put("r1")  # moved up
    q.put("e1")
    q.put("e1")
    assert q.urgent == 2
    assert taken(q, 2) == ["r1", "e1"]
    assert q.urgent == 0
    assert taken(q, 1) == ["r2"]
    assert q.urgent == 0


def test_an_urgent_put_moves_a_waiting_background_key_up_once() -> None:
    q: workqueue.WorkQueue[str] = workqueue.WorkQueue()
    for key in ("r1", "r2", "r3"):
        q.put(key, background=True)
    q.put("r3")
    q.put("r3", background=True)  # still urgent: never moves down
    assert taken(q, 3) == ["r3", "r1", "r2"]
    with pytest.raises(IndexError):
        q.get_nowait()  # r3's old place in the background lane is not a second r3


def test_the_background_lane_moves_while_urgent_keys_keep_coming() -> None:
    q: workqueue.WorkQueue[str] = workqueue.WorkQueue()
    share = workqueue.BACKGROUND_SHARE
    for i in range(3):
        q.put(f"r{i}", background=True)
    for i in range(3 * share):
        q.put(f"e{i}")
    order = taken(q, 3 * share)
    assert [i for i, key in enumerate(order) if key.startswith("r")] == [
        share - 1,
        2 * share - 1,
        3 * share - 1,
    ]


async def test_get_waits_for_a_key() -> None:
    q: workqueue.WorkQueue[str] = workqueue.WorkQueue()
    getter = asyncio.ensure_future(q.get())
    await asyncio.sleep(0.01)
    assert not getter.done()
    q.put("a", background=True)
    assert await asyncio.wait_for(getter, 1) == "a"


class NoApis:
    async def has_api(self, api_version: str) -> bool:
        return False


def reconciler(workers: int = 1, resync_seconds: float = 30.0) -> reconcile.Reconciler:
    return reconcile.Reconciler(
        client=NoApis(),  # type: ignore[arg-type]
        cfg=settings.Settings(resync_seconds=resync_seconds),
        streams=None,
        workers=workers,
    )


async def test_a_resync_queues_its_checks_behind_what_something_asked_for() -> None:
    rec = reconciler(resync_seconds=0.05)
    for name in ("a", "b", "c"):
        rec.agent_event("ADDED", {"metadata": {"namespace": "ml", "name": name, "generation": 1}})
    assert taken(rec._queue, 3) == [("ml", "a"), ("ml", "b"), ("ml", "c")]
    for name in ("a", "c"):  # applied just now; b still has children to apply
        rec._states["ml", name].needs_apply = False
        rec._states["ml", name].applied_at = time.monotonic()
    resync = asyncio.ensure_future(rec._resync())
    try:
        for _ in range(200):  # the first resync comes after 0.05 s
            if len(rec._queue) == 3:
                break
            await asyncio.sleep(0.01)
    finally:
        resync.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await resync
    assert len(rec._queue) == 3
    rec.enqueue(("ml", "c"))  # a pod of c reported meanwhile
    assert taken(rec._queue, 3) == [("ml", "b"), ("ml", "c"), ("ml", "a")]


def recording(rec: reconcile.Reconciler, hold: asyncio.Event) -> list[tuple[str, str]]:
    """Replace the reconciler's pass by one that records its key; the first waits for
    `hold`."""
    passes: list[tuple[str, str]] = []

    async def run_one(key: tuple[str, str]) -> None:
        passes.append(key)
        if len(passes) == 1:
            await hold.wait()

    rec._run_one = run_one  # type: ignore[method-assign]
    return passes


async def test_an_urgent_enqueue_during_a_pass_makes_the_next_pass_urgent() -> None:
    rec = reconciler(workers=1)
    hold = asyncio.Event()
    passes = recording(rec, hold)
    a, b = ("ml", "a"), ("ml", "b")
    await rec.start()
    try:
        rec.enqueue(a)
        await asyncio.sleep(0.05)
        assert passes == [a]  # a's pass is running
        rec.enqueue(b, background=True)
        rec.enqueue(a, background=True)
        rec.enqueue(a)  # an event for a while its pass runs: the next pass is urgent
        hold.set()
        await asyncio.sleep(0.05)
        assert passes == [a, a, b]
    finally:
        await rec.stop()


async def test_a_key_taken_while_pausing_waits_for_the_resume() -> None:
    rec = reconciler(workers=2)
    hold = asyncio.Event()
    hold.set()
    passes = recording(rec, hold)
    await rec.start()
    try:
        await asyncio.sleep(0.01)  # the workers wait for a key
        rec._active.clear()  # paused by a peer
        rec.enqueue(("ml", "a"))
        await asyncio.sleep(0.05)
        assert passes == []
        assert len(rec._queue) == 1
        rec._active.set()
        await asyncio.sleep(0.05)
        assert passes == [("ml", "a")]
        assert len(rec._queue) == 0
    finally:
        await rec.stop()
