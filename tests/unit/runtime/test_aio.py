"""Stopping background tasks: a cancel lost inside `asyncio.wait_for` must not hang us.

On Python 3.11, `wait_for` returns the inner result when the cancel lands in the same
loop iteration as that result, so the cancel is gone. The race is set up here exactly:
the inner future completes and the cancel follows before the loop runs again.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys

from relayrl_runtime import aio


async def _looping_on_wait_for(first: asyncio.Future[int], rounds: list[int]) -> None:
    """A fetch loop: each round waits for a reply, with a timeout, forever."""
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(first if not rounds else asyncio.sleep(30), 5)
        rounds.append(1)


async def _waiting_for_a_reply() -> tuple[asyncio.Task[None], asyncio.Future[int], list[int]]:
    """A fetch-like loop, now waiting on its first reply (not yet set)."""
    reply: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    rounds: list[int] = []
    task = asyncio.create_task(_looping_on_wait_for(reply, rounds))
    await asyncio.sleep(0)  # the task now waits on `reply`
    return task, reply, rounds


async def _a_task_that_lost_its_cancel() -> tuple[asyncio.Task[None], list[int]]:
    task, reply, rounds = await _waiting_for_a_reply()
    reply.set_result(1)
    task.cancel()  # same loop iteration as the reply
    await asyncio.sleep(0.05)
    return task, rounds


async def test_one_cancel_can_be_lost_in_wait_for_on_this_python() -> None:
    task, rounds = await _a_task_that_lost_its_cancel()
    try:
        if sys.version_info < (3, 12):
            assert not task.done()  # the race this module is about
            assert rounds == [1]
    finally:
        await aio.cancel_and_wait(task)


async def test_cancel_and_wait_cancels_again_when_its_cancel_is_lost() -> None:
    task, reply, rounds = await _waiting_for_a_reply()
    reply.set_result(1)
    # No await in between: cancel_and_wait's own first cancel meets the reply.
    await asyncio.wait_for(aio.cancel_and_wait(task, recancel_seconds=0.1), 10)
    assert task.cancelled()
    if sys.version_info < (3, 12):
        assert rounds == [1], "the first cancel was lost, a second one ended the task"


async def test_what_a_task_raised_stays_on_it() -> None:
    async def fails() -> None:
        raise ValueError("boom")

    task = asyncio.create_task(fails())
    await asyncio.sleep(0)
    assert await aio.cancel_and_wait(task) == set()
    assert isinstance(task.exception(), ValueError)


async def test_it_gives_up_on_a_task_that_refuses_to_end() -> None:
    stop = asyncio.Event()

    async def stubborn() -> None:
        while not stop.is_set():
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                continue

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    left = await aio.cancel_and_wait(task, give_up_after=0.3, recancel_seconds=0.1)
    assert left == {task}
    stop.set()
    task.cancel()
    await asyncio.wait({task}, timeout=5)
    assert task.done()
