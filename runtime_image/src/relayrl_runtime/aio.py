"""asyncio helpers shared by the runtime, the sinks and the operator (stdlib only).

Stopping a background task is `task.cancel()` and waiting for it, but on Python 3.11 one
cancel is not always enough: `asyncio.wait_for` returns the inner result when the cancel
lands in the same loop iteration as that result (fixed in 3.12). The cancel is then
lost, and a task that loops around a `wait_for` (a NATS fetch, `next_msg`, a request)
goes on forever while its owner waits for it. `cancel_and_wait` cancels again until the
task has ended.
"""

from __future__ import annotations

import asyncio
from typing import Any, Final

# How long to wait for a cancelled task before cancelling it again. Long enough for a
# task's own cleanup (a flush, a close) to finish undisturbed in the usual case.
RECANCEL_SECONDS: Final = 1.0


async def cancel_and_wait(
    *tasks: asyncio.Future[Any],
    give_up_after: float | None = None,
    recancel_seconds: float = RECANCEL_SECONDS,
) -> set[asyncio.Future[Any]]:
    """Cancel `tasks` and wait until every one has ended, cancelling again as needed.

    Gives up after `give_up_after` seconds (None: never) and returns the tasks still running.
    What the tasks raised is left on them (read it with `failure`); a cancellation of
    the caller itself still propagates.
    """
    loop = asyncio.get_running_loop()
    deadline = None if give_up_after is None else loop.time() + give_up_after
    pending = {t for t in tasks if not t.done()}
    while pending:
        left = recancel_seconds if deadline is None else deadline - loop.time()
        if left <= 0:
            break
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=min(left, recancel_seconds))
    return pending


def failure(task: asyncio.Future[Any]) -> BaseException | None:
    """What an ended task raised; None when it returned or was cancelled (read, so
    asyncio does not log it as never retrieved)."""
    return None if task.cancelled() else task.exception()
