"""The exit watchdog, in a real interpreter of its own (it ends the process it runs in)."""

from __future__ import annotations

import subprocess
import sys
import time

from relayrl_runtime import watchdog

_HEADER = """
import threading
from relayrl_runtime import logs, watchdog
logs.setup("json")
"""


def _run(body: str) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", _HEADER + body],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done, time.monotonic() - started


def test_watchdog_ends_a_process_that_cannot_exit_and_shows_where_it_is_stuck() -> None:
    # The interpreter waits for a non-daemon thread that never returns: without the
    # watchdog this process would never end.
    done, took = _run(
        "def never_returns():\n"
        "    threading.Event().wait()\n"
        "threading.Thread(target=never_returns).start()\n"
        "watchdog.arm(1.0)\n"
    )
    assert done.returncode == watchdog.EXIT_CODE, done.stderr
    assert took < 30, took
    assert "shutdown did not finish in 1s" in done.stderr
    # Every thread's stack follows, the stuck one included.
    assert "in never_returns" in done.stderr, done.stderr


def test_watchdog_leaves_a_process_that_exits_in_time_alone() -> None:
    # Arming again does not move the deadline: the process outlives 0.1 s and exits 0.
    done, took = _run("import time\nwatchdog.arm(20.0)\nwatchdog.arm(0.1)\ntime.sleep(0.5)\n")
    assert done.returncode == 0, done.stderr
    assert took < 20, took
    assert done.stderr == ""


def test_watchdog_shows_what_a_stuck_task_awaits() -> None:
    # An event loop idle in its selector shows nothing in the thread stacks: the task
    # stacks say which await never ends.
    done, _ = _run(
        "import asyncio\n"
        "async def waits_for_a_fetch_loop():\n"
        "    await asyncio.Event().wait()\n"
        "async def main():\n"
        "    watchdog.arm(1.0, asyncio.get_running_loop())\n"
        "    await waits_for_a_fetch_loop()\n"
        "asyncio.run(main())\n"
    )
    assert done.returncode == watchdog.EXIT_CODE, done.stderr
    assert "asyncio task" in done.stderr, done.stderr
    assert "waits_for_a_fetch_loop" in done.stderr, done.stderr
