"""Bound the process's way out, and show where it is stuck when it overruns.

`arm(seconds)` starts a timer when the drain begins. If the process is still alive when
it expires (a thread that never returns, a close that never completes, a hang while the
interpreter finalizes), it logs one error, writes every thread's stack to stderr and
exits with `EXIT_CODE` at once. In case that timer cannot run Python code (the GIL
never comes back), a C-level one (`faulthandler`) writes the stacks a little later and
exits 1. A pod then never sits out its whole termination grace period with nothing in
its log to say why.

`install_stack_dump()` makes SIGUSR1 write every thread's stack to stderr (the process
keeps running): `kill -USR1 <pid>` shows what a live runtime is doing.

Only the process entry points (`app.main`, `sink_cli`) use these: they end the whole
interpreter.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import logging
import os
import signal
import sys
import threading
import traceback
from types import FrameType
from typing import Any, Final

# What the process exits with when its drain overran (as `App` returns for a drain that
# did not finish).
EXIT_CODE: Final = 3
# How much longer the C-level timer waits than the Python one.
_LAST_RESORT_SECONDS: Final = 5.0

log = logging.getLogger(__name__)

_armed: threading.Timer | None = None


def arm(seconds: float, loop: asyncio.AbstractEventLoop | None = None) -> None:
    """Exit with `EXIT_CODE` (after logging and dumping stacks) if still alive in `seconds`.

    With `loop`, the stacks of its tasks are written too: a process stuck awaiting
    something has an idle thread stack, and the task shows what it awaits. Arming again
    is a no-op: the first deadline stands.
    """
    global _armed
    if _armed is not None:
        return
    timer = threading.Timer(seconds, _expire, args=(seconds, loop))
    timer.name = "relayrl-exit-watchdog"
    timer.daemon = True
    timer.start()
    _armed = timer
    faulthandler.dump_traceback_later(seconds + _LAST_RESORT_SECONDS, exit=True)


def _expire(seconds: float, loop: asyncio.AbstractEventLoop | None) -> None:
    log.error(
        "shutdown did not finish in %.0fs; the stacks of all threads follow, exiting %d",
        seconds,
        EXIT_CODE,
    )
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stderr.flush()
    faulthandler.dump_traceback(all_threads=True)
    if loop is not None:
        _dump_tasks(loop)
    os._exit(EXIT_CODE)


def _dump_tasks(loop: asyncio.AbstractEventLoop) -> None:
    """Write where each task waits to stderr, innermost last, read from this thread
    (best effort: the loop may change its tasks meanwhile; the process ends anyway)."""
    try:
        tasks = list(asyncio.all_tasks(loop))
    except RuntimeError:  # the set changed while being read
        return
    for task in tasks:
        with contextlib.suppress(Exception):
            frames = _awaited_frames(task.get_coro())
            stack = traceback.StackSummary.extract((f, f.f_lineno) for f in frames)
            sys.stderr.write(f"\nasyncio task {task.get_name()} (innermost last):\n")
            sys.stderr.write("".join(stack.format()))
    sys.stderr.flush()


def _awaited_frames(coro: Any) -> list[FrameType]:
    """The frames of a coroutine and of those it awaits, in turn: a task's own stack
    holds only its outermost frame."""
    frames: list[FrameType] = []
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is None:
            break
        frames.append(frame)
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return frames


def install_stack_dump() -> None:
    """SIGUSR1 writes every thread's stack to stderr."""
    faulthandler.register(signal.SIGUSR1, all_threads=True)
